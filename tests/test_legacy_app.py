"""
examples/legacy_app.py on its own, spoken to directly in plain HTTP (no proxy):
the end-to-end tests and the README demo rely on what is checked here.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Backend, Echo, build_request, pattern_sha256, read_response


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    backend = Backend.start(tmp_path_factory.mktemp("legacy-app"))
    yield backend
    backend.stop()


class Conn:
    """A plain TCP (or unix) connection speaking raw HTTP/1.1."""

    def __init__(self, backend: Backend) -> None:
        if backend.socket_path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(str(backend.socket_path))
        else:
            assert backend.port is not None
            self.sock = socket.create_connection(("127.0.0.1", backend.port), timeout=10)
        self.rfile = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str = "GET", target: str = "/echo", headers=(), body=b"",
                version: str = "HTTP/1.1"):
        self.send(build_request(method, target, headers, body, version, host="app.test"))
        return read_response(self.rfile, method)

    def closed(self) -> bool:
        self.sock.settimeout(5)
        try:
            return self.rfile.read(1) == b""
        except ConnectionError:
            return True

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.rfile.close()
        self.sock.close()


def test_greeting_uses_decoded_cn_or_anonymous(app):
    """GET / greets the percent-decoded X-Client-Cert-CN, or 'anonymous' without one."""
    with Conn(app) as conn:
        anonymous = conn.request("GET", "/")
        named = conn.request("GET", "/", [("X-Client-Cert-CN", "J%C3%BCrgen")])
    assert anonymous.status == 200
    assert anonymous.body == b"Hello, anonymous! You reached the legacy app through mtlsproxy.\n"
    assert named.body.decode() == (
        "Hello, J\u00fcrgen! You reached the legacy app through mtlsproxy.\n"
    )


def test_echo_reports_raw_target_headers_and_body(app):
    """
    The echo gives the raw request-target, headers in order with repeats and
    exact names, and the body's length and SHA-256.
    """
    body = b"some body"
    with Conn(app) as conn:
        response = conn.request(
            "PATCH", "/echo/a%2Fb/../c?x=1&y",
            [("X-Dup", "1"), ("x_dup", "2"), ("X-Dup", "3")], body,
        )
    echo = Echo.parse(response.body)
    assert echo.method == "PATCH"
    assert echo.target == "/echo/a%2Fb/../c?x=1&y"
    assert echo.version == "HTTP/1.1"
    assert echo.headers[:4] == [
        ("Host", "app.test"), ("X-Dup", "1"), ("x_dup", "2"), ("X-Dup", "3")
    ]
    assert echo.values("x-dup") == ["1", "2", "3"]
    assert echo.body_length == len(body)
    assert echo.body_sha256 == hashlib.sha256(body).hexdigest()


def test_accept_json_turns_any_path_into_echo(app):
    """Accept: application/json on an ordinary path answers the JSON echo."""
    with Conn(app) as conn:
        response = conn.request("GET", "/a//b?q", [("Accept", "application/json")])
    assert Echo.parse(response.body).target == "/a//b?q"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "OPTIONS", "PURGE", "HEAD"])
def test_echo_any_method(app, method):
    """Every method is echoed; HEAD gets the headers (with Content-Length) only."""
    with Conn(app) as conn:
        response = conn.request(method, "/echo/m")
        follow_up = conn.request("GET", "/echo/next")
    assert response.status == 200
    if method == "HEAD":
        assert response.body == b"" and int(response.header("Content-Length") or 0) > 0
    else:
        assert Echo.parse(response.body).method == method
    assert Echo.parse(follow_up.body).target == "/echo/next"


def test_chunked_request_body_decoded(app):
    """Chunked request bodies (with extensions and trailers) are decoded."""
    with Conn(app) as conn:
        conn.send(
            build_request("POST", "/echo/c", [("Transfer-Encoding", "chunked")], host="app.test")
            + b"3;x=y\r\nabc\r\n4\r\ndefg\r\n0\r\nX-T: 1\r\n\r\n"
        )
        response = read_response(conn.rfile)
        echo = Echo.parse(response.body)
        assert echo.body_length == 7
        assert echo.body_sha256 == hashlib.sha256(b"abcdefg").hexdigest()
        assert response.json()["trailers"] == [["X-T", "1"]]


@pytest.mark.parametrize("chunked", [0, 1])
def test_download_pattern(app, chunked):
    """/download streams N bytes of the pattern, with Content-Length or chunked."""
    size = 1_000_003
    with Conn(app) as conn:
        response = conn.request("GET", f"/download?bytes={size}&chunked={chunked}")
    assert len(response.body) == size
    assert hashlib.sha256(response.body).hexdigest() == pattern_sha256(size)
    if chunked:
        assert response.header("Transfer-Encoding") == "chunked"
    else:
        assert response.header("Content-Length") == str(size)


def test_download_rate_limited(app):
    """/download?rate=R takes at least size/R seconds."""
    started = time.monotonic()
    with Conn(app) as conn:
        response = conn.request("GET", "/download?bytes=200000&rate=1000000")
    assert len(response.body) == 200000
    assert time.monotonic() - started >= 0.18


def test_upload_counts_and_hashes_with_rate(app):
    """/upload answers length and SHA-256, reading no faster than ?rate=."""
    body = bytes(range(256)) * 1000
    started = time.monotonic()
    with Conn(app) as conn:
        response = conn.request("PUT", "/upload?rate=1000000", body=body)
    assert response.json() == {
        "body_length": len(body), "body_sha256": hashlib.sha256(body).hexdigest()
    }
    assert time.monotonic() - started >= 0.23


def test_expect_100_continue(app):
    """A request with Expect: 100-continue gets 100 Continue before it sends its body."""
    with Conn(app) as conn:
        conn.send(build_request(
            "POST", "/upload", [("Content-Length", "5"), ("Expect", "100-continue")],
            host="app.test",
        ))
        assert conn.rfile.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert conn.rfile.readline() == b"\r\n"
        conn.send(b"hello")
        assert read_response(conn.rfile).json()["body_length"] == 5


@pytest.mark.parametrize("code", [204, 304])
def test_bodiless_status_codes(app, code):
    """/status/204 and /status/304 have no body and keep the connection usable."""
    with Conn(app) as conn:
        response = conn.request("GET", f"/status/{code}")
        assert response.status == code
        assert response.header("Content-Length") is None
        assert response.header("Transfer-Encoding") is None
        assert conn.request("GET", "/status/201").status == 201


def test_slow_waits(app):
    """/slow?delay=S answers after S seconds."""
    started = time.monotonic()
    with Conn(app) as conn:
        response = conn.request("GET", "/slow?delay=0.3")
    assert response.body == b"slept 0.3 s\n"
    assert time.monotonic() - started >= 0.3


def test_close_closes(app):
    """/close answers with Connection: close, then closes."""
    with Conn(app) as conn:
        response = conn.request("GET", "/close")
        assert response.header("Connection") == "close"
        assert conn.closed()


def test_http10_keep_alive_only_when_asked(app):
    """HTTP/1.0 keeps the connection only with Connection: keep-alive."""
    with Conn(app) as conn:
        kept = conn.request("GET", "/echo/1", [("Connection", "keep-alive")], version="HTTP/1.0")
        assert kept.header("Connection") == "keep-alive"
        closing = conn.request("GET", "/echo/2", version="HTTP/1.0")
        assert closing.header("Connection") == "close"
        assert conn.closed()


@pytest.mark.parametrize(
    "headers",
    [
        [("Content-Length", "1"), ("Transfer-Encoding", "chunked")],
        [("Content-Length", "1"), ("Content-Length", "2")],
    ],
)
def test_ambiguous_framing_rejected(app, headers):
    """The app itself rejects ambiguous framing with 400 and closes."""
    with Conn(app) as conn:
        response = conn.request("POST", "/echo", headers)
        assert response.status == 400
        assert conn.closed()


def test_request_log_records_request_lines(tmp_path: Path):
    """--request-log gets one line per request received, in order."""
    backend = Backend.start(tmp_path)
    try:
        with Conn(backend) as conn:
            conn.request("GET", "/first")
            conn.request("POST", "/echo/second", body=b"x")
        assert backend.requests() == ["GET /first HTTP/1.1", "POST /echo/second HTTP/1.1"]
    finally:
        backend.stop()


def test_unix_socket(tmp_path: Path):
    """--unix PATH serves on a unix socket."""
    backend = Backend.start(tmp_path, unix=True)
    try:
        assert backend.url == f"unix:{backend.socket_path}"
        with Conn(backend) as conn:
            assert Echo.parse(conn.request("GET", "/echo/unix").body).target == "/echo/unix"
    finally:
        backend.stop()
    assert not backend.socket_path.exists()
