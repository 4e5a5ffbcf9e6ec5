"""
TLS features: session resumption keeps the identity, and the server key and
trust anchors can come from PKCS#12 keystore/truststore files.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess

import pytest

pytestmark = pytest.mark.e2e

GREETING = "Hello, client! You reached the legacy app through mtlsproxy."
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("flag", ["-tls1_2", "-tls1_3"])
def test_openssl_session_resumption_keeps_identity(proxy, backend, tmp_path, flag):
    """
    openssl s_client -sess_out, then -sess_in: the second connection is
    resumed ("Reused"), and its request still reaches the app with the CN.
    """
    session = tmp_path / "session.pem"
    status, first = proxy.s_client(flag, "-sess_out", str(session), request=REQUEST)
    assert status is not None, f"s_client hung:\n{first}"
    assert "New," in first, first
    assert GREETING in first, first
    assert session.exists() and session.stat().st_size > 0
    status, second = proxy.s_client(flag, "-sess_in", str(session), request=REQUEST)
    assert status is not None, f"s_client hung:\n{second}"
    assert "Reused," in second, second
    assert GREETING in second, second
    assert len(backend.requests()) == 2


@pytest.mark.parametrize(
    "version, tickets",
    [
        (ssl.TLSVersion.TLSv1_2, True),
        (ssl.TLSVersion.TLSv1_2, False),
        (ssl.TLSVersion.TLSv1_3, True),
    ],
    ids=["tls1.2-ticket", "tls1.2-session-cache", "tls1.3"],
)
def test_python_session_resumption_keeps_identity(proxy, version, tickets):
    """
    Python ssl reusing the first connection's session: session_reused is
    true, and the resumed connection carries X-Client-Cert-CN: client.

    Python closes without a TLS close_notify, as many clients do (and as a
    client killed mid-way does); a TLS 1.2 session kept in the server's
    cache (no ticket) must survive that, or such clients never resume.
    """
    context = proxy.context(min_version=version, max_version=version)
    if not tickets:
        context.options |= ssl.OP_NO_TICKET
    with proxy.tls(context=context) as first:
        assert first.request("GET", "/echo/first").echo().values("X-Client-Cert-CN") == ["client"]
        session = first.session
        assert not first.session_reused
    assert session is not None
    with proxy.tls(context=context, session=session) as second:
        assert second.session_reused, "the proxy did not resume the TLS session"
        echo = second.request("GET", "/echo/resumed").echo()
        assert echo.values("X-Client-Cert-CN") == ["client"]


def _p12_options(pki, keystore_by: str, truststore_by: str) -> tuple[list[str], dict, dict]:
    """Options and environment for a proxy loading its material from PKCS#12 files."""
    args: list[str] = []
    env: dict[str, str] = {}
    material: dict = {}
    keystore = pki.keystore()
    truststore = pki.truststore()
    if keystore_by == "pem":
        material.update(cert=pki.server_cert, key=pki.server_key)
    else:
        material.update(cert=None, key=None)
        args += ["--keystore", str(keystore.path)]
        if keystore_by == "file":
            args += ["--keystore-password-file", str(keystore.password_file)]
        else:
            env["MTLSPROXY_KEYSTORE_PASSWORD"] = keystore.password
    if truststore_by == "pem":
        material.update(ca=pki.ca_cert)
    else:
        material.update(ca=None)
        args += ["--truststore", str(truststore.path)]
        if truststore_by == "file":
            args += ["--truststore-password-file", str(truststore.password_file)]
        else:
            env["MTLSPROXY_TRUSTSTORE_PASSWORD"] = truststore.password
    return args, env, material


@pytest.mark.parametrize(
    "keystore_by,truststore_by",
    [("file", "file"), ("env", "env"), ("file", "pem"), ("pem", "env")],
)
def test_pkcs12_keystore_and_truststore(start_proxy, pki, keystore_by, truststore_by):
    """
    The server key and certificate from a PKCS#12 keystore, the trusted CA
    from a keytool-style truststore, passwords from files (trailing newline
    stripped) or from MTLSPROXY_*_PASSWORD: clients verify the server as
    usual, valid clients get through, clients of other CAs do not.
    """
    args, env, material = _p12_options(pki, keystore_by, truststore_by)
    proxy = start_proxy(*args, env=env, **material)
    assert proxy.curl("/echo/p12").echo().values("X-Client-Cert-CN") == ["client"]
    attempt = proxy.attempt("rogue")
    assert attempt.refused, attempt


@pytest.mark.parametrize("flag", ["-tls1_2", "-tls1_3"])
def test_requested_signature_algorithms_exclude_sha1_sha224_and_dsa(proxy, flag):
    """
    The CertificateRequest asks for modern signatures only (tls.SIGALGS), and
    the server's own signature is one of them.
    """
    status, output = proxy.s_client(flag, request=REQUEST)
    assert status is not None, f"s_client hung:\n{output}"
    line = next(
        (x for x in output.splitlines() if x.startswith("Requested Signature Algorithms:")), None
    )
    assert line is not None, output
    requested = line.split(":", 1)[1].strip().split(":")
    assert "ECDSA+SHA256" in requested and "RSA-PSS+SHA256" in requested, line
    weak = [e for e in requested if e.endswith(("SHA1", "SHA224")) or e.startswith("DSA+")]
    assert weak == [], line
    assert GREETING in output, output


def test_truststore_made_by_keytool(start_proxy, pki, tmp_path):
    """
    A truststore written by the real keytool (-importcert -storetype PKCS12),
    as the Java recipe makes it: the daemon trusts its CA end to end.
    """
    keytool = shutil.which("keytool")
    if keytool is None:
        pytest.skip("keytool (a JDK) is not installed")
    store = tmp_path / "keytool-truststore.p12"
    password = "changeit-e2e"
    subprocess.run(
        [keytool, "-importcert", "-noprompt", "-storetype", "PKCS12", "-keystore", str(store),
         "-storepass", password, "-alias", "mtlsproxy-ca", "-file", str(pki.ca_cert)],
        check=True, capture_output=True, timeout=60,
    )
    password_file = tmp_path / "keytool-truststore.pass"
    password_file.write_text(password + "\n")
    proxy = start_proxy(
        "--truststore", str(store), "--truststore-password-file", str(password_file), ca=None
    )
    assert proxy.curl("/echo/keytool").echo().values("X-Client-Cert-CN") == ["client"]
    assert proxy.attempt("rogue").refused
