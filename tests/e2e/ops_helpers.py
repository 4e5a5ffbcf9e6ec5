"""
Helpers for L{tests.e2e.test_operations}: certificate files that a test may
replace under a running proxy, the served certificate as a client sees it, log
line counting, an C{sd_notify} receiver, C{/metrics} scraping and
C{mtlsproxy check} as a subprocess.

Like the harness, everything synchronises by polling with a deadline
(L{harness.wait_for}), never by sleeping.
"""

from __future__ import annotations

import dataclasses
import datetime
import http.client
import ipaddress
import os
import re
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests import certfactory as cf

from .harness import (
    ClientCert,
    ConnectionClosed,
    HttpResponse,
    Proxy,
    ProxyLauncher,
    TlsConnection,
    build_request,
    read_response,
    require,
    wait_for,
)

MTLSPROXY = Path(sys.executable).parent / "mtlsproxy"

#: The log lines of a reload (service.ProxyService.reload).
#: a reload that swapped in new material, or found the same material and kept it
RELOADED = r"reloaded certificates, CA and CRLs|CA and CRLs unchanged, nothing to do"
RELOAD_FAILED = r"reload failed, keeping the current certificates"


# -- certificates ------------------------------------------------------------------


def make_server_cert(
    ca: cf.Issued,
    cn: str = "localhost",
    names: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    not_after: datetime.datetime | None = None,
) -> cf.Issued:
    """
    A server certificate as L{cf.make_server} makes it (subjectAltName,
    serverAuth), with its own CN and, if given, its own notAfter.
    """
    key = cf.new_key()
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        cf._builder(ca, subject, key, not_after=not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    return cf.Issued(cert, key, ())


def replace_file(path: Path, data: bytes) -> None:
    """Replace C{path} the way certbot and cert-manager do: a new file renamed over it."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclasses.dataclass
class ServerFiles:
    """A server certificate and key file of the test's own, safe to replace."""

    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path, issued: cf.Issued) -> ServerFiles:
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = issued.write(directory, "own-server")
        return cls(cert, key)

    def install(self, issued: cf.Issued) -> None:
        """Put a new certificate and key in place (key first, each by rename)."""
        replace_file(self.key, issued.key_pem())
        replace_file(self.cert, issued.cert_pem())


def write_crl(
    path: Path,
    ca: cf.Issued,
    revoked: Sequence[x509.Certificate],
    next_update_days: float = 7,
) -> Path:
    """A PEM CRL from C{ca} listing C{revoked}, put in place by rename."""
    crl = cf.make_crl(ca, list(revoked), next_update_days=next_update_days)
    replace_file(path, crl.public_bytes(serialization.Encoding.PEM))
    return path


def keystore_bytes(issued: cf.Issued, password: str) -> bytes:
    """A PKCS#12 keystore holding C{issued}'s key, certificate and chain."""
    return pkcs12.serialize_key_and_certificates(
        b"server",
        issued.key,
        issued.cert,
        list(issued.chain) or None,
        serialization.BestAvailableEncryption(password.encode()),
    )


def client_files(directory: Path, issued: cf.Issued, cn: str) -> ClientCert:
    """A client certificate from any CA (not only the test PKI's), as L{Proxy.tls} takes it."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = issued.write(directory, f"client-{cn}")
    return ClientCert(cn, cn, cert, key, issued)


def obey_file_permissions(launcher: ProxyLauncher) -> None:
    """
    Make the proxies C{launcher} starts from now on subject to file
    permissions, as the C{mtlsproxy} service user is under systemd.

    The tests run as root, which reads any file whatever its mode; so, as
    root, the proxy runs under C{setpriv} without the two capabilities that
    bypass permission checks (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH).  A
    file of root's with mode 0000 is then unreadable to it, and the Python
    installation under /root (0700, root's own) stays readable.
    """
    if os.geteuid() != 0:
        return  # an ordinary user obeys file permissions already
    setpriv = require("setpriv")
    caps = "-dac_override,-dac_read_search"
    command = launcher.command
    launcher.command = lambda args: [  # type: ignore[method-assign]
        setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", *command(args)
    ]


def served_certificate(conn: TlsConnection) -> x509.Certificate:
    """The leaf certificate the proxy presented on this connection."""
    der = conn.sock.getpeercert(binary_form=True)
    assert der, "the proxy presented no certificate"
    return x509.load_der_x509_certificate(der)


def new_connection_serial(proxy: Proxy) -> int:
    """Open a new connection, make one request on it, return the served certificate's serial."""
    with proxy.tls() as conn:
        response = conn.request("GET", "/echo/serial")
        assert response.status == 200, response
        return served_certificate(conn).serial_number


# -- the proxy's log ---------------------------------------------------------------


def log_count(proxy: Proxy, pattern: str) -> int:
    return len(re.findall(pattern, proxy.log_text()))


def wait_for_log_count(proxy: Proxy, pattern: str, count: int, timeout: float = 10.0) -> None:
    """Wait until the regex C{pattern} matches at least C{count} times in the log."""
    try:
        wait_for(
            lambda: log_count(proxy, pattern) >= count,
            timeout,
            f"{count} x /{pattern}/ in the log",
        )
    except AssertionError as e:
        raise AssertionError(f"{e}; proxy log:\n{proxy.log_text()[-5000:]}") from None


# -- resumption --------------------------------------------------------------------


@dataclasses.dataclass
class ResumeAttempt:
    """
    What a client offering an old session got.

    @ivar resumed: whether the handshake resumed the session; C{None} when the
        handshake itself failed (so it was a full handshake, and refused).
    """

    local_port: int
    resumed: bool | None
    handshake_error: str | None
    response: HttpResponse | None
    error: str | None

    @property
    def peer(self) -> str:
        return f"127.0.0.1:{self.local_port}"


def attempt_with_session(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession, timeout: float = 10.0
) -> ResumeAttempt:
    """Handshake offering C{session}, then one request; report instead of raising."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    local_port = raw.getsockname()[1]
    try:
        sock = context.wrap_socket(raw, server_hostname="localhost", session=session)
    except (ssl.SSLError, OSError) as e:
        raw.close()
        return ResumeAttempt(local_port, None, repr(e), None, None)
    resumed = sock.session_reused
    rfile = sock.makefile("rb")
    try:
        sock.sendall(build_request("GET", "/echo/resume", host=f"localhost:{port}"))
        return ResumeAttempt(local_port, resumed, None, read_response(rfile), None)
    except (ssl.SSLError, OSError, ConnectionClosed) as e:
        return ResumeAttempt(local_port, resumed, None, None, repr(e))
    finally:
        rfile.close()
        sock.close()


# -- sd_notify ---------------------------------------------------------------------


def listening_tcp_ports() -> set[int]:
    """Every TCP port in state LISTEN in this network namespace (IPv4 and IPv6)."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@dataclasses.dataclass(frozen=True)
class Notification:
    """
    One sd_notify datagram, when it came, and which ports listened at that
    moment; C{seen}: what the socket's C{snapshot} returned at that moment.
    """

    text: str
    received: float
    listening: frozenset[int]
    seen: object = None

    @property
    def fields(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.text.splitlines() if "=" in line)

    @property
    def state(self) -> str:
        """The first line: C{READY=1}, C{RELOADING=1}, C{STOPPING=1}."""
        return self.text.splitlines()[0] if self.text else ""


class NotifySocket:
    """
    What systemd does for C{Type=notify}: an C{AF_UNIX} datagram socket named by
    C{NOTIFY_SOCKET}, here read by a thread that notes each message as it arrives.

    @ivar snapshot: if set, called as each message arrives; its result is the
        message's C{seen} (e.g. the proxy's log at that moment).
    """

    def __init__(self, snapshot: Callable[[], object] | None = None) -> None:
        self.snapshot = snapshot
        # A short path: AF_UNIX addresses are limited to 107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="mtlsn-", dir="/tmp"))
        self.path = self.dir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self._lock = threading.Lock()
        self._messages: list[Notification] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if not ready:
                continue
            data = self.sock.recv(65536)
            message = Notification(
                data.decode("utf-8", "replace"), time.monotonic(),
                frozenset(listening_tcp_ports()),
                self.snapshot() if self.snapshot is not None else None,
            )
            with self._lock:
                self._messages.append(message)

    @property
    def messages(self) -> list[Notification]:
        with self._lock:
            return list(self._messages)

    def states(self) -> list[str]:
        return [m.state for m in self.messages]

    def wait_for_states(self, expected: Sequence[str], timeout: float = 10.0) -> None:
        """Wait until the states received so far are exactly C{expected}."""
        try:
            wait_for(lambda: self.states() == list(expected), timeout, f"notifications {expected}")
        except AssertionError as e:
            raise AssertionError(f"{e}; received {self.messages}") from None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- metrics -----------------------------------------------------------------------


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, str, str]:
    """GET over plain HTTP from 127.0.0.1:C{port}: (status, content type, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
        return response.status, response.getheader("Content-Type") or "", body
    finally:
        conn.close()


class Scrape:
    """One C{/metrics} answer, parsed by prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families: dict[str, Metric] = {
            f.name: f for f in text_string_to_metric_families(text)
        }

    @classmethod
    def get(cls, port: int) -> Scrape:
        status, _, body = http_get(port, "/metrics")
        assert status == 200, f"/metrics answered {status}: {body[:500]}"
        return cls(body)

    def values(self, sample: str, **labels: str) -> list[float]:
        """Every value of sample C{sample} (full name) whose labels include C{labels}."""
        return [
            s.value
            for family in self.families.values()
            for s in family.samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, sample: str, **labels: str) -> float:
        """The one value of C{sample} with exactly these labels (among others)."""
        found = self.values(sample, **labels)
        assert len(found) == 1, f"{sample}{labels}: {found}\n{self.text}"
        return found[0]

    def total(self, sample: str, **labels: str) -> float:
        return sum(self.values(sample, **labels))


def wait_for_metric(
    port: int, check: Callable[[Scrape], bool], what: str, timeout: float = 10.0
) -> Scrape:
    """Scrape until C{check} holds; return that scrape."""
    last: list[Scrape] = []

    def poll() -> Scrape | None:
        scrape = Scrape.get(port)
        last[:] = [scrape]
        return scrape if check(scrape) else None

    try:
        return wait_for(poll, timeout, what, interval=0.1)
    except AssertionError as e:
        text = last[0].text if last else "(no scrape)"
        raise AssertionError(f"{e}; last scrape:\n{text}") from None


# -- mtlsproxy check -----------------------------------------------------------------


def run_check(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """C{mtlsproxy check ARGS} from the virtualenv, with no MTLSPROXY_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTLSPROXY_")}
    return subprocess.run(
        [str(MTLSPROXY), "check", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=timeout,
    )
