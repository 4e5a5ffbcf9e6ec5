#!/usr/bin/env python3
"""
A "legacy" plain-HTTP application with no authentication of its own.

It stands for the application mtlsproxy protects: it trusts whatever the
proxy tells it in ``X-Client-Cert-CN`` and greets the client by that name.
Standard library only, so it runs anywhere a Python 3.11 does::

    python examples/legacy_app.py --listen 127.0.0.1:8080
    python examples/legacy_app.py --unix /run/legacy/app.sock

It prints one line, ``legacy app listening on ...``, once it accepts
connections (``--listen 127.0.0.1:0`` picks a free port and prints it).

Endpoints (the end-to-end tests use them as a real backend):

``GET /``, any unknown path or method
    A greeting, ``Hello, <CN>! ...``; the JSON echo below instead when the
    request says ``Accept: application/json``.
``ANY /echo...``
    JSON: method, the raw request-target exactly as received, version, the
    headers in received order (repeated ones kept), body length and SHA-256.
    ``HEAD`` gets the headers only.
``GET /download?bytes=N[&chunked=1][&rate=BYTES_PER_SEC]``
    N bytes of the pattern ``bytes(range(256))`` repeated, with
    Content-Length or chunked, at most ``rate`` bytes per second.
``POST|PUT /upload[?rate=BYTES_PER_SEC]``
    Reads the body in chunks (at most ``rate`` bytes per second), answers JSON
    ``{"body_length", "body_sha256"}``.
``GET /slow?delay=S``
    Waits S seconds before answering.
``GET /status/CODE``
    Answers with that status (204 and 304 without a body).
``GET /close``
    Answers with ``Connection: close`` and closes the connection.

HTTP/1.1 keep-alive, Content-Length and chunked request bodies and
``Expect: 100-continue`` are handled here, since ``http.server`` does not
decode chunked bodies.  Nothing is logged per request unless ``--verbose``
(one short line to stderr, never a body); ``--request-log FILE`` appends the
request line of every request received to FILE, so that tests can tell that
nothing reached the application.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import socketserver
import sys
import threading
import time
from urllib.parse import parse_qs, unquote, urlsplit

MAX_LINE = 65536
MAX_HEADERS = 256
PATTERN = bytes(range(256))
IO_CHUNK = 64 * 1024
IDLE_TIMEOUT = 300.0

REASONS = {
    100: "Continue",
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    206: "Partial Content",
    301: "Moved Permanently",
    302: "Found",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    418: "I'm a teapot",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class BadRequest(Exception):
    """The request cannot be parsed; answer 400 and close."""


class Request:
    """One parsed request head, and a reader for its body."""

    def __init__(self, method: str, target: str, version: str, headers: list[tuple[str, str]]):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body: BodyReader | None = None

    def get(self, name: str) -> list[str]:
        lower = name.lower()
        return [v for n, v in self.headers if n.lower() == lower]

    def first(self, name: str, default: str | None = None) -> str | None:
        values = self.get(name)
        return values[0] if values else default

    def connection_tokens(self) -> set[str]:
        tokens: set[str] = set()
        for value in self.get("Connection"):
            tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
        return tokens

    def wants_keep_alive(self) -> bool:
        tokens = self.connection_tokens()
        if self.version == "HTTP/1.1":
            return "close" not in tokens
        return "keep-alive" in tokens

    def can_keep_alive(self) -> bool:
        """Keep-alive wanted, and no body left that the client has not been asked for."""
        unasked = self.body is not None and self.body.unread_and_unannounced
        return self.wants_keep_alive() and not unasked

    @property
    def path(self) -> str:
        return urlsplit(self.target).path if "://" in self.target else self.target.split("?")[0]

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query, keep_blank_values=True)


class BodyReader:
    """Reads a request body framed by Content-Length or chunked encoding."""

    def __init__(self, handler: Handler, length: int | None, chunked: bool, expect_continue: bool):
        self._handler = handler
        self._rfile = handler.rfile
        self._remaining = length or 0
        self._chunked = chunked
        self._chunk_left = 0
        self._done = not chunked and not length
        self._expect_continue = expect_continue
        self.trailers: list[tuple[str, str]] = []

    @property
    def done(self) -> bool:
        return self._done

    @property
    def unread_and_unannounced(self) -> bool:
        """The client still waits for 100 Continue: we never asked for the body."""
        return self._expect_continue and not self._done

    def _announce(self) -> None:
        if self._expect_continue:
            self._expect_continue = False
            self._handler.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def read(self, size: int = IO_CHUNK) -> bytes:
        """Up to C{size} bytes of body; C{b""} at its end."""
        if self._done:
            return b""
        self._announce()
        if not self._chunked:
            data = self._rfile.read(min(size, self._remaining))
            if not data:
                raise BadRequest("connection closed inside the body")
            self._remaining -= len(data)
            if self._remaining == 0:
                self._done = True
            return data
        if self._chunk_left == 0:
            line = self._rfile.readline(MAX_LINE + 1)
            if not line.endswith(b"\n"):
                raise BadRequest("bad chunk size line")
            size_text = line.split(b";", 1)[0].strip()
            try:
                if not size_text or not all(c in b"0123456789abcdefABCDEF" for c in size_text):
                    raise ValueError
                self._chunk_left = int(size_text, 16)
            except ValueError:
                raise BadRequest("bad chunk size") from None
            if self._chunk_left == 0:
                self.trailers = read_header_block(self._rfile)
                self._done = True
                return b""
        data = self._rfile.read(min(size, self._chunk_left))
        if not data:
            raise BadRequest("connection closed inside a chunk")
        self._chunk_left -= len(data)
        if self._chunk_left == 0 and self._rfile.readline(3) not in (b"\r\n", b"\n"):
            raise BadRequest("chunk not followed by CRLF")
        return data

    def consume(self, rate: float | None = None) -> tuple[int, str]:
        """Read the whole body (at most C{rate} bytes/s); return its length and SHA-256."""
        digest = hashlib.sha256()
        total = 0
        start = time.monotonic()
        size = IO_CHUNK if not rate else max(1, min(IO_CHUNK, int(rate / 20)))
        while True:
            data = self.read(size)
            if not data:
                break
            digest.update(data)
            total += len(data)
            if rate:
                pace(start, total, rate)
        return total, digest.hexdigest()


def pace(start: float, done: int, rate: float) -> None:
    """Sleep until C{done} bytes since C{start} are no faster than C{rate} bytes/s."""
    ahead = done / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)


def read_header_block(rfile) -> list[tuple[str, str]]:
    """Header lines up to the blank line, names and values as received (latin-1)."""
    headers: list[tuple[str, str]] = []
    while True:
        line = rfile.readline(MAX_LINE + 1)
        if not line:
            raise BadRequest("connection closed inside the headers")
        if not line.endswith(b"\n"):
            raise BadRequest("header line too long")
        if line in (b"\r\n", b"\n"):
            return headers
        if line[:1] in (b" ", b"\t"):
            raise BadRequest("obsolete line folding")
        if len(headers) >= MAX_HEADERS:
            raise BadRequest("too many headers")
        name, sep, value = line.rstrip(b"\r\n").partition(b":")
        if not sep or not name or name != name.strip():
            raise BadRequest("malformed header line")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))


class Handler(socketserver.StreamRequestHandler):
    """One client connection: requests one after the other (keep-alive)."""

    timeout = IDLE_TIMEOUT
    wbufsize = 0

    server: AppServer

    def write(self, data: bytes) -> None:
        self.wfile.write(data)

    def handle(self) -> None:
        try:
            while self.handle_one():
                pass
        except (ConnectionError, TimeoutError, OSError):
            pass

    def handle_one(self) -> bool:
        try:
            request = self.read_request()
        except BadRequest as e:
            self.respond(None, 400, text_body(f"bad request: {e}\n"), close=True)
            return False
        if request is None:
            return False
        self.server.note(request)
        keep_alive = self.dispatch(request)
        body = request.body
        if body is not None and not body.done:
            if body.unread_and_unannounced:
                return False
            try:
                body.consume()
            except BadRequest:
                return False
        return keep_alive

    def read_request(self) -> Request | None:
        line = self.rfile.readline(MAX_LINE + 1)
        while line in (b"\r\n", b"\n"):  # tolerated between requests (RFC 9112 2.2)
            line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            return None
        self.server.note_line(line)
        if not line.endswith(b"\n"):
            raise BadRequest("request line too long")
        parts = line.rstrip(b"\r\n").split(b" ")
        if len(parts) != 3 or not all(parts):
            raise BadRequest("malformed request line")
        method, target, version = (p.decode("latin-1") for p in parts)
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            raise BadRequest(f"unsupported version {version!r}")
        request = Request(method, target, version, read_header_block(self.rfile))
        transfer_encoding = request.get("Transfer-Encoding")
        lengths = request.get("Content-Length")
        chunked = False
        length: int | None = None
        if transfer_encoding:
            if lengths:
                raise BadRequest("both Content-Length and Transfer-Encoding")
            codings = [c.strip().lower() for v in transfer_encoding for c in v.split(",")]
            if codings != ["chunked"]:
                raise BadRequest(f"unsupported transfer coding {transfer_encoding!r}")
            chunked = True
        elif lengths:
            values = {v.strip() for value in lengths for v in value.split(",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise BadRequest(f"bad Content-Length {lengths!r}")
            length = int(values.pop())
        expect = (request.first("Expect") or "").lower() == "100-continue"
        request.body = BodyReader(
            self, length, chunked, expect and version == "HTTP/1.1" and (chunked or bool(length))
        )
        return request

    # -- responses ---------------------------------------------------------

    def respond(
        self,
        request: Request | None,
        status: int,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        close: bool = False,
    ) -> bool:
        """Send a whole response; return whether the connection stays open."""
        keep_alive = not close and request is not None and request.can_keep_alive()
        all_headers = list(headers or [])
        bodiless = status in (204, 304) or 100 <= status < 200
        if not bodiless:
            all_headers.append(("Content-Length", str(len(body))))
        self.write(head_bytes(status, all_headers, keep_alive, request))
        if not bodiless and not (request is not None and request.method == "HEAD"):
            self.write(body)
        return keep_alive

    # -- routing -----------------------------------------------------------

    def dispatch(self, request: Request) -> bool:
        path = request.path
        method = request.method
        if path.startswith("/echo"):
            return self.echo(request)
        if method in ("GET", "HEAD"):
            if path == "/download":
                return self.download(request)
            if path == "/slow":
                return self.slow(request)
            if path.startswith("/status/"):
                return self.status(request)
            if path == "/close":
                return self.respond(request, 200, text_body("goodbye\n"), close=True)
        if method in ("POST", "PUT") and path == "/upload":
            return self.upload(request)
        if "application/json" in (request.first("Accept") or "").lower():
            return self.echo(request)
        return self.greet(request)

    def greet(self, request: Request) -> bool:
        cn = request.first("X-Client-Cert-CN")
        name = unquote(cn, errors="replace") if cn else "anonymous"
        text = f"Hello, {name}! You reached the legacy app through mtlsproxy.\n"
        return self.respond(request, 200, text_body(text), [("Content-Type", TEXT)])

    def echo(self, request: Request) -> bool:
        assert request.body is not None
        try:
            length, sha = request.body.consume()
        except BadRequest as e:
            return self.respond(request, 400, text_body(f"bad request: {e}\n"), close=True)
        document = {
            "method": request.method,
            "target": request.target,
            "version": request.version,
            "headers": [[n, v] for n, v in request.headers],
            "body_length": length,
            "body_sha256": sha,
            "trailers": [[n, v] for n, v in request.body.trailers],
        }
        return self.respond(request, 200, json_body(document), [("Content-Type", JSON)])

    def upload(self, request: Request) -> bool:
        assert request.body is not None
        rate = number(request.query, "rate")
        try:
            length, sha = request.body.consume(rate)
        except BadRequest as e:
            return self.respond(request, 400, text_body(f"bad request: {e}\n"), close=True)
        document = {"body_length": length, "body_sha256": sha}
        return self.respond(request, 200, json_body(document), [("Content-Type", JSON)])

    def download(self, request: Request) -> bool:
        size = int(number(request.query, "bytes") or 0)
        rate = number(request.query, "rate")
        chunked = request.query.get("chunked", ["0"])[0] not in ("", "0")
        keep_alive = request.can_keep_alive()
        headers = [("Content-Type", "application/octet-stream")]
        if chunked and request.version == "HTTP/1.1":
            headers.append(("Transfer-Encoding", "chunked"))
        elif chunked:  # an HTTP/1.0 client: the end of the body is the end of the connection
            keep_alive = False
        else:
            headers.append(("Content-Length", str(size)))
        self.write(head_bytes(200, headers, keep_alive, request))
        if request.method == "HEAD":
            return keep_alive
        framed = chunked and request.version == "HTTP/1.1"
        block = memoryview(PATTERN * (IO_CHUNK // len(PATTERN) + 1))
        step = IO_CHUNK if not rate else max(1, min(IO_CHUNK, int(rate / 20)))
        sent = 0
        start = time.monotonic()
        while sent < size:
            n = min(step, size - sent)
            offset = sent % len(PATTERN)
            data = bytes(block[offset : offset + n])
            if rate:  # byte k leaves no earlier than k/rate seconds after the start
                pace(start, sent + n, rate)
            self.write(b"%x\r\n%s\r\n" % (n, data) if framed else data)
            sent += n
        if framed:
            self.write(b"0\r\n\r\n")
        return keep_alive

    def slow(self, request: Request) -> bool:
        delay = number(request.query, "delay") or 0.0
        time.sleep(min(delay, 3600.0))
        text = f"slept {delay:g} s\n"
        return self.respond(request, 200, text_body(text), [("Content-Type", TEXT)])

    def status(self, request: Request) -> bool:
        code_text = request.path[len("/status/") :]
        if not code_text.isdigit() or not 200 <= int(code_text) <= 599:
            return self.respond(request, 400, text_body("status must be 200..599\n"))
        code = int(code_text)
        headers = [("Content-Type", TEXT)]
        if code in (204, 304):
            headers = [("ETag", '"legacy"')] if code == 304 else []
        return self.respond(request, code, text_body(f"status {code}\n"), headers)


TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


def text_body(text: str) -> bytes:
    return text.encode("utf-8")


def json_body(document: object) -> bytes:
    return (json.dumps(document, indent=1) + "\n").encode("utf-8")


def number(query: dict[str, list[str]], name: str) -> float | None:
    values = query.get(name)
    if not values:
        return None
    try:
        value = float(values[0])
    except ValueError:
        return None
    return value if value > 0 else None


def head_bytes(
    status: int, headers: list[tuple[str, str]], keep_alive: bool, request: Request | None
) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    lines.append("Server: legacy-app")
    lines.extend(f"{n}: {v}" for n, v in headers)
    if not keep_alive:
        lines.append("Connection: close")
    elif request is not None and request.version == "HTTP/1.0":
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class AppServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    request_log: str | None = None
    verbose = False
    _log_lock = threading.Lock()

    def note_line(self, line: bytes) -> None:
        """Record every request line received (tests read this file)."""
        if self.request_log is None:
            return
        text = line.rstrip(b"\r\n").decode("latin-1").encode("unicode_escape").decode("ascii")
        with self._log_lock, open(self.request_log, "a", encoding="ascii") as f:
            f.write(text + "\n")

    def note(self, request: Request) -> None:
        if self.verbose:
            cn = request.first("X-Client-Cert-CN", "-")
            target = request.target.encode("unicode_escape").decode("ascii")
            print(f"legacy app: {cn} {request.method} {target}", file=sys.stderr, flush=True)


class UnixAppServer(AppServer):
    address_family = socket.AF_UNIX
    allow_reuse_address = False

    def server_bind(self) -> None:
        if os.path.exists(self.server_address):
            os.unlink(self.server_address)
        super().server_bind()

    def get_request(self):
        sock, _ = self.socket.accept()
        return sock, ("unix", 0)


class IPv6AppServer(AppServer):
    address_family = socket.AF_INET6


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--listen", type=parse_listen, metavar="HOST:PORT",
        help="TCP address to listen on (default 127.0.0.1:8080; port 0 picks a free one)",
    )
    where.add_argument("--unix", metavar="PATH", help="listen on this unix socket instead")
    parser.add_argument(
        "--request-log", metavar="FILE", help="append the request line of every request to FILE"
    )
    parser.add_argument("--verbose", action="store_true", help="one line per request to stderr")
    args = parser.parse_args(argv)

    server: AppServer
    if args.unix:
        server = UnixAppServer(args.unix, Handler)
        shown = f"unix:{args.unix}"
    else:
        host, port = args.listen or ("127.0.0.1", 8080)
        cls = IPv6AppServer if ":" in host else AppServer
        server = cls((host, port), Handler)
        bound_host, bound_port = server.server_address[:2]
        shown = f"http://[{bound_host}]:{bound_port}" if ":" in host else (
            f"http://{bound_host}:{bound_port}"
        )
    server.request_log = args.request_log
    server.verbose = args.verbose
    print(f"legacy app listening on {shown}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if args.unix and os.path.exists(args.unix):
            os.unlink(args.unix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
