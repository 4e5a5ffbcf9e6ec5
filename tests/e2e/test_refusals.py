"""
Clients without an acceptable certificate never get past the TLS handshake:
nothing reaches the backend, and the proxy logs one line with the peer and the
reason in the words operators grep for.
"""

from __future__ import annotations

import re
import ssl

import pytest

pytestmark = pytest.mark.e2e

TLS_VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]

REASONS = {
    "rogue": "unknown CA",
    "expired": "certificate expired",
    "not-yet-valid": "certificate not yet valid",
    "server-auth-only": "unsuitable certificate purpose",
}


def refusal(peer: str, reason: str) -> str:
    return rf"refused {re.escape(peer)}: {re.escape(reason)}"


def test_curl_without_certificate_is_refused(proxy, backend):
    """curl without --cert gets no HTTP response; the log says 'certificate required'."""
    result = proxy.curl("/echo/no-cert", client=None)
    assert result.returncode != 0, result.describe()
    assert result.status == 0, result.describe()
    proxy.wait_for_log(r"refused 127\.0\.0\.1:\d+: certificate required")
    assert backend.requests() == []


def test_python_client_without_certificate_is_refused(proxy, backend):
    """
    With TLS 1.2 (refused in the handshake) and TLS 1.3 (refused after it), a
    client without a certificate gets no HTTP response, and each refusal is
    logged with that connection's own address and port.
    """
    for version in TLS_VERSIONS:
        attempt = proxy.attempt(None, max_version=version)
        assert attempt.refused, (version, attempt)
        proxy.wait_for_log(refusal(attempt.peer, "certificate required"))
    assert backend.requests() == []


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_invalid_certificate_is_refused_with_reason(proxy, backend, kind):
    """
    Certificates from an unknown CA, expired, not yet valid, or without the
    clientAuth purpose are refused over TLS 1.2 and 1.3, with the right reason
    logged, and nothing reaches the backend.
    """
    for version in TLS_VERSIONS:
        attempt = proxy.attempt(kind, max_version=version)
        assert attempt.refused, (version, attempt)
        proxy.wait_for_log(refusal(attempt.peer, REASONS[kind]))
    result = proxy.curl("/echo/curl", client=kind)
    assert result.returncode != 0 and result.status == 0, result.describe()
    assert backend.requests() == []


def test_openssl_s_client_with_unknown_ca_is_refused(proxy, backend):
    """openssl s_client with a certificate from an unknown CA gets no HTTP answer."""
    status, output = proxy.s_client(
        client="rogue", request=b"GET /echo/s_client HTTP/1.1\r\nHost: localhost\r\n\r\n"
    )
    assert status is not None, f"s_client hung:\n{output}"
    assert "HTTP/1." not in output, output
    proxy.wait_for_log(r"refused 127\.0\.0\.1:\d+: unknown CA")
    assert backend.requests() == []


class TestRevocation:
    """--crl: revoked client certificates are refused, others are not."""

    @pytest.fixture
    def crl_proxy(self, start_proxy, pki):
        return start_proxy("--crl", str(pki.crl()))

    def test_revoked_certificate_is_refused(self, crl_proxy, backend):
        """A certificate listed in the CRL is refused: 'certificate revoked'."""
        for version in TLS_VERSIONS:
            attempt = crl_proxy.attempt("revoked", max_version=version)
            assert attempt.refused, (version, attempt)
            crl_proxy.wait_for_log(refusal(attempt.peer, "certificate revoked"))
        assert backend.requests() == []

    def test_unrevoked_certificate_still_accepted(self, crl_proxy):
        """With a CRL loaded, a certificate not in it is still accepted."""
        assert crl_proxy.curl("/echo/ok").echo().values("X-Client-Cert-CN") == ["client"]


def test_min_tls_13_refuses_tls_12_clients(start_proxy, backend):
    """--min-tls 1.3: a TLS 1.2-only client cannot connect; a TLS 1.3 client can."""
    proxy = start_proxy("--min-tls", "1.3")
    attempt = proxy.attempt("client", max_version=ssl.TLSVersion.TLSv1_2)
    assert attempt.refused and attempt.handshake_error, attempt
    assert backend.requests() == []
    with proxy.tls(context=proxy.context(min_version=ssl.TLSVersion.TLSv1_3)) as conn:
        assert conn.sock.version() == "TLSv1.3"
        assert conn.request("GET", "/echo/13").echo().values("X-Client-Cert-CN") == ["client"]
