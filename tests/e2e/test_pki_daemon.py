"""
What `mtlsproxy pki` makes serves the real daemon: PEM files, the PKCS#12
keystore and truststore with their password files, and a CRL from `pki revoke`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import Backend, ProxyLauncher, require

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
        [require("curl"), "-sS", "--max-time", "10", "--cacert", str(ca_dir / "ca-cert.pem"),
         "--cert", str(ca_dir / f"{client}-cert.pem"), "--key", str(ca_dir / f"{client}-key.pem"),
         "-H", "Accept: application/json", f"https://localhost:{proxy_port}/echo/pki"],
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
        "--keystore", str(ca_dir / "server-keystore.p12"),
        "--keystore-password-file", str(ca_dir / "server-keystore.pass"),
        "--truststore", str(ca_dir / "server-truststore.p12"),
        "--truststore-password-file", str(ca_dir / "server-truststore.pass"),
        cert=None, key=None, ca=None,
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
        "--crl", str(ca_dir / "crl.pem"),
        cert=ca_dir / "server-cert.pem", key=ca_dir / "server-key.pem", ca=ca_dir / "ca-cert.pem",
    )
    assert curl(proxy.port, ca_dir, "client").returncode == 0
    before = len(backend.requests())
    refused = curl(proxy.port, ca_dir, "bob")
    assert refused.returncode != 0
    proxy.wait_for_log(r"refused \S+: certificate revoked")
    assert len(backend.requests()) == before
