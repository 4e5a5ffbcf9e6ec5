"""
A raw-socket backend that records exactly what the proxy forwards.

L{RawBackend} is a plain TCP server on 127.0.0.1 (a thread per connection)
that keeps every byte each connection received, splits the stream into
requests with L{split_requests} (a strict RFC 9112 parser, independent of
llhttp, so that it judges the proxy's output rather than agreeing with it),
and answers each request it can delimit with a fixed Content-Length response.
Tests then assert on what was forwarded byte for byte.

L{split_requests} is also what the in-memory property tests
(C{tests/test_parsing_properties.py}) and the fuzzer (C{fuzz/fuzz_request.py})
use to read the proxy's output: one notion of "what the backend sees".

How a request is delimited (RFC 9112 section 6.3), strictly:

  - both C{Content-Length} and C{Transfer-Encoding}: not delimitable
    (the backend would have to guess; the proxy must never send that);
  - C{Transfer-Encoding} whose only coding is C{chunked}: chunked, with
    C{HEXDIG} sizes, CRLF line ends, trailers read and discarded;
  - any other C{Transfer-Encoding}: not delimitable;
  - C{Content-Length}: one or more fields, each all digits and all equal
    (RFC 9110 section 8.6 lets a recipient accept equal duplicates; the count
    is kept in L{RawRequest.framing_fields} so that tests can insist on one);
  - neither: no body.

With C{respond_early} the backend answers as soon as a request's head is
complete and then reads the body it declared, as Node.js's http server and
h11-based servers do when the application does not read the body: the
behaviour that turns a proxy's framing mistake into a desynchronised
keep-alive connection.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

#: RFC 9110 token characters (for methods and field names)
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEX = re.compile(rb"^[0-9A-Fa-f]+$")
_DIGITS = re.compile(rb"^[0-9]+$")
#: field-value characters: VCHAR, obs-text, SP and HTAB (no CTLs, no DEL)
_FIELD_VALUE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")
_VERSION = re.compile(rb"^HTTP/[0-9]\.[0-9]$")

DEFAULT_BODY = b"raw backend ok\n"


def canonical_name(name: bytes) -> bytes:
    """A field name as WSGI/CGI applications see it: case and C{-}/C{_} do not matter."""
    return name.strip().lower().replace(b"_", b"-")


class Malformed(Exception):
    """The stream is not a well-formed HTTP/1.1 request; the backend cannot go on."""


@dataclasses.dataclass
class RawRequest:
    """
    One request as the backend delimited it.

    @ivar raw: every byte of the request, head and framed body.
    @ivar body: the body after removing the framing (chunks decoded).
    @ivar framing: C{"content-length"}, C{"chunked"} or C{"none"}.
    @ivar framing_fields: the C{Content-Length} and C{Transfer-Encoding}
        field lines of the head, as received (a canonical request has at most one).
    @ivar complete: whether the whole body arrived (only the last request of a
        connection can be incomplete).
    """

    raw: bytes
    head: bytes
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    framing: str
    framing_fields: list[tuple[bytes, bytes]]
    complete: bool
    declared_length: int | None = None
    #: the chunk-size lines as received (extensions included), last chunk too
    chunks: list[bytes] = dataclasses.field(default_factory=list)
    #: the trailer section of a chunked body, as received
    trailers: bytes = b""

    def values(self, name: str | bytes) -> list[bytes]:
        """Values of every field called C{name}, ignoring case and C{-}/C{_}."""
        wanted = canonical_name(name.encode() if isinstance(name, str) else name)
        return [v for n, v in self.headers if canonical_name(n) == wanted]

    def names(self) -> list[bytes]:
        return [canonical_name(n) for n, _ in self.headers]


def _parse_head(head: bytes) -> tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]]:
    """Request line and fields of a head (without its final CRLF CRLF), strictly."""
    lines = head.split(b"\r\n")
    for line in lines:
        if b"\n" in line or b"\r" in line:
            raise Malformed(f"bare CR or LF in the head: {line[:80]!r}")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise Malformed(f"request line is not METHOD SP TARGET SP VERSION: {lines[0][:200]!r}")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise Malformed(f"method is not a token: {method!r}")
    if not target or any(b <= 0x20 or b == 0x7F for b in target):
        raise Malformed(f"invalid request-target: {target[:200]!r}")
    if not _VERSION.match(version):
        raise Malformed(f"invalid HTTP version: {version!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise Malformed(f"obs-fold: {line[:80]!r}")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise Malformed(f"invalid field line: {line[:200]!r}")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.match(value):
            raise Malformed(f"invalid field value of {name!r}: {value[:80]!r}")
        headers.append((name, value))
    return method, target, version, headers


def _read_chunked(
    data: bytes, start: int
) -> tuple[bytes, list[bytes], bytes, int] | None:
    """
    Decode a chunked body beginning at C{start}: (body, chunk-size lines as
    sent, extensions included, trailer section, end offset), or None if it
    has not all arrived.

    @raise Malformed: for anything RFC 9112 section 7.1 does not allow.
    """
    pos = start
    body = bytearray()
    chunks: list[bytes] = []
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            if b"\n" in data[pos:]:
                raise Malformed("bare LF in a chunk-size line")
            return None
        line = data[pos:eol]
        if b"\n" in line or b"\r" in line:
            raise Malformed(f"bare CR or LF in a chunk-size line: {line!r}")
        size_text, _, _ext = line.partition(b";")
        if not _HEX.match(size_text):
            raise Malformed(f"invalid chunk size: {line!r}")
        size = int(size_text, 16)
        chunks.append(line)
        pos = eol + 2
        if size == 0:
            # trailer section, then CRLF
            trailer_start = pos
            while True:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return bytes(body), chunks, data[trailer_start:pos], eol + 2
                pos = eol + 2
        if len(data) < pos + size + 2:
            return None
        body += data[pos : pos + size]
        if data[pos + size : pos + size + 2] != b"\r\n":
            raise Malformed("chunk data not followed by CRLF")
        pos += size + 2


def split_requests(data: bytes) -> tuple[list[RawRequest], bytes, str | None]:
    """
    Split what a backend connection received into requests.

    @return: (requests, the bytes after the last request that began, error).
        The last request may be incomplete (C{complete=False}); its bytes are
        then both in its C{raw} and in the remainder.  C{error} says why the
        stream could not be read on (a request the backend cannot delimit);
        the remainder then starts at the offending request.
    """
    requests: list[RawRequest] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            if data.find(b"\n\n", pos) >= 0 or data.find(b"\r\n\n", pos) >= 0:
                return requests, data[pos:], "head ends with a bare LF"
            return requests, data[pos:], None  # head not complete yet
        head = data[pos:end]
        try:
            method, target, version, headers = _parse_head(head)
        except Malformed as e:
            return requests, data[pos:], str(e)
        body_start = end + 4
        framing_fields = [
            (n, v) for n, v in headers if n.lower() in (b"content-length", b"transfer-encoding")
        ]
        lengths = [v for n, v in headers if n.lower() == b"content-length"]
        codings = [v for n, v in headers if n.lower() == b"transfer-encoding"]
        request = RawRequest(
            raw=b"", head=data[pos:body_start], method=method, target=target,
            version=version, headers=headers, body=b"", framing="none",
            framing_fields=framing_fields, complete=False,
        )
        if lengths and codings:
            return requests, data[pos:], "both Content-Length and Transfer-Encoding"
        if codings:
            tokens = [t.strip().lower() for v in codings for t in v.split(b",")]
            if tokens != [b"chunked"]:
                return requests, data[pos:], f"Transfer-Encoding {codings!r}"
            request.framing = "chunked"
            try:
                decoded = _read_chunked(data, body_start)
            except Malformed as e:
                requests.append(request)
                request.raw = data[pos:]
                return requests, data[pos:], str(e)
            if decoded is None:
                request.raw = data[pos:]
                request.body = b""
                requests.append(request)
                return requests, data[pos:], None
            request.body, request.chunks, request.trailers, stop = decoded
        elif lengths:
            if not all(_DIGITS.match(v) for v in lengths) or len({int(v) for v in lengths}) != 1:
                return requests, data[pos:], f"Content-Length {lengths!r}"
            length = int(lengths[0])
            request.framing = "content-length"
            request.declared_length = length
            stop = body_start + length
            if len(data) < stop:
                request.raw = data[pos:]
                request.body = data[body_start:]
                requests.append(request)
                return requests, data[pos:], None
            request.body = data[body_start:stop]
        else:
            stop = body_start
        request.raw = data[pos:stop]
        request.complete = True
        requests.append(request)
        pos = stop
    return requests, b"", None


def fixed_response(body: bytes, status: bytes = b"200 OK") -> bytes:
    """A complete response with C{Content-Length} (the raw backend's answer)."""
    return (
        b"HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
        % (status, len(body), body)
    )


@dataclasses.dataclass
class RawConnection:
    """One connection the proxy opened to the backend, and what came over it."""

    index: int
    data: bytearray = dataclasses.field(default_factory=bytearray)
    closed: bool = False
    #: "eof" for an orderly close, "reset" for an RST, "" while open
    how: str = ""
    answered: int = 0
    error: str | None = None

    def requests(self) -> list[RawRequest]:
        return split_requests(bytes(self.data))[0]


class RawBackend:
    """
    The recording backend (use as a context manager, or L{start}/L{stop}).

    @ivar response: what every delimited request is answered with (bytes, or
        a function of the request); the default is L{fixed_response}.
    @ivar delay: seconds to wait before answering a request (a function of
        the request), to make a slow backend.
    """

    def __init__(
        self,
        respond_early: bool = False,
        response: bytes | Callable[[RawRequest], bytes] | None = None,
        delay: Callable[[RawRequest], float] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.respond_early = respond_early
        self.response = response or fixed_response(DEFAULT_BODY)
        self.delay = delay
        self._host = host
        self._lock = threading.Lock()
        self._connections: list[RawConnection] = []
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self.port = 0

    # -- life ----------------------------------------------------------------

    def start(self) -> RawBackend:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._host, 0))
        listener.listen(128)
        listener.settimeout(0.2)
        self._listener = listener
        self.port = listener.getsockname()[1]
        thread = threading.Thread(target=self._accept_loop, name="rawbackend-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> RawBackend:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- what was received -----------------------------------------------------

    def connections(self) -> list[RawConnection]:
        """A snapshot of every connection since the last L{reset}."""
        with self._lock:
            return [
                RawConnection(c.index, bytearray(c.data), c.closed, c.how, c.answered, c.error)
                for c in self._connections
            ]

    def received(self) -> bytes:
        """Everything received since the last L{reset}, connections in order of opening."""
        return b"".join(bytes(c.data) for c in self.connections())

    def requests(self) -> list[RawRequest]:
        """Every request (complete or not) of every connection since the last L{reset}."""
        return [r for c in self.connections() for r in c.requests()]

    def reset(self) -> None:
        """Forget what was received so far; open connections stay open and are recorded anew."""
        with self._lock:
            for conn in self._connections:
                conn.data.clear()
                conn.answered = 0
                conn.error = None
            self._connections = [c for c in self._connections if not c.closed]

    def wait_for(self, predicate: Callable[[RawBackend], Any], timeout: float = 10.0) -> Any:
        """Poll C{predicate(self)} until it is true; raise AssertionError after C{timeout}."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate(self)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"raw backend: condition not met in {timeout:g} s; "
                    f"received {self.received()[:2000]!r}"
                )
            time.sleep(0.02)

    def wait_quiet(self, quiet: float = 0.3, timeout: float = 10.0) -> None:
        """Wait until no byte has arrived for C{quiet} seconds (late bytes would show)."""
        deadline = time.monotonic() + timeout
        last = self.received()
        still_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.received()
            if now != last:
                last, still_since = now, time.monotonic()
            elif time.monotonic() - still_since >= quiet:
                return

    # -- serving ---------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                conn = RawConnection(len(self._connections))
                self._connections.append(conn)
                self._sockets.append(sock)
            thread = threading.Thread(
                target=self._serve, args=(sock, conn), name="rawbackend-conn", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _mark(self, conn: RawConnection, how: str) -> None:
        with self._lock:
            conn.closed, conn.how = True, how

    def _serve(self, sock: socket.socket, conn: RawConnection) -> None:
        sock.settimeout(0.2)
        try:
            while not self._stopping.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    self._mark(conn, "reset")
                    return
                except OSError:
                    self._mark(conn, "error")
                    return
                if not data:
                    self._mark(conn, "eof")
                    return
                with self._lock:
                    conn.data += data
                    snapshot = bytes(conn.data)
                    answered = conn.answered
                requests, _, error = split_requests(snapshot)
                due = len(requests) if self.respond_early else sum(r.complete for r in requests)
                for request in requests[answered:due]:
                    with self._lock:
                        conn.answered += 1
                    if not self._answer(sock, conn, request):
                        return
                if error is not None:
                    # The stream cannot be read on: a real server would close here.
                    with self._lock:
                        conn.error = error
                    self._mark(conn, "closed by backend: " + error)
                    return
        finally:
            with self._lock:
                if sock in self._sockets:
                    self._sockets.remove(sock)
            try:
                sock.close()
            except OSError:
                pass

    def _answer(self, sock: socket.socket, conn: RawConnection, request: RawRequest) -> bool:
        """Answer one request; False when the connection has ended."""
        if self.delay is not None:
            time.sleep(self.delay(request))
        response = self.response
        try:
            sock.sendall(response(request) if callable(response) else response)
        except OSError:
            self._mark(conn, "reset while answering")
            return False
        return True
