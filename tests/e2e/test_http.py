"""
HTTP/1.1 semantics through the proxy: methods, raw paths, Host, bodiless
responses, chunked bodies, 100-continue, ambiguous framing, header limits and
keep-alive.
"""

from __future__ import annotations

import hashlib
import re

import pytest

from .harness import build_request, pattern_sha256, write_pattern_file

pytestmark = pytest.mark.e2e

#: the standard methods, one llhttp knows beyond them (PURGE), and extension
#: methods it does not know at all (RFC 9110 9.1: any token is a method)
METHODS = [
    "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE", "FOOBAR", "BREW", "X-CUSTOM",
]


@pytest.mark.parametrize("method", METHODS)
def test_method_and_body_forwarded(shared_stack, method):
    """
    Each method, extension methods too, reaches the backend unchanged, with
    its body intact, and is in the access log.
    """
    backend, proxy = shared_stack
    body = f"payload for {method}\n".encode() * 100
    args = ["-X", method]
    if method in ("POST", "PUT", "PATCH", "BREW"):
        args += ["--data-binary", body.decode(), "-H", "Content-Type: text/plain"]
    else:
        body = b""
    echo = proxy.curl(f"/echo/method/{method}", *args).echo()
    assert echo.method == method
    assert echo.target == f"/echo/method/{method}"
    assert echo.body_length == len(body)
    assert echo.body_sha256 == hashlib.sha256(body).hexdigest()
    assert echo.values("X-Client-Cert-CN") == ["client"]
    proxy.wait_for_log(rf'127\.0\.0\.1:\d+ client "{method} /echo/method/{method} HTTP/1\.1" 200')


@pytest.mark.parametrize("method", [b"BRE(W", "BR\u00c9W".encode(), b"BREW\x00"])
def test_invalid_method_token_gets_400(shared_stack, method):
    """A method that is not a token (RFC 9110 5.6.2) is refused with 400, nothing forwarded."""
    backend, proxy = shared_stack
    before = len(backend.requests())
    with proxy.tls() as conn:
        conn.send(method + b" /invalid-method HTTP/1.1\r\nHost: a\r\n\r\n")
        assert conn.read_response().status == 400
    assert len(backend.requests()) == before


def test_raw_path_and_query_forwarded_exactly(shared_stack):
    """
    The request-target reaches the backend byte for byte: an encoded slash,
    dot segments and odd query strings are neither decoded nor normalised, and
    Host is the one the client sent.
    """
    _, proxy = shared_stack
    target = "/a%2Fb/../c?x=1&y=%20&z"
    result = proxy.curl(target, "--path-as-is", "-H", "Accept: application/json")
    echo = result.echo()
    assert echo.target == target
    assert echo.values("Host") == [f"localhost:{proxy.port}"]


def test_host_header_forwarded_unchanged(shared_stack):
    """A Host in unusual case with a port reaches the backend as sent, and in X-Forwarded-Host."""
    _, proxy = shared_stack
    with proxy.tls() as conn:
        echo = conn.request("GET", "/echo/host?q=%2F", host="Example.COM:8443").echo()
    assert echo.target == "/echo/host?q=%2F"
    assert echo.values("Host") == ["Example.COM:8443"]
    assert echo.values("X-Forwarded-Host") == ["Example.COM:8443"]


def test_head_gets_headers_without_body(shared_stack):
    """HEAD gets the GET's headers but no body, and the connection stays usable."""
    backend, proxy = shared_stack
    with proxy.tls() as conn:
        head = conn.request("HEAD", "/download?bytes=12345")
        assert head.status == 200
        assert head.header("Content-Length") == "12345"
        assert head.body == b""
        after = conn.request("GET", "/echo/after-head")
        assert after.echo().method == "GET"
    assert any(line.startswith("HEAD /download?bytes=12345 ") for line in backend.requests())


@pytest.mark.parametrize("code", [204, 304])
def test_bodiless_statuses_keep_framing(shared_stack, code):
    """204 and 304 come back without a body, and the next request on the connection works."""
    _, proxy = shared_stack
    with proxy.tls() as conn:
        response = conn.request("GET", f"/status/{code}")
        assert response.status == code
        assert response.body == b""
        assert response.header("Transfer-Encoding") is None
        assert conn.request("GET", "/echo/next").echo().target == "/echo/next"


@pytest.mark.parametrize("code", [404, 500, 503])
def test_backend_error_statuses_pass_through(shared_stack, code):
    """The backend's own error responses reach the client unchanged."""
    _, proxy = shared_stack
    result = proxy.curl(f"/status/{code}")
    assert result.status == code, result.describe()
    assert result.body == f"status {code}\n".encode()


def test_chunked_request_body_arrives_intact(shared_stack, tmp_path):
    """A chunked request body (curl -H 'Transfer-Encoding: chunked') arrives whole at the app."""
    _, proxy = shared_stack
    size = 3 * 1024 * 1024 + 17
    path = write_pattern_file(tmp_path / "body.bin", size)
    result = proxy.curl(
        "/echo/chunked-upload", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{path}"
    )
    echo = result.echo()
    assert echo.method == "POST"
    assert echo.body_length == size
    assert echo.body_sha256 == pattern_sha256(size)


def test_chunked_request_body_over_raw_socket(shared_stack):
    """Hand-made chunks, with a chunk extension and a trailer, arrive as one body."""
    _, proxy = shared_stack
    chunks = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
    with proxy.tls() as conn:
        conn.send(build_request(
            "POST", "/echo/raw-chunked", [("Transfer-Encoding", "chunked")],
            host=conn.host,
        ) + chunks)
        echo = conn.read_response().echo()
    assert echo.body_length == len(b"hello, world")
    assert echo.body_sha256 == hashlib.sha256(b"hello, world").hexdigest()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_response_body_arrives_intact(shared_stack, chunked):
    """A streamed response body (Content-Length or chunked from the app) arrives whole."""
    _, proxy = shared_stack
    size = 5 * 1024 * 1024 + 3
    result = proxy.curl(f"/download?bytes={size}&chunked={int(chunked)}")
    assert result.status == 200, result.describe()
    assert len(result.body) == size
    assert hashlib.sha256(result.body).hexdigest() == pattern_sha256(size)


def test_expect_100_continue(shared_stack):
    """
    A client sending 'Expect: 100-continue' gets '100 Continue' (from the proxy
    or the app) before it sends the body, then the final response.
    """
    _, proxy = shared_stack
    body = b"z" * 100_000
    with proxy.tls(timeout=10) as conn:
        conn.send(build_request(
            "PUT", "/upload",
            [("Content-Length", str(len(body))), ("Expect", "100-continue")],
            host=conn.host,
        ))
        status_line = conn.rfile.readline()
        assert status_line.startswith(b"HTTP/1.1 100"), status_line
        assert conn.rfile.readline() == b"\r\n"
        conn.send(body)
        response = conn.read_response()
    assert response.status == 200
    assert response.json() == {
        "body_length": len(body), "body_sha256": hashlib.sha256(body).hexdigest()
    }


AMBIGUOUS = {
    "content-length-and-chunked": [("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
    "chunked-and-content-length": [("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
    "two-content-lengths": [("Content-Length", "5"), ("Content-Length", "6")],
    "content-length-list": [("Content-Length", "5, 6")],
    "non-numeric-content-length": [("Content-Length", "abc")],
}


@pytest.mark.parametrize("case", sorted(AMBIGUOUS))
def test_ambiguous_framing_rejected(proxy, backend, case):
    """
    A request whose body length is ambiguous or malformed gets 400, the
    connection is closed, nothing reaches the backend, and the refusal is
    logged with the peer's address, in an access line too.
    """
    with proxy.tls() as conn:
        conn.send(build_request(
            "POST", "/echo/smuggle", AMBIGUOUS[case], host=conn.host
        ) + b"0\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
        response = conn.read_response()
        assert response.status == 400, response
        assert conn.closed_by_peer(), "connection left open after 400"
        proxy.wait_for_log(rf"refused {re.escape(conn.peer)}\b")
        proxy.wait_for_log(
            rf'{re.escape(conn.peer)} client "POST /echo/smuggle HTTP/1\.1" 400 \d+ \d+\.\d{{3}}s'
        )
    assert backend.requests() == []


def test_headers_above_limit_get_431(start_proxy, backend):
    """
    --max-header-bytes 4096: a request whose head is above it gets 431 and
    is not forwarded; one comfortably below it is forwarded.
    """
    proxy = start_proxy("--max-header-bytes", "4096")
    with proxy.tls() as conn:
        small = conn.request("GET", "/echo/small", [("X-Fill", "a" * 3000)])
        assert small.echo().values("X-Fill") == ["a" * 3000]
    with proxy.tls() as conn:
        big = conn.request("GET", "/echo/big", [("X-Fill", "b" * 5000)])
        assert big.status == 431
        proxy.wait_for_log(rf'{re.escape(conn.peer)} client "GET /echo/big HTTP/1\.1" 431 \d+ ')
    with proxy.tls() as conn:
        many = conn.request("GET", "/echo/many", [(f"X-H{i}", "c" * 40) for i in range(100)])
        assert many.status == 431
        proxy.wait_for_log(rf'{re.escape(conn.peer)} client "GET /echo/many HTTP/1\.1" 431 \d+ ')
    assert [line.split(" ")[1] for line in backend.requests()] == ["/echo/small"]


def test_slow_request_head_gets_408_and_an_access_line(start_proxy, backend):
    """
    --idle-timeout 1: a head that is not finished in time gets 408, the
    connection closes, and the access log has the request with its status.
    """
    proxy = start_proxy("--idle-timeout", "1")
    with proxy.tls() as conn:
        conn.send(b"GET /echo/slow-head HTTP/1.1\r\nHost: localhost\r\n")
        response = conn.read_response()
        assert response.status == 408
        assert conn.closed_by_peer()
        line = proxy.wait_for_log(
            rf'{re.escape(conn.peer)} client "GET /echo/slow-head HTTP/1\.1" 408 \d+ (\d+\.\d+)s'
        )
    assert float(line.group(1)) >= 0.9
    assert backend.requests() == []


def test_several_requests_on_one_connection(proxy, backend):
    """HTTP/1.1 keep-alive: several requests on one TLS connection, each with the CN."""
    with proxy.tls() as conn:
        for i in range(4):
            response = conn.request("GET", f"/echo/keepalive/{i}")
            assert not response.closes
            echo = response.echo()
            assert echo.target == f"/echo/keepalive/{i}"
            assert echo.values("X-Client-Cert-CN") == ["client"]
        post = conn.request("POST", "/echo/keepalive/post", body=b"body" * 1000)
        assert post.echo().body_length == 4000
        port = conn.local_port
    assert len(backend.requests()) == 5
    for i in range(4):
        proxy.wait_for_log(rf'127\.0\.0\.1:{port} client "GET /echo/keepalive/{i} HTTP/1\.1" 200')


def test_http10_keep_alive(proxy):
    """HTTP/1.0 with 'Connection: keep-alive' gets both answers on the same connection."""
    with proxy.tls() as conn:
        for i in range(2):
            response = conn.request(
                "GET", f"/echo/http10/{i}", [("Connection", "keep-alive")], version="HTTP/1.0"
            )
            assert response.status == 200
            assert not response.closes, response.headers
            assert response.echo().target == f"/echo/http10/{i}"


def test_connection_close_honoured(proxy):
    """'Connection: close' from the client: answered, then the proxy closes the connection."""
    with proxy.tls() as conn:
        response = conn.request("GET", "/echo/bye", [("Connection", "close")])
        assert response.echo().target == "/echo/bye"
        assert conn.closed_by_peer()


def test_backend_closing_does_not_break_the_client(proxy):
    """
    The app closing its connection after a response (/close) gives the client
    that whole response; the client connection is then either closed cleanly
    or still usable, and a new connection works.
    """
    with proxy.tls() as conn:
        first = conn.request("GET", "/close")
        assert first.status == 200 and first.body == b"goodbye\n"
        if first.closes:
            assert conn.closed_by_peer()
        else:
            assert conn.request("GET", "/echo/same").echo().target == "/echo/same"
    with proxy.tls() as conn:
        assert conn.request("GET", "/echo/new").echo().target == "/echo/new"
