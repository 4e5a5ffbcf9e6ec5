"""
Response framing through the running daemon: what the proxy does with a
malformed or hostile response from the backend (RFC 9112, response side).

The backend here is L{ScriptedBackend}, a L{RawBackend} that answers each
request target with scripted bytes (and can close or reset the connection,
or wait for the test, between them), and the client is Python's C{ssl} with
the valid client certificate.  Before each test one ordinary request warms
the proxy's keep-alive pool, so the scripted request goes out on a reused
backend connection (where a retry, or a connection handed on with stray
bytes in it, would show).

What "safe" means, per case:

  - a response head the proxy cannot frame unambiguously (both
    Content-Length and Transfer-Encoding, two Content-Lengths, a coding other
    than chunked, bare LF, obs-fold, control characters, no or an invalid
    status line, an unasked-for 101, a head too large): the client gets a
    clean 502 and nothing of the backend's bytes, the request reached the
    backend once (it is not retried: the backend did answer), that backend
    connection is closed, and the proxy logs one line saying why;
  - a body that goes wrong after the response head went out (an invalid
    chunk, the backend closing or resetting mid-body): the client's
    connection is aborted, so what it got can never parse as a complete
    response; one "aborting" line in the log;
  - bytes after a complete response (a body longer than its Content-Length,
    a body on a HEAD, 204 or 304 response, a whole second response): never
    delivered to any client, whether the next request is pipelined on the
    same client connection or comes on another; the backend connection is
    closed instead of being reused;
  - after each case, a request on a new client connection gets exactly its
    own response.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import re
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from .harness import (
    ConnectionClosed,
    HttpResponse,
    Pki,
    Proxy,
    ProxyLauncher,
    TlsConnection,
    read_response,
    wait_for,
)
from .harness import collect as harness_collect
from .rawbackend import RawBackend, RawConnection, RawRequest, fixed_response

pytestmark = pytest.mark.e2e

#: in every byte the backend sends that must never reach a client
MARK = b"SMUGGLED"
#: how long a client waits for more bytes before deciding the proxy went silent
#: (only reached when the proxy misbehaves: every expected outcome ends in a close)
QUIET = 5.0

#: step of a script: close the connection (FIN), or reset it (RST)
CLOSE = "close"
RESET = "reset"
Step = bytes | str | threading.Event


# -- the scripted backend ------------------------------------------------------------


class ScriptedBackend(RawBackend):
    """
    A L{RawBackend} that answers each complete request with the script
    registered for its target: bytes to send, L{CLOSE} or L{RESET} to end
    the connection, or a C{threading.Event} to wait for (the test sets it).
    Any other target gets C{fixed_response(target)}, so a client can tell
    its own response from anyone else's.
    """

    def __init__(self) -> None:
        super().__init__()
        self._scripts: dict[bytes, list[Step]] = {}

    def script(self, target: bytes, *steps: Step) -> None:
        with self._lock:
            self._scripts[target] = list(steps)

    def _steps(self, request: RawRequest) -> list[Step]:
        with self._lock:
            return self._scripts.get(request.target) or [fixed_response(request.target)]

    def _answer(self, sock: socket.socket, conn: RawConnection, request: RawRequest) -> bool:
        for step in self._steps(request):
            if isinstance(step, threading.Event):
                step.wait(15)
            elif isinstance(step, bytes):
                try:
                    sock.sendall(step)
                except OSError:
                    self._mark(conn, "reset while answering")
                    return False
            else:
                if step == RESET:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self._mark(conn, "closed by backend")
                sock.close()
                return False
        return True


# -- the stack -------------------------------------------------------------------


class Stack:
    """A scripted backend and a proxy forwarding to it."""

    def __init__(self, raw: ScriptedBackend, proxy: Proxy) -> None:
        self.raw = raw
        self.proxy = proxy
        self._names = itertools.count()
        self.gates: list[threading.Event] = []

    def target(self, name: str) -> bytes:
        """A target no other test uses."""
        return b"/%s-%d" % (re.sub(r"[^A-Za-z0-9]+", "-", name).encode(), next(self._names))

    def script(self, name: str, *steps: Step) -> bytes:
        target = self.target(name)
        self.raw.script(target, *steps)
        return target

    def gate(self) -> threading.Event:
        gate = threading.Event()
        self.gates.append(gate)
        return gate

    def tls(self) -> TlsConnection:
        return self.proxy.tls(timeout=10)

    def warm(self) -> None:
        """One ordinary request, so the pool holds an idle connection; then forget it."""
        got = fetch(self, b"/warm-up")
        assert exchanges(got) == [(200, b"/warm-up")], got
        self.raw.wait_for(lambda raw: any(r.target == b"/warm-up" for r in raw.requests()))
        self.raw.reset()


@pytest.fixture(scope="module")
def scripted_stack(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    raw = ScriptedBackend().start()
    launcher = ProxyLauncher(pki, tmp_path_factory.mktemp("response-framing"), raw.url)
    try:
        yield Stack(raw, launcher.start())
    finally:
        problems = launcher.stop_all()
        raw.stop()
    if problems:
        pytest.fail("traceback in the proxy log:\n" + "\n\n".join(problems), pytrace=False)


@pytest.fixture
def stack(scripted_stack: Stack) -> Iterator[Stack]:
    scripted_stack.warm()
    try:
        yield scripted_stack
    finally:
        for gate in scripted_stack.gates:
            gate.set()  # never leave a backend thread waiting
        scripted_stack.gates.clear()
    log = scripted_stack.proxy.log_text()
    assert "Traceback" not in log, log[-5000:]


# -- client side ---------------------------------------------------------------------


@dataclasses.dataclass
class Got:
    """What one client connection received, whether the proxy closed it, and its peer name."""

    data: bytes
    closed: bool
    peer: str


def collect(conn: TlsConnection, quiet: float = QUIET) -> tuple[bytes, bool]:
    """Everything until the proxy closes (True) or is silent for C{quiet} seconds (False)."""
    return harness_collect(conn, quiet)


def request_bytes(
    target: bytes, method: bytes = b"GET", version: bytes = b"HTTP/1.1", close: bool = True
) -> bytes:
    head = method + b" " + target + b" " + version + b"\r\nHost: localhost\r\n"
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n"


def fetch(stack: Stack, target: bytes, method: bytes = b"GET", version: bytes = b"HTTP/1.1") -> Got:
    """One request on a new client connection (asking the proxy to close after it)."""
    with stack.tls() as conn:
        conn.send(request_bytes(target, method, version))
        data, closed = collect(conn)
        return Got(data, closed, conn.peer)


def parse(data: bytes, methods: tuple[str, ...] = ("GET",)) -> tuple[list[HttpResponse], bytes]:
    """
    The complete responses in C{data} (the n-th read as the answer to
    C{methods[n]}, the last method for the rest) and whatever follows them
    that is not a complete response.
    """
    stream = io.BytesIO(data)
    found: list[HttpResponse] = []
    while stream.tell() < len(data):
        start = stream.tell()
        method = methods[min(len(found), len(methods) - 1)]
        try:
            found.append(read_response(stream, method))
        except (ConnectionClosed, AssertionError, ValueError):
            return found, data[start:]
    return found, b""


def exchanges(got: Got, methods: tuple[str, ...] = ("GET",)) -> list[tuple[int, bytes]]:
    """(status, body) of every response, after checking nothing else came and the proxy closed."""
    responses, rest = parse(got.data, methods)
    assert rest == b"", f"bytes after the responses: {rest!r} (all: {got.data!r})"
    assert got.closed, f"the proxy left the connection open after {got.data!r}"
    return [(r.status, r.body) for r in responses]


def read_head(conn: TlsConnection) -> bytes:
    """Raw bytes up to the end of the first response head (maybe a little more)."""
    conn.sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.sock.recv(65536)
        assert piece, f"closed before a response head: {data!r}"
        data += piece
    return data


# -- what the proxy logged, and what the backend saw ---------------------------------------


def peer_lines(stack: Stack, peer: str) -> tuple[list[str], list[str]]:
    """(event lines, access lines) of the proxy log that name this client."""
    pattern = re.compile(re.escape(peer) + r"(?!\d)")
    lines = [line for line in stack.proxy.log_text().splitlines() if pattern.search(line)]
    access = [line for line in lines if "[mtlsproxy.access" in line]
    return [line for line in lines if line not in access], access


def assert_logged_once(stack: Stack, peer: str, pattern: str, status: int) -> str:
    """
    Exactly one readable event line about this client, matching C{pattern}
    (a regex after the peer), and one access line with C{status}.
    """
    wait_for(lambda: peer_lines(stack, peer)[1], 10, f"the access line of {peer}")
    events, access = peer_lines(stack, peer)
    assert len(events) == 1, f"expected one line about {peer}, got {events}"
    line = events[0]
    assert all(0x20 <= ord(c) < 0x7F for c in line), f"unreadable log line {line!r}"
    assert re.search(pattern, line), f"{line!r} does not match {pattern!r}"
    assert len(access) == 1 and f'" {status} ' in access[0], access
    return line


def assert_502_logged(stack: Stack, got: Got, reason: str) -> None:
    assert_logged_once(
        stack, got.peer, rf"\[mtlsproxy(?:#info)?\] 502 for {re.escape(got.peer)}: {reason}", 502
    )


def connections_with(stack: Stack, target: bytes) -> list[RawConnection]:
    return [c for c in stack.raw.connections() if any(r.target == target for r in c.requests())]


def assert_backend_saw_once_and_closed(stack: Stack, target: bytes) -> None:
    """
    The request reached the backend exactly once (never retried: the backend
    answered it), and the connection it came on carried nothing else and is
    closed, never handed to another exchange.
    """
    seen = [r for r in stack.raw.requests() if r.target == target]
    assert len(seen) == 1, f"the backend received {target!r} {len(seen)} times"
    stack.raw.wait_for(
        lambda raw: all(c.closed for c in connections_with(stack, target)), timeout=10
    )
    (conn,) = connections_with(stack, target)
    assert [r.target for r in conn.requests()] == [target], (
        f"the connection that answered {target!r} carried {conn.requests()!r}"
    )


def assert_recovers(stack: Stack) -> None:
    """A new client connection gets exactly its own response, and nothing left over."""
    target = stack.target("after")
    got = fetch(stack, target)
    assert exchanges(got) == [(200, target)], got
    assert MARK not in got.data


# == 1. Heads that cannot be framed unambiguously: 502 before any byte goes out

OK = b"HTTP/1.1 200 OK\r\n"
BODY = MARK + b" body"
CHUNKED_BODY = b"%X\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)


def head(*fields: bytes, status: bytes = OK) -> bytes:
    return status + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def with_length(*fields: bytes, status: bytes = OK) -> bytes:
    return head(*fields, b"Content-Length: %d" % len(BODY), status=status) + BODY


INVALID_RESPONSE = "invalid HTTP response from backend: "

#: case: (script, the reason the log line gives, as a regex)
BAD_HEADS: dict[str, tuple[list[Step], str]] = {
    # RFC 9112 6.1 / 6.3 (3): never pick one of two framings
    "cl-then-te": (
        [head(b"Content-Length: 5", b"Transfer-Encoding: chunked") + CHUNKED_BODY],
        "Transfer-Encoding can't be present with Content-Length",
    ),
    "te-then-cl": (
        [head(b"Transfer-Encoding: chunked", b"Content-Length: 5") + CHUNKED_BODY],
        "Content-Length can't be present with Transfer-Encoding",
    ),
    "cl-0-with-te": (
        [head(b"Content-Length: 0", b"Transfer-Encoding: chunked") + CHUNKED_BODY],
        "Transfer-Encoding can't be present with Content-Length",
    ),
    # RFC 9112 6.3 (5) / RFC 9110 8.6
    "two-different-lengths": (
        [head(b"Content-Length: 5", b"Content-Length: 13") + BODY], "Duplicate Content-Length"
    ),
    "two-equal-lengths": (
        [head(b"Content-Length: 13", b"Content-Length: 13") + BODY], "Duplicate Content-Length"
    ),
    "length-list": ([head(b"Content-Length: 13, 13") + BODY], "Invalid character"),
    "length-letters": ([head(b"Content-Length: abc") + BODY], "Invalid character"),
    "length-negative": ([head(b"Content-Length: -13") + BODY], "Invalid character"),
    "length-plus": ([head(b"Content-Length: +13") + BODY], "Invalid character"),
    "length-hex": ([head(b"Content-Length: 0xd") + BODY], "Invalid character"),
    "length-empty": ([head(b"Content-Length: ") + BODY], "Empty Content-Length"),
    "length-overflow": (
        [head(b"Content-Length: 99999999999999999999999") + BODY], "Content-Length overflow"
    ),
    # RFC 9112 6.3 (4): a final coding other than chunked is read to the close,
    # still encoded, and the field is hop-by-hop: refused, as on the request side
    "te-gzip-to-close": (
        [head(b"Transfer-Encoding: gzip") + BODY, CLOSE], "Transfer-Encoding other than chunked"
    ),
    "te-chunked-then-gzip": (
        [head(b"Transfer-Encoding: chunked, gzip") + BODY, CLOSE],
        "Transfer-Encoding other than chunked",
    ),
    "te-gzip-then-chunked": (
        [head(b"Transfer-Encoding: gzip, chunked") + CHUNKED_BODY],
        "Transfer-Encoding other than chunked",
    ),
    "te-twice": (
        [head(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked") + CHUNKED_BODY],
        "Transfer-Encoding other than chunked",
    ),
    "te-xchunked": (
        [head(b"Transfer-Encoding: xchunked") + CHUNKED_BODY, CLOSE],
        "Transfer-Encoding other than chunked",
    ),
    "te-chunked-tab": (
        # llhttp reads "chunked<TAB>" as another coding; the proxy must not read it as chunked
        [head(b"Transfer-Encoding: chunked\t") + CHUNKED_BODY, CLOSE],
        "Transfer-Encoding other than chunked",
    ),
    "te-in-http10": (
        [head(b"Transfer-Encoding: chunked", status=b"HTTP/1.0 200 OK\r\n") + CHUNKED_BODY],
        "Transfer-Encoding in an HTTP/1.0 response",
    ),
    # RFC 9112 2.2: CRLF only, no obs-fold, no CR, NUL or other CTL in values
    "bare-lf-status-line": (
        [b"HTTP/1.1 200 OK\nContent-Length: 13\r\n\r\n" + BODY], "Missing expected CR"
    ),
    "bare-lf-field": (
        [b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 13\r\n\r\n" + BODY], "Missing expected CR"
    ),
    "bare-lf-end-of-head": (
        [b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\n" + BODY], "Invalid header field char"
    ),
    "bare-lf-everywhere": (
        [b"HTTP/1.1 200 OK\nContent-Length: 13\n\n" + BODY], "Missing expected CR"
    ),
    "obs-fold": ([with_length(b"X-A: 1", b" folded")], "Unexpected whitespace"),
    "obs-fold-tab": ([with_length(b"X-A: 1", b"\tfolded")], "Unexpected whitespace"),
    "obs-fold-length": (
        [head(b"Content-Length:", b" 13") + BODY], "Invalid|Empty Content-Length"
    ),
    "nul-in-value": ([with_length(b"X-A: a\x00b")], "Invalid header value char"),
    "cr-in-value": ([with_length(b"X-A: a\rb")], "Missing expected LF|Invalid header value"),
    "ctl-in-value": ([with_length(b"X-A: a\x01b")], "Invalid header value char"),
    "del-in-value": ([with_length(b"X-A: a\x7fb")], "Invalid header value char"),
    "space-before-colon": ([with_length(b"X-A : 1")], "Invalid header (?:field char|token)"),
    # RFC 9112 4: the status line
    "http09-no-status-line": ([MARK + b" <html>\r\n", CLOSE], "Expected HTTP/"),
    "status-99": ([with_length(status=b"HTTP/1.1 99 Low\r\n")], "Invalid status code"),
    "status-1000": ([with_length(status=b"HTTP/1.1 1000 High\r\n")], "Invalid response status"),
    "status-2OO": ([with_length(status=b"HTTP/1.1 2OO OK\r\n")], "Invalid status code"),
    "status-two-digits": ([with_length(status=b"HTTP/1.1 20 OK\r\n")], "Invalid status code"),
    "status-600": ([with_length(status=b"HTTP/1.1 600 Odd\r\n")], "invalid status code 600"),
    "status-999": ([with_length(status=b"HTTP/1.1 999 Odd\r\n")], "invalid status code 999"),
    "status-double-space": (
        [with_length(status=b"HTTP/1.1  200 OK\r\n")], "Invalid status code"
    ),
    "version-http2": (
        [with_length(status=b"HTTP/2.0 200 OK\r\n")], "unsupported HTTP version 2.0"
    ),
    "version-http12": ([with_length(status=b"HTTP/1.2 200 OK\r\n")], "Invalid HTTP version"),
    "version-http09": (
        [with_length(status=b"HTTP/0.9 200 OK\r\n")], "unsupported HTTP version 0.9"
    ),
    "lower-case-protocol": ([with_length(status=b"http/1.1 200 OK\r\n")], "Expected HTTP/"),
    "icy-status-line": ([with_length(status=b"ICY 200 OK\r\n")], "Expected HTTP/"),
    # llhttp has no limits of its own
    "head-too-large": (
        [with_length(b"X-Big: " + b"a" * 70000)], "response headers too large"
    ),
    "reason-too-large": (
        [with_length(status=b"HTTP/1.1 200 " + b"O" * 70000 + b"\r\n")],
        "response headers too large",
    ),
    "too-many-fields": (
        [with_length(*(b"X-%d: 1" % i for i in range(101)))], "too many response header fields"
    ),
    # RFC 9110 15.2.2: a 101 the proxy never asked for; the rest is another protocol
    "unasked-101": (
        [head(b"Connection: Upgrade", b"Upgrade: websocket",
              status=b"HTTP/1.1 101 Switching Protocols\r\n") + MARK],
        "101 Switching Protocols, which was not asked for",
    ),
    "unasked-101-after-103": (
        [head(b"Link: </a>", status=b"HTTP/1.1 103 Early Hints\r\n")
         + head(b"Upgrade: h2c", b"Connection: Upgrade",
                status=b"HTTP/1.1 101 Switching Protocols\r\n") + MARK],
        "101 Switching Protocols",
    ),
}

#: the backend ends the connection before the head is complete
CUT_HEADS: dict[str, list[Step]] = {
    "close-before-status-code": [b"HTTP/1.1 ", CLOSE],
    "close-mid-status-line": [b"HTTP/1.1 200 O", CLOSE],
    "close-mid-field": [OK + b"Content-Length: 13\r\nX-" + MARK, CLOSE],
    "close-before-empty-line": [OK + b"Content-Length: 13\r\n", CLOSE],
    "reset-mid-head": [OK + b"Content-Length: 13\r\nX-A: " + MARK, RESET],
    "close-after-103": [head(b"Link: </a>", status=b"HTTP/1.1 103 Early Hints\r\n"), CLOSE],
}


@pytest.mark.parametrize("case", sorted(BAD_HEADS))
def test_response_head_that_cannot_be_framed_gets_502(stack: Stack, case: str) -> None:
    """
    A response head the proxy could read one way and the client (or a cache
    behind it) another, or cannot read at all: the client gets a clean 502
    and none of the backend's bytes; the request reached the backend once
    (no retry: the backend did answer it); that backend connection is closed;
    one log line names the reason.
    """
    steps, reason = BAD_HEADS[case]
    target = stack.script(case, *steps)
    got = fetch(stack, target)
    ((status, body),) = exchanges(got)
    assert status == 502 and body.startswith(b"502 Bad Gateway: " + INVALID_RESPONSE.encode()), got
    assert MARK not in got.data
    assert_502_logged(stack, got, re.escape(INVALID_RESPONSE) + f"(?:{reason})")
    assert_backend_saw_once_and_closed(stack, target)
    assert_recovers(stack)


@pytest.mark.parametrize("case", sorted(CUT_HEADS))
def test_backend_closing_mid_head_gets_502_without_a_retry(stack: Stack, case: str) -> None:
    """
    The backend ends the connection inside the response head (or after a
    1xx): 502, and the request is not sent again: only a pooled connection
    that closes without a byte of answer may be retried.
    """
    target = stack.script(case, *CUT_HEADS[case])
    got = fetch(stack, target)
    responses, rest = parse(got.data)
    assert [r.status for r in responses] == [502] and rest == b"" and got.closed, got
    assert MARK not in got.data
    assert_502_logged(stack, got, "backend closed the connection")
    assert_backend_saw_once_and_closed(stack, target)
    assert_recovers(stack)


def test_client_connection_stays_usable_after_a_502(stack: Stack) -> None:
    """The 502 is a complete, well-framed answer: the client's next request on it works."""
    target = stack.script("keep-alive-502", with_length(b"Content-Length: 1"))
    with stack.tls() as conn:
        conn.send(request_bytes(target, close=False))
        first = conn.read_response()
        assert first.status == 502 and not first.closes, first
        second_target = stack.target("second")
        conn.send(request_bytes(second_target, close=False))
        second = conn.read_response()
    assert (second.status, second.body) == (200, second_target)


# == 2. Bodies that go wrong after the head went out: the client connection is aborted

#: case: (head, the bytes sent once the client has the head, the reason logged)
BAD_CHUNK = re.escape(INVALID_RESPONSE)
BAD_BODIES: dict[str, tuple[bytes, list[Step], str]] = {
    "invalid-chunk-size": (
        head(b"Transfer-Encoding: chunked"), [b"zz\r\n" + BODY + b"\r\n0\r\n\r\n"],
        BAD_CHUNK + "Invalid character in chunk size",
    ),
    "chunk-size-0x": (
        head(b"Transfer-Encoding: chunked"), [b"0xd\r\n" + BODY + b"\r\n0\r\n\r\n"],
        BAD_CHUNK + "Invalid character in chunk size",
    ),
    "chunk-size-overflow": (
        head(b"Transfer-Encoding: chunked"), [b"FFFFFFFFFFFFFFFFF\r\n" + BODY],
        BAD_CHUNK + "Chunk size overflow",
    ),
    "chunk-data-too-long": (
        head(b"Transfer-Encoding: chunked"), [b"5\r\n" + BODY + b"\r\n0\r\n\r\n"],
        BAD_CHUNK + "Expected LF after chunk data",
    ),
    "chunk-size-bare-lf": (
        head(b"Transfer-Encoding: chunked"), [b"d\n" + BODY + b"\r\n0\r\n\r\n"],
        BAD_CHUNK + "Missing expected CR after chunk size",
    ),
    "too-many-trailer-fields": (
        head(b"Transfer-Encoding: chunked"),
        [b"d\r\n" + BODY + b"\r\n0\r\n" + b"".join(b"T-%d: 1\r\n" % i for i in range(101))
         + b"\r\n"],
        BAD_CHUNK + "too many response header fields",
    ),
    "close-mid-body": (
        head(b"Content-Length: 100"), [BODY, CLOSE], "backend closed the connection$"
    ),
    "close-mid-chunk": (
        head(b"Transfer-Encoding: chunked"), [b"64\r\n" + BODY, CLOSE],
        "backend closed the connection$",
    ),
    "close-before-last-chunk": (
        head(b"Transfer-Encoding: chunked"), [b"d\r\n" + BODY + b"\r\n", CLOSE],
        "backend closed the connection$",
    ),
    "close-in-trailers": (
        head(b"Transfer-Encoding: chunked"), [b"d\r\n" + BODY + b"\r\n0\r\nT: 1\r\n", CLOSE],
        "backend closed the connection$",
    ),
    "reset-mid-body": (
        head(b"Content-Length: 100"), [BODY, RESET], r"backend closed the connection \(.+\)$"
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_body_failing_after_the_head_aborts_the_client(stack: Stack, case: str) -> None:
    """
    The head is already at the client when the body goes wrong: too late for
    a 502, so the proxy aborts the client connection, and what the client
    got can never parse as a complete response (no last chunk, fewer bytes
    than Content-Length).  One "aborting" line says why.
    """
    first, rest, reason = BAD_BODIES[case]
    gate = stack.gate()
    target = stack.script(case, first, gate, *rest)
    with stack.tls() as conn:
        conn.send(request_bytes(target))
        got_head = read_head(conn)
        assert got_head.startswith(b"HTTP/1.1 200 OK\r\n"), got_head
        gate.set()
        data, closed = collect(conn)
        got = Got(got_head + data, closed, conn.peer)
    assert closed, f"the client connection was left open after {got.data!r}"
    with pytest.raises(ConnectionClosed):
        read_response(io.BytesIO(got.data))
    assert_logged_once(
        stack, got.peer, rf"\[mtlsproxy(?:#info)?\] aborting {re.escape(got.peer)}: (?:{reason})",
        200,
    )
    assert_backend_saw_once_and_closed(stack, target)
    assert_recovers(stack)


@pytest.mark.parametrize("case", ["invalid-chunk-size", "chunk-data-too-long", "close-mid-body"])
def test_body_failing_in_the_same_read_as_the_head_never_looks_complete(
    stack: Stack, case: str
) -> None:
    """
    Head and bad body in one write: the client gets a 502, or nothing, or a
    truncated response, and a closed connection; never a complete response.
    """
    first, (body, *end), _ = BAD_BODIES[case]
    assert isinstance(body, bytes)
    target = stack.script(case, first + body, *end)
    got = fetch(stack, target)
    assert got.closed
    responses, _ = parse(got.data)
    assert [r.status for r in responses] in ([], [502]), got
    assert_backend_saw_once_and_closed(stack, target)
    assert_recovers(stack)


# == 3. Bytes after a complete response: never anyone's response

#: a whole response, as a backend out of step (or one splitting its response on
#: attacker-chosen bytes) would send it after the real one
FAKE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nX-Poisoned: yes\r\nContent-Length: %d\r\n\r\n%s"
    % (len(MARK + b" poisoned"), MARK + b" poisoned")
)
HELLO = head(b"Content-Length: 5") + b"hello"

#: case: the first response followed by bytes that are not part of it
EXTRA: dict[str, bytes] = {
    "whole-second-response": HELLO + FAKE,
    "garbage": HELLO + MARK,
    "partial-head": HELLO + FAKE[:30],
    "after-a-chunked-body": head(b"Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n" + FAKE,
    "after-connection-close": head(b"Connection: close", b"Content-Length: 5") + b"hello" + FAKE,
    "after-103-and-response": (
        head(b"Link: </a>", status=b"HTTP/1.1 103 Early Hints\r\n") + HELLO + FAKE
    ),
}


def first_and_second(got: Got, methods: tuple[str, ...] = ("GET",)) -> list[tuple[int, bytes]]:
    result = exchanges(got, methods)
    assert MARK not in got.data, f"stray backend bytes reached the client: {got.data!r}"
    return result


@pytest.mark.parametrize("case", sorted(EXTRA))
def test_bytes_after_a_response_never_reach_the_next_client(stack: Stack, case: str) -> None:
    """
    Response smuggling / pool poisoning: the backend sends more than the
    response it framed (here, in the same write).  The client gets exactly
    that response; the next request, on another client connection, gets its
    own; the backend connection with the stray bytes is closed, never reused.
    """
    target = stack.script(case, EXTRA[case])
    assert first_and_second(fetch(stack, target)) == [(200, b"hello")]
    second = stack.target("next")
    assert first_and_second(fetch(stack, second)) == [(200, second)]
    assert_backend_saw_once_and_closed(stack, target)
    assert_recovers(stack)


@pytest.mark.parametrize("case", sorted(EXTRA))
def test_bytes_after_a_response_never_answer_a_pipelined_request(stack: Stack, case: str) -> None:
    """
    The same with the next request pipelined on the same client connection:
    the proxy must not hand the backend connection to that request while
    the rest of the backend's read is still being parsed, or the stray bytes
    become its response.
    """
    target = stack.script(case, EXTRA[case])
    second = stack.target("pipelined")
    with stack.tls() as conn:
        conn.send(request_bytes(target, close=False) + request_bytes(second))
        data, closed = collect(conn)
        got = Got(data, closed, conn.peer)
    assert first_and_second(got) == [(200, b"hello"), (200, second)]
    assert_backend_saw_once_and_closed(stack, target)
    assert_recovers(stack)


def test_bytes_arriving_on_an_idle_connection_close_it(stack: Stack) -> None:
    """
    Stray bytes that come later, while the backend connection waits in the
    pool: the proxy closes that connection (and says so in its log), and the
    next request gets its own response on another.
    """
    gate = stack.gate()
    target = stack.script("late-extra", HELLO, gate, FAKE)
    warnings = stack.proxy.log_text().count("backend sent data on an idle connection")
    assert first_and_second(fetch(stack, target)) == [(200, b"hello")]
    gate.set()
    stack.raw.wait_for(lambda raw: all(c.closed for c in connections_with(stack, target)))
    wait_for(
        lambda: stack.proxy.log_text().count("backend sent data on an idle connection") > warnings,
        10, "the proxy's warning",
    )
    second = stack.target("next")
    assert first_and_second(fetch(stack, second)) == [(200, second)]
    assert_backend_saw_once_and_closed(stack, target)


# == 4. HEAD, 204 and 304 that carry a body anyway

#: case: (method, response with a body it must not have, what the client gets)
BODY_WHERE_NONE: dict[str, tuple[str, bytes, tuple[int, list[str | None]]]] = {
    "head-with-length-and-body": (
        "HEAD", head(b"Content-Length: 13") + BODY, (200, ["13", None])
    ),
    "head-with-length-and-fake-response": (
        "HEAD", head(b"Content-Length: %d" % len(FAKE)) + FAKE, (200, [str(len(FAKE)), None])
    ),
    "head-chunked-with-body": ("HEAD", head(b"Transfer-Encoding: chunked") + CHUNKED_BODY,
                               (200, [None, None])),
    "204-with-length-and-body": (
        "GET", head(b"Content-Length: 13", status=b"HTTP/1.1 204 No Content\r\n") + BODY,
        (204, [None, None]),
    ),
    "204-with-chunked-body": (
        "GET", head(b"Transfer-Encoding: chunked", status=b"HTTP/1.1 204 No Content\r\n")
        + CHUNKED_BODY, (204, [None, None]),
    ),
    "204-with-fake-response": (
        "GET", head(status=b"HTTP/1.1 204 No Content\r\n") + FAKE, (204, [None, None])
    ),
    "304-with-length-and-body": (
        "GET", head(b"Content-Length: 13", status=b"HTTP/1.1 304 Not Modified\r\n") + BODY,
        (304, ["13", None]),
    ),
    "304-with-fake-response": (
        "GET", head(status=b"HTTP/1.1 304 Not Modified\r\n") + FAKE, (304, [None, None])
    ),
}


def assert_bodiless(response: HttpResponse, expected: tuple[int, list[str | None]]) -> None:
    status, (length, coding) = expected
    assert response.status == status, response
    assert response.body == b""
    assert response.header("Content-Length") == length, response.headers
    assert response.header("Transfer-Encoding") == coding, response.headers


@pytest.mark.parametrize("pipelined", [False, True], ids=["next-client", "pipelined"])
@pytest.mark.parametrize("case", sorted(BODY_WHERE_NONE))
def test_body_on_a_bodiless_response_is_never_forwarded(
    stack: Stack, case: str, pipelined: bool
) -> None:
    """
    RFC 9112 6.3 (1): a response to HEAD, and a 204 or 304, ends with its
    head whatever its fields say.  A backend that sends a body anyway: the
    client gets the head, correctly framed, and the next request (pipelined
    or on another connection) its own response; the backend connection with
    the stray body is not reused.
    """
    method, response, expected = BODY_WHERE_NONE[case]
    target = stack.script(case, response)
    second = stack.target("next")
    with stack.tls() as conn:
        if pipelined:
            conn.send(request_bytes(target, method.encode(), close=False) + request_bytes(second))
        else:
            conn.send(request_bytes(target, method.encode()))
        data, closed = collect(conn)
        got = Got(data, closed, conn.peer)
    responses, rest = parse(got.data, (method, "GET"))
    assert rest == b"" and got.closed, got
    assert MARK not in got.data, f"the stray body reached the client: {got.data!r}"
    assert_bodiless(responses[0], expected)
    if pipelined:
        assert [(r.status, r.body) for r in responses[1:]] == [(200, second)], got
    else:
        assert len(responses) == 1, got
        assert first_and_second(fetch(stack, second)) == [(200, second)]
    assert_backend_saw_once_and_closed(stack, target)
    assert_recovers(stack)


# == 5. Interim (1xx) responses

INTERIM: dict[str, tuple[bytes, list[int], list[int]]] = {
    # case: (what comes before HELLO, interim codes an HTTP/1.1 client sees, an HTTP/1.0 one)
    "100-continue": (head(status=b"HTTP/1.1 100 Continue\r\n"), [], []),
    "103-early-hints": (head(b"Link: </style.css>; rel=preload",
                             status=b"HTTP/1.1 103 Early Hints\r\n"), [103], []),
    "100-then-two-103": (
        head(status=b"HTTP/1.1 100 Continue\r\n")
        + head(b"Link: </a>", status=b"HTTP/1.1 103 Early Hints\r\n")
        + head(b"Link: </b>", status=b"HTTP/1.1 103 Early Hints\r\n"),
        [103, 103], [],
    ),
    "102-processing": (head(status=b"HTTP/1.1 102 Processing\r\n"), [102], []),
}


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
@pytest.mark.parametrize("case", sorted(INTERIM))
def test_interim_responses_before_the_final_one(stack: Stack, case: str, version: str) -> None:
    """
    RFC 9110 15.2: 1xx responses before the final one.  100 Continue is the
    proxy's own business (it answers Expect itself) and is dropped; others
    go to HTTP/1.1 clients and never to HTTP/1.0 ones (RFC 9110 15.2); the
    final response follows, complete, and the backend connection stays
    usable.
    """
    before, interim_11, interim_10 = INTERIM[case]
    target = stack.script(case, before + HELLO)
    got = fetch(stack, target, version=version.encode())
    responses, rest = parse(got.data)
    assert rest == b"" and got.closed, got
    assert [(r.status, r.body) for r in responses] == [(200, b"hello")], got
    assert responses[0].interim == (interim_11 if version == "HTTP/1.1" else interim_10), got
    second = stack.target("next")
    assert first_and_second(fetch(stack, second)) == [(200, second)]
    (conn,) = connections_with(stack, target)
    assert [r.target for r in conn.requests()] == [target, second], (
        "a well-framed response after 1xx should leave the backend connection reusable"
    )


# == 6. Well-framed responses keep the pooled connection (the fixes above must not cost that)

CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"
GOOD: dict[str, tuple[str, bytes, tuple[int, bytes]]] = {
    "content-length": ("GET", HELLO, (200, b"hello")),
    "chunked": ("GET", head(b"Transfer-Encoding: chunked") + CHUNKED_HELLO, (200, b"hello")),
    "chunked-with-trailers": (
        "GET", head(b"Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\nT: 1\r\n\r\n",
        (200, b"hello"),
    ),
    "chunked-upper-case-te": (
        "GET", head(b"Transfer-Encoding: Chunked") + CHUNKED_HELLO, (200, b"hello")
    ),
    "head-with-length": ("HEAD", head(b"Content-Length: 5"), (200, b"")),
    "204": ("GET", head(status=b"HTTP/1.1 204 No Content\r\n"), (204, b"")),
    "304": ("GET", head(b'ETag: "x"', status=b"HTTP/1.1 304 Not Modified\r\n"), (304, b"")),
}


@pytest.mark.parametrize("case", sorted(GOOD))
def test_well_framed_response_leaves_the_connection_reusable(stack: Stack, case: str) -> None:
    """
    Positive control: after a well-framed response the next request reuses
    the same backend connection, so the tests above show stray bytes being
    refused, not keep-alive being lost.
    """
    method, response, expected = GOOD[case]
    target = stack.script(case, response)
    got = fetch(stack, target, method.encode())
    assert exchanges(got, (method,)) == [expected]
    second = stack.target("next")
    assert first_and_second(fetch(stack, second)) == [(200, second)]
    (conn,) = connections_with(stack, target)
    assert [r.target for r in conn.requests()] == [target, second]
    assert not conn.closed


def test_close_delimited_response_reaches_the_client_whole(stack: Stack) -> None:
    """
    RFC 9112 6.3 (8): a response without Content-Length or chunked is read
    to the close; the proxy re-frames it (chunked for HTTP/1.1) and the
    client gets all of it, complete.
    """
    target = stack.script("close-delimited", head() + b"hello, " + b"world", CLOSE)
    assert first_and_second(fetch(stack, target)) == [(200, b"hello, world")]
    assert_recovers(stack)
