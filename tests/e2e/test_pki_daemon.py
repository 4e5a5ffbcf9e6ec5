"""
What `mtlsproxy pki` makes serves the real daemon: PEM files, the PKCS#12
keystore and truststore with their password files, and a CRL from `pki revoke`.

The daemon is reached with curl and with `mtlsproxy.client` (the API the
README shows).  pytest-twisted runs every test inside its reactor, so the
API tests are coroutines (`pytest_twisted.ensureDeferred`) awaiting each
request under a deadline; starting the daemon before that blocks the reactor
briefly, which is harmless as nothing is running on it yet.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer
from twisted.web.client import (
    HTTPConnectionPool,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers

from mtlsproxy.client import make_agent, make_treq_client

from .harness import Backend, Echo, ProxyLauncher, require

pytestmark = pytest.mark.e2e

MTLSPROXY = Path(sys.executable).parent / "mtlsproxy"


def pki(*args: str | Path) -> None:
    subprocess.run([str(MTLSPROXY), "pki", *map(str, args)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki") / "ca"
    pki("init", d, "--p12")
    pki("issue", d, "--client", "bob")
    return d


def curl(proxy_port: int, ca_dir: Path, client: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            require("curl"),
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(ca_dir / "ca-cert.pem"),
            "--cert",
            str(ca_dir / f"{client}-cert.pem"),
            "--key",
            str(ca_dir / f"{client}-key.pem"),
            "-H",
            "Accept: application/json",
            f"https://localhost:{proxy_port}/echo/pki",
        ],
        capture_output=True,
        timeout=30,
    )


def test_pem_files_from_pki_init_serve_the_daemon(
    launcher: ProxyLauncher, backend: Backend, ca_dir: Path
) -> None:
    """--cert/--key/--ca from `pki init`: curl with the client certificate gets through."""
    proxy = launcher.start(
        cert=ca_dir / "server-cert.pem", key=ca_dir / "server-key.pem", ca=ca_dir / "ca-cert.pem"
    )
    done = curl(proxy.port, ca_dir, "client")
    assert done.returncode == 0, done.stderr
    headers = json.loads(done.stdout)["headers"]
    assert [v for n, v in headers if n.lower() == "x-client-cert-cn"] == ["client"]


def test_pkcs12_stores_from_pki_init_serve_the_daemon(
    launcher: ProxyLauncher, backend: Backend, ca_dir: Path
) -> None:
    """
    --keystore/--truststore with the *.pass files `pki init --p12` wrote:
    the daemon starts and curl with the client certificate gets through.
    """
    proxy = launcher.start(
        "--keystore",
        str(ca_dir / "server-keystore.p12"),
        "--keystore-password-file",
        str(ca_dir / "server-keystore.pass"),
        "--truststore",
        str(ca_dir / "server-truststore.p12"),
        "--truststore-password-file",
        str(ca_dir / "server-truststore.pass"),
        cert=None,
        key=None,
        ca=None,
    )
    done = curl(proxy.port, ca_dir, "client")
    assert done.returncode == 0, done.stderr


def test_client_revoked_by_pki_revoke_is_refused(
    launcher: ProxyLauncher, backend: Backend, ca_dir: Path, tmp_path: Path
) -> None:
    """
    After `pki revoke DIR bob-cert.pem`, a daemon with --crl DIR/crl.pem refuses
    bob in the handshake ("certificate revoked") and still admits the other client.
    """
    pki("revoke", ca_dir, ca_dir / "bob-cert.pem")
    proxy = launcher.start(
        "--crl",
        str(ca_dir / "crl.pem"),
        cert=ca_dir / "server-cert.pem",
        key=ca_dir / "server-key.pem",
        ca=ca_dir / "ca-cert.pem",
    )
    assert curl(proxy.port, ca_dir, "client").returncode == 0
    before = len(backend.requests())
    refused = curl(proxy.port, ca_dir, "bob")
    assert refused.returncode != 0
    proxy.wait_for_log(r"refused \S+: certificate revoked")
    assert len(backend.requests()) == before


# --- the same through mtlsproxy.client --------------------------------------------------------

#: Seconds one request through mtlsproxy.client may take, handshake included.
CLIENT_DEADLINE = 20.0


def reactor() -> Any:
    from twisted.internet import reactor as global_reactor

    return global_reactor


def password(path: Path) -> bytes:
    """A *.pass file's password: its content without the final newline, as the daemon reads it."""
    return path.read_bytes().rstrip(b"\r\n")


async def client_get(
    url: str, *, hostname: str | None = None, use_treq: bool = False, **files: Any
) -> Echo:
    """
    GET C{url} (asking legacy_app for its JSON echo) with an agent from
    L{mtlsproxy.client.make_agent}, or treq's client from L{make_treq_client}
    when C{use_treq}, built from C{files} (its keyword arguments); return what
    the backend saw.  Failures propagate as the Agent raises them; a request
    still running after L{CLIENT_DEADLINE} seconds fails with TimeoutError.
    """
    # A persistent pool, closed below: closeCachedConnections fires only once
    # the connection is gone.  A non-persistent one would still be closing when
    # the test returns and pytest-twisted stops running the reactor, and the
    # daemon would wait for it at shutdown.
    pool = HTTPConnectionPool(reactor(), persistent=True)
    accept = {"Accept": ["application/json"]}

    async def get() -> tuple[int, bytes]:
        if use_treq:
            http = make_treq_client(reactor(), hostname, pool=pool, connect_timeout=10, **files)
            response = await http.get(url, headers=accept)
        else:
            agent = make_agent(reactor(), hostname, pool=pool, connect_timeout=10, **files)
            response = await agent.request(b"GET", url.encode("ascii"), Headers(accept))
        return response.code, await treq.content(response)

    request = defer.ensureDeferred(get())
    request.addTimeout(CLIENT_DEADLINE, reactor())
    try:
        code, body = await request
    finally:
        await pool.closeCachedConnections()
    assert code == 200, f"HTTP {code}: {body[:500]!r}"
    return Echo.parse(body)


def pem_files(ca_dir: Path, client: str = "client") -> dict[str, Path]:
    return {
        "cert": ca_dir / f"{client}-cert.pem",
        "key": ca_dir / f"{client}-key.pem",
        "ca": ca_dir / "ca-cert.pem",
    }


def start_with_pem(launcher: ProxyLauncher, ca_dir: Path, *extra: str) -> Any:
    return launcher.start(
        *extra,
        cert=ca_dir / "server-cert.pem", key=ca_dir / "server-key.pem", ca=ca_dir / "ca-cert.pem",
    )  # fmt: skip


def failure_reasons(error: BaseException) -> list[Any]:
    """The Failures a ResponseNeverReceived/ResponseFailed wraps."""
    assert isinstance(error, ResponseNeverReceived | ResponseFailed), repr(error)
    return list(error.reasons)


@pytest_twisted.ensureDeferred
async def test_client_api_with_pem_files_reaches_the_backend(
    launcher: ProxyLauncher, backend: Backend, ca_dir: Path
) -> None:
    """
    mtlsproxy.client built from client-cert.pem, client-key.pem and ca-cert.pem
    (make_agent, and make_treq_client with a client from `pki issue`) gets 200
    from a daemon run with --cert/--key/--ca, and the backend sees each CN.
    """
    pki("issue", ca_dir, "--client", "api-user")
    proxy = start_with_pem(launcher, ca_dir)
    echo = await client_get(proxy.url("/echo/pki-api"), **pem_files(ca_dir))
    assert echo.target == "/echo/pki-api"
    assert echo.values("X-Client-Cert-CN") == ["client"]
    files = pem_files(ca_dir, "api-user")
    echo = await client_get(proxy.url("/echo/pki-treq"), use_treq=True, **files)
    assert echo.values("X-Client-Cert-CN") == ["api-user"]
    assert backend.requests()[-2:] == ["GET /echo/pki-api HTTP/1.1", "GET /echo/pki-treq HTTP/1.1"]


@pytest_twisted.ensureDeferred
async def test_client_api_with_pkcs12_stores_reaches_the_backend(
    launcher: ProxyLauncher, backend: Backend, ca_dir: Path
) -> None:
    """
    mtlsproxy.client built from client-keystore.p12 and client-truststore.p12,
    with the passwords of their .pass files, gets 200 from a daemon run with
    the server's --keystore/--truststore.
    """
    proxy = launcher.start(
        "--keystore", str(ca_dir / "server-keystore.p12"),
        "--keystore-password-file", str(ca_dir / "server-keystore.pass"),
        "--truststore", str(ca_dir / "server-truststore.p12"),
        "--truststore-password-file", str(ca_dir / "server-truststore.pass"),
        cert=None, key=None, ca=None,
    )  # fmt: skip
    echo = await client_get(
        proxy.url("/echo/pki-p12"),
        keystore=ca_dir / "client-keystore.p12",
        keystore_password=password(ca_dir / "client-keystore.pass"),
        truststore=ca_dir / "client-truststore.p12",
        truststore_password=password(ca_dir / "client-truststore.pass"),
    )
    assert echo.values("X-Client-Cert-CN") == ["client"]


@pytest_twisted.ensureDeferred
async def test_client_api_refuses_a_server_not_named_as_expected(
    launcher: ProxyLauncher, backend: Backend, ca_dir: Path
) -> None:
    """
    Expecting the name wrong.example, the client refuses the daemon's
    certificate (valid, from the trusted CA, but for localhost): service-identity
    raises VerificationError and no request reaches the backend.
    """
    proxy = start_with_pem(launcher, ca_dir)
    before = len(backend.requests())
    with pytest.raises((ResponseNeverReceived, ResponseFailed)) as caught:
        await client_get(proxy.url("/echo/pki"), hostname="wrong.example", **pem_files(ca_dir))
    reasons = failure_reasons(caught.value)
    assert any(r.check(VerificationError) for r in reasons), reasons
    assert "wrong.example" in " ".join(str(r.value) for r in reasons)
    assert len(backend.requests()) == before
    # The same client expecting the right name gets through: only the name was wrong.
    admitted = await client_get(proxy.url("/echo/pki"), **pem_files(ca_dir))
    assert admitted.values("X-Client-Cert-CN") == ["client"]


@pytest_twisted.ensureDeferred
async def test_client_api_with_a_revoked_certificate_gets_a_tls_failure(
    launcher: ProxyLauncher, backend: Backend, ca_dir: Path
) -> None:
    """
    A client issued and then revoked with `pki revoke`, against a daemon with
    --crl DIR/crl.pem: the API call fails with OpenSSL's "certificate revoked"
    alert, never an HTTP answer, while the other client still gets through.
    """
    pki("issue", ca_dir, "--client", "revoked-api")
    pki("revoke", ca_dir, ca_dir / "revoked-api-cert.pem")
    proxy = start_with_pem(launcher, ca_dir, "--crl", str(ca_dir / "crl.pem"))
    admitted = await client_get(proxy.url("/echo/pki"), **pem_files(ca_dir))
    assert admitted.values("X-Client-Cert-CN") == ["client"]
    before = len(backend.requests())
    with pytest.raises((ResponseNeverReceived, ResponseFailed)) as caught:
        await client_get(proxy.url("/echo/pki"), **pem_files(ca_dir, "revoked-api"))
    reasons = failure_reasons(caught.value)
    tls_errors = [r for r in reasons if r.check(SSL.Error)]
    assert tls_errors, reasons
    assert "certificate revoked" in str(tls_errors[0].value)
    proxy.wait_for_log(r"refused \S+: certificate revoked")
    assert len(backend.requests()) == before
