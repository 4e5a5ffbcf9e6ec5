"""
End-to-end harness: real processes, real sockets, real clients.

Everything here is plain Python so that fixtures of any scope (see
C{conftest.py}) and C{tests/test_legacy_app.py} can use it:

  - L{Pki}: a CA, a server certificate and client certificates (good and
    hostile ones), made on demand with L{tests.certfactory} and written to a
    directory;
  - L{Backend}: C{examples/legacy_app.py} as a subprocess, with its request log;
  - L{Proxy} / L{ProxyLauncher}: C{twistd -n mtlsproxy ...} as a subprocess,
    its log, its memory figures;
  - clients: curl (L{Proxy.curl}), C{openssl s_client} (L{Proxy.s_client}) and
    raw HTTP/1.1 over Python's C{ssl} (L{Proxy.tls}, L{TlsConnection}), so that
    tests can send exact bytes and read exact responses.

Synchronisation is always "poll a condition until a deadline" (L{wait_for}),
never a bare sleep.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests import certfactory as cf

REPO = Path(__file__).resolve().parents[2]
LEGACY_APP = REPO / "examples" / "legacy_app.py"
TWISTD = Path(sys.executable).parent / "twistd"
START_TIMEOUT = 15.0
PATTERN = bytes(range(256))
MiB = 1024 * 1024

#: the headers only mtlsproxy may set, in canonical form (see L{canonical})
IDENTITY_HEADERS = (
    "x-client-cert-cn",
    "x-forwarded-client-cert",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
)


def terminate(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after C{grace} seconds; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class WaitTimeout(AssertionError):
    """A condition polled by L{wait_for} did not come true in time."""


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """
    Poll C{predicate} until it returns something true, and return that.

    @raise WaitTimeout: after C{timeout} seconds, naming C{what} was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def require(tool: str) -> str:
    """The path of an external tool, or skip the test if it is not installed."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def canonical(name: str) -> str:
    """A header name as WSGI/CGI backends see it: case and C{-}/C{_} do not matter."""
    return name.strip().lower().replace("_", "-")


# -- the body pattern legacy_app serves and tests send -------------------------


def iter_pattern(size: int, block: int = MiB) -> Iterator[bytes]:
    """C{size} bytes of C{bytes(range(256))} repeated, in blocks of C{block} bytes."""
    unit = PATTERN * (block // len(PATTERN) + 1)
    sent = 0
    while sent < size:
        n = min(block, size - sent)
        offset = sent % len(PATTERN)
        yield unit[offset : offset + n]
        sent += n


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for chunk in iter_pattern(size):
        digest.update(chunk)
    return digest.hexdigest()


def write_pattern_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for chunk in iter_pattern(size):
            f.write(chunk)
    return path


# -- certificates ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClientCert:
    """A client certificate file (leaf, then chain) and its key file."""

    kind: str
    cn: str | None
    cert: Path
    key: Path
    issued: cf.Issued


@dataclasses.dataclass(frozen=True)
class Store:
    """A PKCS#12 file, its password and a password file (with a trailing newline)."""

    path: Path
    password: str
    password_file: Path


#: hostile common names, by kind
HOSTILE_CNS = {
    "crlf-cn": "mallory\r\nX-Injected: yes",
    "unicode-cn": "J\u00fcrgen \u2603",
    "percent-cn": "100%club",
}


class Pki:
    """
    A root CA, a server certificate (SAN localhost, 127.0.0.1, ::1) and a
    valid client (CN C{client}), written to C{directory}; other clients are made
    on first use by L{get}:

      - C{intermediate}: CN C{chained-client} under an intermediate CA; the
        certificate file holds leaf and intermediate, the proxy trusts the root;
      - C{rogue}: CN C{client} from a CA the proxy does not trust;
      - C{expired}, C{not-yet-valid}: CN C{client}, outside their validity;
      - C{server-auth-only}: extendedKeyUsage serverAuth only;
      - C{no-eku}: no extendedKeyUsage at all (acceptable for any purpose);
      - C{no-cn}: no common name, only a subjectAltName;
      - C{crlf-cn}, C{unicode-cn}, C{percent-cn}: see L{HOSTILE_CNS};
      - C{revoked}: listed in L{crl};
      - any other kind: a valid client whose CN is the kind itself (C{bob}).
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._clients: dict[str, ClientCert] = {}
        self._cache: dict[str, Any] = {}
        self.ca = cf.make_ca("mtlsproxy e2e CA")
        self.ca_cert = self.dir / "ca-cert.pem"
        self.ca_cert.write_bytes(cf.pem(self.ca.cert))
        self.server = cf.make_server(self.ca)
        self.server_cert, self.server_key = self.server.write(self.dir, "server")
        self.client = self.get("client")

    def _intermediate(self) -> cf.Issued:
        if "intermediate" not in self._cache:
            self._cache["intermediate"] = cf.make_intermediate(
                self.ca, "mtlsproxy e2e intermediate"
            )
        return self._cache["intermediate"]

    def _rogue_ca(self) -> cf.Issued:
        if "rogue" not in self._cache:
            self._cache["rogue"] = cf.make_ca("rogue CA")
        return self._cache["rogue"]

    def _issue(self, kind: str) -> tuple[cf.Issued, str | None]:
        ca = self.ca
        if kind == "intermediate":
            return cf.make_client(self._intermediate(), "chained-client"), "chained-client"
        if kind == "rogue":
            return cf.make_client(self._rogue_ca(), "client"), "client"
        if kind == "expired":
            return cf.make_client(
                ca, "client", not_before=cf.days_ago(30), not_after=cf.days_ago(1)
            ), "client"
        if kind == "not-yet-valid":
            return cf.make_client(
                ca, "client", not_before=cf.days_ahead(1), not_after=cf.days_ahead(30)
            ), "client"
        if kind == "server-auth-only":
            return cf.make_client(ca, "client", eku=[ExtendedKeyUsageOID.SERVER_AUTH]), "client"
        if kind == "no-eku":
            return cf.make_client(ca, "no-eku-client", eku=None), "no-eku-client"
        if kind == "no-cn":
            return cf.make_client(
                ca, None, sans=[x509.DNSName("no-cn.client.test")]
            ), None
        if kind in HOSTILE_CNS:
            return cf.make_client(ca, HOSTILE_CNS[kind]), HOSTILE_CNS[kind]
        if kind == "revoked":
            return cf.make_client(ca, "revoked-client"), "revoked-client"
        return cf.make_client(ca, kind), kind

    def get(self, kind: str) -> ClientCert:
        """The client certificate of that kind, made and written on first use."""
        with self._lock:
            if kind not in self._clients:
                issued, cn = self._issue(kind)
                cert, key = issued.write(self.dir, f"client-{kind}")
                self._clients[kind] = ClientCert(kind, cn, cert, key, issued)
            return self._clients[kind]

    def crl(self) -> Path:
        """A PEM CRL from the root CA revoking the C{revoked} client."""
        revoked = self.get("revoked")
        with self._lock:
            path = self.dir / "crl.pem"
            if not path.exists():
                crl = cf.make_crl(self.ca, [revoked.issued.cert])
                path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
            return path

    def keystore(self) -> Store:
        """PKCS#12 with the server key, certificate and chain; password in a file."""
        with self._lock:
            if "keystore" not in self._cache:
                password = "keystore-secret"
                path = self.dir / "server-keystore.p12"
                path.write_bytes(
                    pkcs12.serialize_key_and_certificates(
                        b"server",
                        self.server.key,
                        self.server.cert,
                        list(self.server.chain) or None,
                        serialization.BestAvailableEncryption(password.encode()),
                    )
                )
                self._cache["keystore"] = Store(path, password, self._password_file(
                    "server-keystore.pass", password))
            return self._cache["keystore"]

    def truststore(self) -> Store:
        """A keytool-style PKCS#12 truststore holding only the root CA certificate."""
        with self._lock:
            if "truststore" not in self._cache:
                password = "truststore-secret"
                path = self.dir / "server-truststore.p12"
                encryption = serialization.BestAvailableEncryption(password.encode())
                data = pkcs12.serialize_java_truststore(
                    [pkcs12.PKCS12Certificate(self.ca.cert, b"mtlsproxy-e2e-ca")], encryption
                )
                path.write_bytes(data)
                self._cache["truststore"] = Store(path, password, self._password_file(
                    "server-truststore.pass", password))
            return self._cache["truststore"]

    def _password_file(self, name: str, password: str) -> Path:
        path = self.dir / name
        path.write_text(password + "\n")
        path.chmod(0o600)
        return path

    def write(self, name: str, data: bytes | str) -> Path:
        """An arbitrary file beside the certificates (for broken-file tests)."""
        path = self.dir / name
        if isinstance(data, str):
            data = data.encode()
        path.write_bytes(data)
        return path


# -- HTTP over a raw (TLS) socket ------------------------------------------------


class ConnectionClosed(Exception):
    """The peer closed the connection where a response was expected."""


@dataclasses.dataclass
class Echo:
    """What legacy_app's echo saw: the request as it arrived at the backend."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body_length: int
    body_sha256: str

    @classmethod
    def parse(cls, body: bytes) -> Echo:
        doc = json.loads(body)
        return cls(
            doc["method"],
            doc["target"],
            doc["version"],
            [(n, v) for n, v in doc["headers"]],
            doc["body_length"],
            doc["body_sha256"],
        )

    def values(self, name: str) -> list[str]:
        """Values of every header whose name is C{name}, ignoring case and C{-}/C{_}."""
        wanted = canonical(name)
        return [v for n, v in self.headers if canonical(n) == wanted]

    def names(self) -> list[str]:
        return [canonical(n) for n, _ in self.headers]

    def identity_headers(self) -> list[tuple[str, str]]:
        """The headers only mtlsproxy may set, and any C{X-Client-Cert*} ones."""
        return [
            (n, v)
            for n, v in self.headers
            if canonical(n) in IDENTITY_HEADERS or canonical(n).startswith("x-client-cert")
        ]


@dataclasses.dataclass
class HttpResponse:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    interim: list[int] = dataclasses.field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)

    def echo(self) -> Echo:
        assert self.status == 200, f"expected 200, got {self.status}: {self.body[:500]!r}"
        return Echo.parse(self.body)

    @property
    def closes(self) -> bool:
        tokens = {t.strip().lower() for v in self.header_all("Connection") for t in v.split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" not in tokens
        return "close" in tokens


def _read_header_block(rfile: BinaryIO) -> list[tuple[str, str]]:
    headers = []
    while True:
        line = rfile.readline(65537)
        if not line:
            raise ConnectionClosed("connection closed inside the response headers")
        if line in (b"\r\n", b"\n"):
            return headers
        name, _, value = line.rstrip(b"\r\n").partition(b":")
        headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))


def read_response(rfile: BinaryIO, method: str = "GET") -> HttpResponse:
    """Read one HTTP/1.x response (skipping 1xx) and its body, framed as RFC 9112 says."""
    interim: list[int] = []
    while True:
        line = rfile.readline(65537)
        if not line:
            raise ConnectionClosed("connection closed before a response")
        parts = line.rstrip(b"\r\n").decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise AssertionError(f"not an HTTP status line: {line!r}")
        version, status = parts[0], int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        headers = _read_header_block(rfile)
        if 100 <= status < 200 and status != 101:
            interim.append(status)
            continue
        break
    response = HttpResponse(version, status, reason, headers, b"", interim)
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return response
    transfer_encoding = ",".join(response.header_all("Transfer-Encoding")).lower()
    if "chunked" in transfer_encoding:
        body = bytearray()
        while True:
            size_line = rfile.readline(65537)
            if not size_line:
                raise ConnectionClosed("connection closed inside a chunked body")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                _read_header_block(rfile)
                break
            chunk = rfile.read(size)
            if len(chunk) != size:
                raise ConnectionClosed("connection closed inside a chunk")
            body += chunk
            rfile.readline(3)
        response.body = bytes(body)
    elif response.header("Content-Length") is not None:
        length = int(response.header("Content-Length") or "0")
        body = rfile.read(length)
        if len(body) != length:
            raise ConnectionClosed(f"connection closed after {len(body)} of {length} body bytes")
        response.body = body
    else:
        response.body = rfile.read()
    return response


def build_request(
    method: str = "GET",
    target: str = "/echo",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    version: str = "HTTP/1.1",
    host: str | None = "localhost",
) -> bytes:
    """
    The exact bytes of a request.  C{Host} first unless C{host} is None; a
    C{Content-Length} is added for a non-empty body unless the headers frame it.
    """
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines.extend(f"{n}: {v}" for n, v in headers)
    framed = {n.lower() for n, _ in headers} & {"content-length", "transfer-encoding"}
    if body and not framed:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def tls_context(
    ca: Path,
    client: ClientCert | None,
    min_version: ssl.TLSVersion | None = None,
    max_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client context that verifies the proxy's certificate for C{localhost}."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    if min_version is not None:
        ctx.minimum_version = min_version
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


class TlsConnection:
    """
    One TLS connection to the proxy, speaking raw HTTP/1.1.

    The handshake happens in the constructor; with TLS 1.3 a refused client
    certificate only shows when reading (see L{attempt_request}).
    """

    def __init__(
        self,
        port: int,
        context: ssl.SSLContext,
        session: ssl.SSLSession | None = None,
        server_hostname: str = "localhost",
        timeout: float = 15.0,
    ) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.local_port: int = raw.getsockname()[1]
        try:
            self.sock = context.wrap_socket(raw, server_hostname=server_hostname, session=session)
        except BaseException:
            raw.close()
            raise
        self.rfile = self.sock.makefile("rb")
        self.host = f"localhost:{port}"

    def __enter__(self) -> TlsConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def session(self) -> ssl.SSLSession | None:
        return self.sock.session

    @property
    def session_reused(self) -> bool:
        return self.sock.session_reused

    @property
    def peer(self) -> str:
        """This end as the proxy sees it, C{127.0.0.1:PORT} (its logs use that)."""
        return f"127.0.0.1:{self.local_port}"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_response(self, method: str = "GET") -> HttpResponse:
        return read_response(self.rfile, method)

    def request(
        self,
        method: str = "GET",
        target: str = "/echo",
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        version: str = "HTTP/1.1",
        host: str | None = None,
    ) -> HttpResponse:
        """Send one request (C{Host} is C{localhost:PORT} unless given) and read its response."""
        self.send(build_request(method, target, headers, body, version, host or self.host))
        return self.read_response(method)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """
        Whether the proxy closes this connection within C{timeout} seconds
        (reading nothing more).  Use once, at the end: after a timeout the
        connection is unusable.
        """
        self.sock.settimeout(timeout)
        try:
            data = self.rfile.read(1)
        except TimeoutError:
            return False
        except (ssl.SSLError, ConnectionError, OSError):
            return True
        return data == b""

    def close(self) -> None:
        try:
            self.rfile.close()
            self.sock.close()
        except OSError:
            pass


def collect(conn: TlsConnection, quiet: float = 1.5) -> tuple[bytes, bool]:
    """
    Everything the proxy sends on C{conn} until it closes the connection
    (True) or stays silent for C{quiet} seconds (False).
    """
    conn.sock.settimeout(quiet)
    data = bytearray()
    while True:
        try:
            piece = conn.sock.recv(65536)
        except TimeoutError:
            return bytes(data), False
        except (ssl.SSLError, ConnectionError, OSError):
            return bytes(data), True
        if not piece:
            return bytes(data), True
        data += piece


@dataclasses.dataclass
class Attempt:
    """What a client got when it tried a request: an HTTP response, or a failure."""

    local_port: int | None
    handshake_error: str | None
    error: str | None
    data: bytes

    @property
    def refused(self) -> bool:
        """No HTTP response came back at all."""
        return b"HTTP/" not in self.data

    @property
    def peer(self) -> str:
        return f"127.0.0.1:{self.local_port}"


def attempt_request(
    port: int,
    context: ssl.SSLContext,
    request: bytes = b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    timeout: float = 10.0,
) -> Attempt:
    """
    Connect, handshake, send C{request} and read whatever comes back until the
    connection ends, without raising for TLS failures (TLS 1.2 refuses a client
    during the handshake, TLS 1.3 after it, at the first read).
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    local_port = raw.getsockname()[1]
    try:
        sock = context.wrap_socket(raw, server_hostname="localhost")
    except (ssl.SSLError, OSError) as e:
        raw.close()
        return Attempt(local_port, repr(e), None, b"")
    data = bytearray()
    error = None
    try:
        sock.sendall(request)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ssl.SSLError, OSError) as e:
        error = repr(e)
    finally:
        sock.close()
    return Attempt(local_port, None, error, bytes(data))


# -- legacy_app ------------------------------------------------------------------


class Backend:
    """C{examples/legacy_app.py} running as a subprocess."""

    def __init__(
        self,
        proc: subprocess.Popen[str],
        url: str,
        request_log: Path,
        stderr_path: Path,
        port: int | None,
        socket_path: Path | None,
        socket_dir: Path | None,
    ) -> None:
        self.proc = proc
        self.url = url
        self.request_log = request_log
        self.stderr_path = stderr_path
        self.port = port
        self.socket_path = socket_path
        self._socket_dir = socket_dir

    @classmethod
    def start(cls, workdir: Path, unix: bool = False, timeout: float = 10.0) -> Backend:
        """
        Start the app on a free loopback port (the app picks it: port 0), or on a
        unix socket in a short-named directory under /tmp (socket paths are
        limited to 107 bytes), and wait for its "listening" line.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        request_log = workdir / "app-requests.log"
        request_log.touch()
        stderr_path = workdir / "app-stderr.log"
        socket_dir = socket_path = None
        if unix:
            socket_dir = Path(tempfile.mkdtemp(prefix="mtlsp-", dir="/tmp"))
            socket_path = socket_dir / "app.sock"
            where = ["--unix", str(socket_path)]
        else:
            where = ["--listen", "127.0.0.1:0"]
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, str(LEGACY_APP), *where, "--request-log", str(request_log)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                text=True,
                cwd=workdir,
            )
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while not line.endswith("\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(left, 0))
            if not ready:
                proc.kill()
                proc.wait()
                raise WaitTimeout(
                    f"legacy_app did not say it was listening within {timeout:g} s:\n"
                    + stderr_path.read_text(errors="replace")
                )
            piece = proc.stdout.readline()
            if not piece:
                proc.wait()
                raise AssertionError(
                    f"legacy_app exited with {proc.returncode} before listening:\n"
                    + stderr_path.read_text(errors="replace")
                )
            line += piece
        match = re.fullmatch(r"legacy app listening on (\S+)\n", line)
        assert match, f"unexpected first line from legacy_app: {line!r}"
        url = match.group(1)
        port = None
        if not unix:
            port = int(url.rsplit(":", 1)[1])
        return cls(proc, url, request_log, stderr_path, port, socket_path, socket_dir)

    def requests(self) -> list[str]:
        """The request line of every request the app received so far, in order."""
        return self.request_log.read_text(encoding="ascii").splitlines()

    def stop(self) -> None:
        terminate(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)


# -- the proxy ---------------------------------------------------------------------


class Rss(NamedTuple):
    """Resident memory of a process in KiB: now (VmRSS) and the peak so far (VmHWM)."""

    current: int
    peak: int


@dataclasses.dataclass
class CurlResult:
    returncode: int
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    stderr: str
    args: list[str]

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def echo(self) -> Echo:
        assert self.returncode == 0 and self.status == 200, self.describe()
        return Echo.parse(self.body)

    def json(self) -> Any:
        return json.loads(self.body)

    def describe(self) -> str:
        return (
            f"curl exit {self.returncode}, HTTP {self.status}\nargs: {self.args}\n"
            f"stderr: {self.stderr}\nbody: {self.body[:1000]!r}"
        )


def _parse_curl_headers(text: str) -> list[tuple[str, str]]:
    """Headers of the last response block curl dumped (after any 100 Continue)."""
    blocks = [b for b in re.split(r"\r?\n\r?\n", text) if b.strip()]
    if not blocks:
        return []
    headers = []
    for line in blocks[-1].splitlines()[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return headers


class Proxy:
    """A running C{twistd -n mtlsproxy}, with clients aimed at it."""

    def __init__(
        self, proc: subprocess.Popen[bytes], port: int, log_path: Path, args: list[str], pki: Pki
    ) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.args = args
        self.pki = pki

    # -- process -----------------------------------------------------------

    def log_text(self) -> str:
        """Everything the proxy wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The first match of the regex C{pattern} in the log, waiting for it to appear."""
        regex = re.compile(pattern)
        try:
            return wait_for(lambda: regex.search(self.log_text()), timeout, f"log /{pattern}/")
        except WaitTimeout as e:
            raise WaitTimeout(f"{e}; proxy log:\n{self.log_text()[-5000:]}") from None

    def pids(self) -> list[int]:
        """The proxy's process and all its descendants (worker processes, if any)."""
        found = [self.proc.pid]
        for pid in found:
            for children in Path(f"/proc/{pid}/task").glob("*/children"):
                try:
                    found.extend(int(c) for c in children.read_text().split())
                except OSError:
                    pass
        return found

    def rss_kib(self) -> Rss:
        """
        VmRSS and VmHWM (peak RSS) from /proc, summed over the proxy's process
        tree (a single process unless --workers makes more).
        """
        current = peak = 0
        for pid in self.pids():
            fields = {}
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        key, _, value = line.partition(":")
                        if key in ("VmRSS", "VmHWM"):
                            fields[key] = int(value.split()[0])
            except OSError:
                continue
            current += fields.get("VmRSS", 0)
            peak += fields.get("VmHWM", 0)
        assert peak, f"no memory figures for the proxy (pid {self.proc.pid})"
        return Rss(current, peak)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait up to C{timeout} seconds, then SIGKILL; return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        return self.proc.returncode

    def url(self, path: str = "/") -> str:
        return f"https://localhost:{self.port}{path}"

    # -- clients -----------------------------------------------------------

    def _client(self, client: ClientCert | None | str) -> ClientCert | None:
        if isinstance(client, str):
            return self.pki.get(client)
        return client

    def context(
        self,
        client: ClientCert | None | str = "client",
        min_version: ssl.TLSVersion | None = None,
        max_version: ssl.TLSVersion | None = None,
    ) -> ssl.SSLContext:
        """A Python ssl client context trusting the test CA, with C{client}'s certificate."""
        return tls_context(self.pki.ca_cert, self._client(client), min_version, max_version)

    def tls(
        self,
        client: ClientCert | None | str = "client",
        context: ssl.SSLContext | None = None,
        session: ssl.SSLSession | None = None,
        timeout: float = 15.0,
    ) -> TlsConnection:
        """A raw HTTP/1.1 connection over TLS (use as a context manager)."""
        return TlsConnection(self.port, context or self.context(client), session, timeout=timeout)

    def attempt(
        self,
        client: ClientCert | None | str = "client",
        request: bytes | None = None,
        max_version: ssl.TLSVersion | None = None,
    ) -> Attempt:
        """Try one request with Python ssl, reporting rather than raising TLS failures."""
        ctx = self.context(client, max_version=max_version)
        if request is None:
            return attempt_request(self.port, ctx)
        return attempt_request(self.port, ctx, request)

    def curl_command(
        self,
        path: str,
        *args: str,
        client: ClientCert | None | str = "client",
        timeout: float = 60.0,
    ) -> list[str]:
        """The curl command line for C{path} (no output options); localhost is 127.0.0.1."""
        command = [
            require("curl"), "-q", "-sS", "--noproxy", "*",
            "--resolve", f"localhost:{self.port}:127.0.0.1",
            "--cacert", str(self.pki.ca_cert), "--max-time", f"{timeout:g}",
        ]
        cert = self._client(client)
        if cert is not None:
            command += ["--cert", str(cert.cert), "--key", str(cert.key)]
        return [*command, *args, self.url(path)]

    def curl(
        self,
        path: str,
        *args: str,
        client: ClientCert | None | str = "client",
        timeout: float = 60.0,
    ) -> CurlResult:
        """
        Run curl against C{path} (extra curl C{args} before the URL); return
        exit status, HTTP status (0 when there was no response), the final
        response's headers and the body.
        """
        with tempfile.TemporaryDirectory(prefix="curl-") as tmp:
            head = Path(tmp) / "headers"
            body = Path(tmp) / "body"
            command = self.curl_command(path, *args, client=client, timeout=timeout)
            command[-1:-1] = ["-D", str(head), "-o", str(body), "-w", "%{http_code}"]
            done = subprocess.run(
                command, capture_output=True, timeout=timeout + 30, stdin=subprocess.DEVNULL
            )
            stdout = done.stdout.decode(errors="replace").strip()
            return CurlResult(
                done.returncode,
                int(stdout) if stdout.isdigit() else 0,
                _parse_curl_headers(head.read_text(errors="replace")) if head.exists() else [],
                body.read_bytes() if body.exists() else b"",
                done.stderr.decode(errors="replace"),
                command,
            )

    def s_client(
        self,
        *args: str,
        client: ClientCert | None | str = "client",
        request: bytes = b"",
        timeout: float = 20.0,
    ) -> tuple[int | None, str]:
        """
        Run C{openssl s_client} (with C{-ign_eof}: it reads until the proxy closes),
        writing C{request} to it; return its exit status (None if it had to be
        killed at C{timeout}) and its combined output.
        """
        command = [
            require("openssl"), "s_client",
            "-connect", f"127.0.0.1:{self.port}", "-servername", "localhost",
            "-CAfile", str(self.pki.ca_cert), "-verify_return_error", "-ign_eof",
        ]
        cert = self._client(client)
        if cert is not None:
            command += ["-cert", str(cert.cert), "-key", str(cert.key)]
        command += list(args)
        try:
            done = subprocess.run(
                command, input=request, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            out = e.stdout or b""
            return None, out.decode(errors="replace")
        return done.returncode, done.stdout.decode(errors="replace")


_DEFAULT: Any = object()


class ProxyLauncher:
    """
    Starts proxies for one test (or module) in C{workdir}, with the standard
    C{--listen/--backend/--cert/--key/--ca} options, and stops them all at the end.
    """

    def __init__(self, pki: Pki, workdir: Path, backend_url: str | Callable[[], str]) -> None:
        self.pki = pki
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._backend_url = backend_url
        self.proxies: list[Proxy] = []
        self._count = 0

    @property
    def backend_url(self) -> str:
        url = self._backend_url
        return url() if callable(url) else url

    def args(
        self,
        *extra: str,
        port: int | None = None,
        listen: str | None = None,
        backend: str | None = _DEFAULT,
        cert: Path | str | None = _DEFAULT,
        key: Path | str | None = _DEFAULT,
        ca: Path | str | None = _DEFAULT,
    ) -> list[str]:
        """
        The options after C{mtlsproxy}: the standard ones (each can be
        replaced, or left out with C{None}), then C{extra}.
        """
        if listen is None and port is not None:
            listen = f"tcp:{port}:interface=127.0.0.1"
        defaults = {
            "--listen": listen,
            "--backend": self.backend_url if backend is _DEFAULT else backend,
            "--cert": self.pki.server_cert if cert is _DEFAULT else cert,
            "--key": self.pki.server_key if key is _DEFAULT else key,
            "--ca": self.pki.ca_cert if ca is _DEFAULT else ca,
        }
        args: list[str] = []
        for option, value in defaults.items():
            if value is not None:
                args += [option, str(value)]
        return [*args, *extra]

    def environment(self, env: Mapping[str, str | None] | None = None) -> dict[str, str]:
        """
        os.environ without MTLSPROXY_* variables, unbuffered, then C{env} (a
        None value removes a variable).  twistd runs mtlsproxy as installed in
        the virtualenv (its drop-in plugin found the way it ships), not
        through a PYTHONPATH pointing at the checkout.
        """
        result = {k: v for k, v in os.environ.items() if not k.startswith("MTLSPROXY_")}
        result["PYTHONUNBUFFERED"] = "1"
        for name, value in (env or {}).items():
            if value is None:
                result.pop(name, None)
            else:
                result[name] = value
        return result

    def command(self, args: Sequence[str]) -> list[str]:
        return [str(TWISTD), "-n", "--pidfile=", "mtlsproxy", *args]

    def start(
        self,
        *extra: str,
        expect_fail: bool = False,
        env: Mapping[str, str | None] | None = None,
        backend: str | None = _DEFAULT,
        cert: Path | str | None = _DEFAULT,
        key: Path | str | None = _DEFAULT,
        ca: Path | str | None = _DEFAULT,
        timeout: float = START_TIMEOUT,
    ) -> Proxy:
        """
        Start a proxy on a free port and wait until it accepts TCP connections or
        exits.  A proxy that exits at start-up fails the test, showing its log,
        unless C{expect_fail}: then the exited L{Proxy} is returned.
        """
        for attempt in range(3):
            port = free_port()
            args = self.args(*extra, port=port, backend=backend, cert=cert, key=key, ca=ca)
            self._count += 1
            log_path = self.workdir / f"proxy-{self._count}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    self.command(args),
                    cwd=self.workdir,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=self.environment(env),
                    start_new_session=True,
                )
            proxy = Proxy(proc, port, log_path, args, self.pki)
            self.proxies.append(proxy)
            try:
                wait_for(
                    lambda proc=proc, port=port: proc.poll() is not None or port_accepts(port),
                    timeout,
                    "the proxy to listen or exit",
                )
            except WaitTimeout:
                proxy.stop()
                pytest.fail(
                    f"proxy neither listened on {port} nor exited in {timeout:g} s; "
                    f"command {self.command(args)}\nlog:\n{proxy.log_text()}",
                    pytrace=False,
                )
            if proc.poll() is None:
                if expect_fail:
                    pytest.fail(f"proxy was expected to fail but listens:\n{proxy.log_text()}")
                return proxy
            if expect_fail:
                return proxy
            log_text = proxy.log_text()
            if "in use" in log_text.lower() and attempt < 2:
                continue  # lost the race for the free port to someone else
            hint = ""
            if "Unknown command" in log_text:
                hint = (
                    "\n(twistd does not know the mtlsproxy plugin: install the package "
                    f"into {Path(sys.executable).parent.parent}, e.g. `pip install .`)"
                )
            pytest.fail(
                f"proxy exited with status {proc.returncode} at start-up; "
                f"command {self.command(args)}\nlog:\n{log_text}{hint}",
                pytrace=False,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def run_expect_exit(
        self,
        args: Sequence[str],
        env: Mapping[str, str | None] | None = None,
        timeout: float = 30.0,
    ) -> tuple[int, str, str]:
        """
        Run C{twistd -n mtlsproxy ARGS} (exactly these options, no defaults),
        expecting it to exit by itself; return (status, stdout, stderr).
        """
        try:
            done = subprocess.run(
                self.command(args),
                cwd=self.workdir,
                capture_output=True,
                stdin=subprocess.DEVNULL,
                env=self.environment(env),
                timeout=timeout,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace")
            err = (e.stderr or b"").decode(errors="replace")
            pytest.fail(
                f"proxy did not exit within {timeout:g} s: {self.command(args)}\n"
                f"stdout:\n{out}\nstderr:\n{err}",
                pytrace=False,
            )
        return (
            done.returncode,
            done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )

    def stop_all(self) -> list[str]:
        """Stop every proxy; return the problems seen in their logs (tracebacks)."""
        problems = []
        for proxy in self.proxies:
            proxy.stop()
            text = proxy.log_text()
            if "Traceback" in text:
                problems.append(f"{proxy.log_path.name} ({' '.join(proxy.args)}):\n{text[-6000:]}")
        return problems


def assert_startup_error(
    result: tuple[int, str, str], mentions: Iterable[str]
) -> str:
    """
    The contract for start-up errors: non-zero exit, exactly one non-empty
    line on stderr, starting with C{mtlsproxy: } and containing at least one of
    C{mentions} (the option or the file), no traceback anywhere.  Return the line.
    """
    status, out, err = result
    shown = f"exit status {status}\nstdout:\n{out}\nstderr:\n{err}"
    assert status != 0, shown
    assert "Traceback" not in out and "Traceback" not in err, shown
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}\n{shown}"
    line = lines[0]
    assert line.startswith("mtlsproxy: "), shown
    mentions = list(mentions)
    assert any(m in line for m in mentions), f"{line!r} names none of {mentions}\n{shown}"
    return line
