"""
Who the backend is told the client is: X-Client-Cert-CN and the X-Forwarded-*
headers, for valid, chained, hostile and absent client certificates.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest

from .harness import HOSTILE_CNS

pytestmark = pytest.mark.e2e

ACCESS_LINE = r'127\.0\.0\.1:{port} {cn} "{method} {path} HTTP/1\.1" {status} \d+ \d+(?:\.\d+)?s'


def access_line(port: int | str = r"\d+", cn: str = "client", method: str = "GET",
                path: str = "/", status: int = 200) -> str:
    """The access-log regex of the interface contract (path and CN are literal)."""
    return ACCESS_LINE.format(
        port=port, cn=re.escape(cn), method=method, path=re.escape(path), status=status
    )


def percent_encodings(cn: str) -> set[str]:
    """
    The header values the contract allows for C{cn}: characters outside
    printable ASCII, and C{%}, percent-encoded as UTF-8 (upper-case hex).  Two
    readings of "printable" exist for the space, so both are accepted.
    """

    def encode(keep_space: bool) -> str:
        out = []
        for ch in cn:
            printable = 0x21 <= ord(ch) <= 0x7E or (keep_space and ch == " ")
            if printable and ch != "%":
                out.append(ch)
            else:
                out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
        return "".join(out)

    return {encode(False), encode(True)}


def upper_hex(value: str) -> str:
    return re.sub(r"%[0-9a-fA-F]{2}", lambda m: m.group(0).upper(), value)


def test_valid_client_is_forwarded_with_identity_headers(proxy, backend):
    """
    A client with a valid certificate reaches the app, which sees
    X-Client-Cert-CN: client exactly once, X-Forwarded-Proto: https,
    X-Forwarded-For: 127.0.0.1 and X-Forwarded-Host equal to the Host sent;
    the proxy logs one access line for the request.
    """
    result = proxy.curl("/echo/hello")
    echo = result.echo()
    assert echo.values("X-Client-Cert-CN") == ["client"]
    assert echo.values("X-Forwarded-Proto") == ["https"]
    assert echo.values("X-Forwarded-For") == ["127.0.0.1"]
    assert echo.values("Host") == [f"localhost:{proxy.port}"]
    assert echo.values("X-Forwarded-Host") == [f"localhost:{proxy.port}"]
    assert [line.rsplit(" ", 1)[0] for line in backend.requests()] == ["GET /echo/hello"]
    proxy.wait_for_log(access_line(path="/echo/hello"))


def test_greeting_names_the_client(proxy):
    """The demo: GET / through the proxy greets the client by its certificate's CN."""
    result = proxy.curl("/")
    assert result.status == 200, result.describe()
    assert result.body == b"Hello, client! You reached the legacy app through mtlsproxy.\n"


def test_access_log_names_peer_port_method_path_and_status(proxy):
    """The access line carries the TLS peer's exact address and port, the CN and the status."""
    with proxy.tls() as conn:
        response = conn.request("GET", "/status/418")
        assert response.status == 418
        proxy.wait_for_log(access_line(conn.local_port, path="/status/418", status=418))


def test_client_under_intermediate_ca_is_accepted(proxy):
    """
    A client whose certificate file holds leaf and intermediate, issued below
    the trusted root, is verified and forwarded with its own CN.
    """
    echo = proxy.curl("/echo/chained", client="intermediate").echo()
    assert echo.values("X-Client-Cert-CN") == ["chained-client"]


def test_client_without_extended_key_usage_is_accepted(proxy):
    """A certificate with no extendedKeyUsage at all is valid for client auth (RFC 5280)."""
    echo = proxy.curl("/echo/no-eku", client="no-eku").echo()
    assert echo.values("X-Client-Cert-CN") == ["no-eku-client"]


def test_certificate_without_cn_is_forwarded_without_cn_header(proxy):
    """A verified certificate without a common name: forwarded, but no X-Client-Cert-CN."""
    with proxy.tls("no-cn") as conn:
        echo = conn.request("GET", "/echo/no-cn", [("X-Client-Cert-CN", "admin")]).echo()
        assert echo.values("X-Client-Cert-CN") == []
        assert echo.values("X-Forwarded-Proto") == ["https"]
        proxy.wait_for_log(access_line(conn.local_port, "-", path="/echo/no-cn"))


@pytest.mark.parametrize("kind", sorted(HOSTILE_CNS))
def test_hostile_common_names_are_percent_encoded(shared_stack, pki, kind):
    """
    CNs with CR/LF, non-ASCII characters or a percent sign reach the backend
    percent-encoded as UTF-8 in exactly one X-Client-Cert-CN header: nothing
    is injected into the header block, the value decodes back to the CN, and
    the CN cannot split the proxy's access-log line either.
    """
    _, proxy = shared_stack
    cn = HOSTILE_CNS[kind]
    with proxy.tls(kind) as conn:
        echo = conn.request("GET", f"/echo/{kind}").echo()
        port = conn.local_port
    values = echo.values("X-Client-Cert-CN")
    assert len(values) == 1, echo.headers
    value = values[0]
    assert upper_hex(value) in percent_encodings(cn), value
    assert unquote(value) == cn
    assert all(0x20 <= ord(c) <= 0x7E for c in value), value
    assert "x-injected" not in echo.names()
    if kind == "crlf-cn":
        assert "%0D%0A" in upper_hex(value)
    if kind == "percent-cn":
        assert "%25" in value
    proxy.wait_for_log(rf'127\.0\.0\.1:{port} .*"GET /echo/{kind} HTTP/1\.1" 200')
    assert not re.search(r"^\s*X-Injected", proxy.log_text(), re.MULTILINE | re.IGNORECASE)


class TestOptionalClientAuth:
    """--client-auth optional: a client without a certificate is let in, anonymously."""

    @pytest.fixture
    def optional_proxy(self, start_proxy):
        return start_proxy("--client-auth", "optional")

    def test_no_certificate_forwarded_without_identity(self, optional_proxy, backend):
        """
        Without a certificate the request is forwarded with no X-Client-Cert-CN,
        and a spoofed one (in any spelling) is still removed; the access log
        shows C{-} for the CN.
        """
        with optional_proxy.tls(None) as conn:
            response = conn.request(
                "GET", "/echo/anonymous",
                [("X-Client-Cert-CN", "admin"), ("x_client_cert_cn", "admin")],
            )
            echo = response.echo()
            assert echo.values("X-Client-Cert-CN") == []
            assert not any("admin" in v for _, v in echo.headers), echo.headers
            assert echo.values("X-Forwarded-Proto") == ["https"]
            optional_proxy.wait_for_log(access_line(conn.local_port, "-", path="/echo/anonymous"))
        assert len(backend.requests()) == 1

    def test_valid_certificate_still_identified(self, optional_proxy):
        """A client that does send a valid certificate is forwarded with its CN."""
        echo = optional_proxy.curl("/echo/identified").echo()
        assert echo.values("X-Client-Cert-CN") == ["client"]

    def test_invalid_certificate_still_refused(self, optional_proxy, backend):
        """A certificate from an unknown CA is refused even when certificates are optional."""
        attempt = optional_proxy.attempt("rogue")
        assert attempt.refused, attempt
        optional_proxy.wait_for_log(rf"refused {re.escape(attempt.peer)}: unknown CA")
        assert backend.requests() == []


class TestAllowRules:
    """--allow-cn: verified clients not matching any rule get 403 and never reach the app."""

    @pytest.fixture
    def allow_proxy(self, start_proxy):
        return start_proxy("--allow-cn", "client")

    def test_allowed_cn_is_forwarded(self, allow_proxy):
        """The CN named by --allow-cn is forwarded."""
        assert allow_proxy.curl("/echo/allowed").echo().values("X-Client-Cert-CN") == ["client"]

    def test_other_cn_gets_403_and_is_logged(self, allow_proxy, backend):
        """Another verified CN gets 403, the refusal is logged as 'not allowed'."""
        with allow_proxy.tls("bob") as conn:
            response = conn.request("GET", "/echo/denied")
            assert response.status == 403
            allow_proxy.wait_for_log(rf"{re.escape(conn.peer)}\b.*not allowed")
        assert backend.requests() == []
