"""
Identity headers can only come from mtlsproxy: every client-sent spelling is
removed, and hop-by-hop headers (including Connection tricks) are handled per
hop, never passed through and never able to drop what the proxy sets.
"""

from __future__ import annotations

import pytest

from .harness import Echo, canonical

pytestmark = pytest.mark.e2e

#: (header name exactly as sent, value); every value holds the marker "SPOOF"
SPOOFED = [
    ("X-Client-Cert-CN", "admin-SPOOF"),
    ("x-client-cert-cn", "admin-SPOOF"),
    ("X-CLIENT-CERT-CN", "admin-SPOOF"),
    ("X_Client_Cert_CN", "admin-SPOOF"),
    ("x_client_cert_cn", "admin-SPOOF"),
    ("X-Client_Cert-CN", "admin-SPOOF"),
    ("X-Client-Cert-Subject", "CN=admin-SPOOF"),
    ("X-Client-Cert", "admin-SPOOF"),
    ("X-Client-Cert-Fingerprint", "SPOOF"),
    ("X_Client_Cert_Serial", "SPOOF"),
    ("X-Forwarded-Client-Cert", 'By=spiffe://SPOOF;Subject="CN=admin"'),
    ("x_forwarded_client_cert", "Subject=SPOOF"),
    ("X-Forwarded-For", "6.6.6.6, SPOOF"),
    ("x_forwarded_for", "SPOOF"),
    ("X-Forwarded-Proto", "http-SPOOF"),
    ("x_forwarded_proto", "http-SPOOF"),
    ("X-Forwarded-Host", "SPOOF.example"),
    ("X_FORWARDED_HOST", "SPOOF.example"),
    ("Forwarded", "for=6.6.6.6;proto=http;host=SPOOF.example"),
    ("forwarded", "for=SPOOF"),
]


#: identity headers whose value the test knows (X-Forwarded-Host is the Host sent)
TRUE_VALUES = {
    "x-client-cert-cn": "client",
    "x-forwarded-for": "127.0.0.1",
    "x-forwarded-proto": "https",
    "x-forwarded-host": "",
}
#: the certificate details sent by default besides the CN
CERT_DETAILS = {
    f"x-client-cert-{d}"
    for d in ("cn", "subject", "issuer", "serial", "fingerprint", "not-before", "not-after")
}


def assert_only_proxy_identity(echo: Echo, host: str) -> None:
    """
    The backend saw exactly the identity headers the proxy sets, each once --
    X-Client-Cert-CN: client, the other certificate details, and
    X-Forwarded-For/Proto/Host with true values -- and no spoofed value under any name.
    """
    identity = [
        (canonical(n), v) for n, v in echo.identity_headers() if canonical(n) != "forwarded"
    ]
    names = [n for n, _ in identity]
    assert len(names) == len(set(names)), echo.headers
    values = dict(identity)
    assert {k: values.get(k) for k in TRUE_VALUES} == {**TRUE_VALUES, "x-forwarded-host": host}
    assert CERT_DETAILS <= set(names) <= CERT_DETAILS | set(TRUE_VALUES) | {"x-client-cert-san"}
    assert len(echo.values("Forwarded")) <= 1, echo.headers
    assert not [(n, v) for n, v in echo.headers if "SPOOF" in v or "6.6.6.6" in v], echo.headers


@pytest.mark.parametrize("name,value", SPOOFED, ids=[f"{n}" for n, _ in SPOOFED])
def test_spoofed_identity_header_removed(shared_stack, name, value):
    """A client-sent identity header, in this spelling, never reaches the backend."""
    _, proxy = shared_stack
    with proxy.tls() as conn:
        echo = conn.request("GET", "/echo/spoof", [(name, value)]).echo()
        assert_only_proxy_identity(echo, conn.host)


def test_all_spoofed_headers_at_once_with_repeats(shared_stack):
    """Every spoofing spelling in one request, some repeated: all removed."""
    _, proxy = shared_stack
    headers = SPOOFED + SPOOFED[:3]
    with proxy.tls() as conn:
        echo = conn.request("POST", "/echo/spoof-all", headers, body=b"x").echo()
        assert_only_proxy_identity(echo, conn.host)


@pytest.mark.parametrize(
    "connection",
    [
        "X-Client-Cert-CN",
        "x_client_cert_cn",
        "X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host",
        "keep-alive, X-Client-Cert-CN, Forwarded",
    ],
)
def test_connection_header_cannot_remove_proxy_headers(shared_stack, connection):
    """
    'Connection: X-Client-Cert-CN' (and friends) must not make the proxy drop
    the identity headers it sets itself; the Connection header that reaches
    the backend, if any, names none of them.
    """
    _, proxy = shared_stack
    with proxy.tls() as conn:
        echo = conn.request(
            "GET", "/echo/connection", [("Connection", connection), ("X-Client-Cert-CN", "SPOOF")]
        ).echo()
        assert_only_proxy_identity(echo, conn.host)
        for value in echo.values("Connection"):
            assert "cert" not in value.lower() and "forward" not in value.lower(), value


def test_hop_by_hop_headers_not_forwarded(shared_stack):
    """
    Connection, the headers it names, Keep-Alive, TE, Proxy-* are not passed to
    the backend; an ordinary end-to-end header is.
    """
    _, proxy = shared_stack
    with proxy.tls() as conn:
        echo = conn.request(
            "GET",
            "/echo/hop",
            [
                ("Connection", "keep-alive, X-Secret-Hop"),
                ("X-Secret-Hop", "hop-value"),
                ("Keep-Alive", "timeout=5, max=100"),
                ("TE", "trailers"),
                ("Proxy-Authorization", "Basic c3Bvb2Y6c3Bvb2Y="),
                ("Proxy-Connection", "keep-alive"),
                ("X-End-To-End", "kept"),
            ],
        ).echo()
    names = echo.names()
    for hop in ("x-secret-hop", "keep-alive", "te", "proxy-authorization", "proxy-connection"):
        assert hop not in names, echo.headers
    assert not any("hop-value" in v or "c3Bvb2Y" in v for _, v in echo.headers), echo.headers
    for value in echo.values("Connection"):
        assert "x-secret-hop" not in value.lower(), value
    assert echo.values("X-End-To-End") == ["kept"]


def test_httpoxy_underscored_hop_by_hop_and_client_address_headers_not_forwarded(shared_stack):
    """
    Proxy (httpoxy), Proxy_Connection and Keep_Alive (hop-by-hop names
    spelled with '_'), a bare X-Forwarded and X-Real-IP never reach the backend.
    """
    _, proxy = shared_stack
    sent = [
        ("Proxy", "http://evil.SPOOF:1"),
        ("Proxy_Connection", "keep-alive-SPOOF"),
        ("Keep_Alive", "timeout=5-SPOOF"),
        ("x-forwarded", "for=SPOOF"),
        ("X-Real-IP", "6.6.6.6"),
        ("X_Real_IP", "6.6.6.6"),
        ("X-End-To-End", "kept"),
    ]
    with proxy.tls() as conn:
        echo = conn.request("GET", "/echo/httpoxy", sent).echo()
    names = {canonical(n) for n in echo.names()}
    for dropped in ("proxy", "proxy-connection", "keep-alive", "x-forwarded", "x-real-ip"):
        assert dropped not in names, echo.headers
    assert not any("SPOOF" in v or "6.6.6.6" in v for _, v in echo.headers), echo.headers
    assert echo.values("X-End-To-End") == ["kept"]
