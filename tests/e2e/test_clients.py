"""
Real clients other than curl and Python's ssl module, end to end against the
daemon run from the stores `mtlsproxy pki init --p12` writes: Python
`requests` with the PEM files, and Java's HttpClient with the PKCS#12
keystore and truststore (tests/e2e/JavaClient.java, run as a single-file
program).  Each must get through with its certificate's CN at the backend.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from .harness import Backend, Echo, ProxyLauncher

pytestmark = pytest.mark.e2e

MTLSPROXY = Path(sys.executable).parent / "mtlsproxy"
JAVA_CLIENT = Path(__file__).resolve().parent / "JavaClient.java"


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("clients-pki") / "ca"
    subprocess.run(
        [str(MTLSPROXY), "pki", "init", str(d), "--p12"], check=True, capture_output=True
    )
    return d


def _password(path: Path) -> str:
    return path.read_text().rstrip("\n")


def _start(launcher: ProxyLauncher, ca_dir: Path):
    return launcher.start(
        cert=ca_dir / "server-cert.pem", key=ca_dir / "server-key.pem", ca=ca_dir / "ca-cert.pem"
    )


def test_python_requests_client(launcher: ProxyLauncher, backend: Backend, ca_dir: Path) -> None:
    """requests with cert=(client-cert.pem, client-key.pem) and verify=ca-cert.pem."""
    proxy = _start(launcher, ca_dir)
    response = requests.get(
        proxy.url("/echo/requests"),
        cert=(str(ca_dir / "client-cert.pem"), str(ca_dir / "client-key.pem")),
        verify=str(ca_dir / "ca-cert.pem"),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert Echo.parse(response.content).values("X-Client-Cert-CN") == ["client"]
    proxy.wait_for_log(r' client "GET /echo/requests HTTP/1\.1" 200 ')


def test_java_http_client(launcher: ProxyLauncher, backend: Backend, ca_dir: Path) -> None:
    """java JavaClient.java with client-keystore.p12 and client-truststore.p12."""
    java = shutil.which("java")
    if java is None:
        pytest.skip("java (Java 11 or later) is not installed")
    proxy = _start(launcher, ca_dir)
    done = subprocess.run(
        [
            java, str(JAVA_CLIENT), proxy.url("/echo/java"),
            str(ca_dir / "client-keystore.p12"), _password(ca_dir / "client-keystore.pass"),
            str(ca_dir / "client-truststore.p12"), _password(ca_dir / "client-truststore.pass"),
        ],
        capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, f"{out}\n{done.stderr.decode(errors='replace')}"
    status, _, body = out.partition("\n")
    assert status == "200", out
    assert Echo.parse(body.encode()).values("X-Client-Cert-CN") == ["client"]
    proxy.wait_for_log(r' client "GET /echo/java HTTP/1\.1" 200 ')
