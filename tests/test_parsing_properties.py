"""
Property tests of the request path, in memory (the style of test_forwarding.py).

A L{Driver} feeds bytes to a L{ClientConnection} in arbitrary pieces, as a TLS
transport would, answers every request that reaches the fake backend, and
delivers connection losses the way Twisted does (a transport that was told to
lose its connection may still deliver data until it is gone).  What the
backend received is read with L{tests.e2e.rawbackend.split_requests}, a strict
RFC 9112 parser that does not share llhttp's code, and compared with llhttp's
own parse of the client's bytes (L{reference_messages}): the proxy must
forward exactly what it parsed, framed so that no backend can read it any
other way.

L{check_invariants} is also what C{fuzz/fuzz_request.py} asserts.
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Any
from urllib.parse import unquote_to_bytes

import httptools
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mtlsproxy.config import Backend
from mtlsproxy.http.backend import BackendPool
from mtlsproxy.http.server import ClientConnection, ProxyFactory, ProxySettings
from mtlsproxy.identity import ClientIdentity, HeaderSettings, identity_headers

from . import certfactory
from .e2e.rawbackend import RawRequest, canonical_name, split_requests
from .test_forwarding import SETTINGS, ClientTransport, FakeEndpoint

CERT = certfactory.make_client(certfactory.make_ca(), "alice").cert
CN = b"alice"
PEER = b"192.0.2.7"

#: the names only the proxy may send, canonical (lower case, "_" as "-")
PROXY_SET = {b"x-client-cert-cn", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
RESERVED_EXACT = {b"forwarded", b"client-cert", b"client-cert-chain"}
RESERVED_PREFIXES = (b"x-client-cert", b"x-forwarded-")
HOP_BY_HOP = {
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-connection",
}


def response_for(request: RawRequest) -> bytes:
    """What the fake backend answers: 200 with a two-byte body (headers only for HEAD)."""
    if request.method == b"HEAD":
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# -- the driver ---------------------------------------------------------------------


class LenientClientTransport(ClientTransport):
    """
    The client's TLS transport: like Twisted's, it may be paused or resumed
    after loseConnection (StringTransport would raise), and it remembers when
    the proxy first decided to close.
    """

    def __init__(self, cert: Any, on_lose: Any) -> None:
        super().__init__(cert)
        self._lenient = True
        self._on_lose = on_lose

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self._on_lose()
        super().loseConnection()


class LenientEndpoint(FakeEndpoint):
    """Backend connections over lenient StringTransports."""

    def _attach(self, proto: Any) -> None:
        transport = StringTransport(lenient=True)
        proto.makeConnection(transport)
        self.connections.append(proto)


@dataclasses.dataclass
class Forwarded:
    """A request as the backend delimited it, and the connection it came on."""

    connection: int
    request: RawRequest


class Driver:
    """
    One client connection through the proxy, with a backend that answers.

    @ivar respond_early: answer each request as soon as its head has arrived
        (as Node.js or h11 servers do when the application ignores the body),
        else once it is complete.
    @ivar lose_late: deliver the client's connectionLost only at L{finish},
        so that data arriving after the proxy called loseConnection is still
        fed (Twisted's TLS transport does deliver it).
    """

    def __init__(
        self,
        proxy_settings: ProxySettings = SETTINGS,
        respond_early: bool = False,
        lose_late: bool = False,
        cert: Any = CERT,
    ) -> None:
        self.respond_early = respond_early
        self.lose_late = lose_late
        self.clock = Clock()
        self.endpoint = LenientEndpoint()
        self.pool = BackendPool(
            self.clock, Backend(url="http://app:80", host="app", port=80), 5.0,
            endpoint=self.endpoint,  # type: ignore[arg-type]
        )
        self.factory = ProxyFactory(proxy_settings, self.pool, self.clock)
        self.client = ClientConnection(self.factory)
        self.transport = LenientClientTransport(cert, self._closing)
        self.client.makeConnection(self.transport)
        self.client.handshakeCompleted()
        self.client_lost = False
        self.answered: dict[int, int] = {}
        #: how many request heads had reached the backend when the proxy
        #: first called loseConnection on the client
        self.heads_at_close: int | None = None

    def _closing(self) -> None:
        if self.heads_at_close is None:
            self.heads_at_close = len(self.forwarded())

    def feed(self, data: bytes) -> None:
        """Bytes from the client; nothing is delivered once the connection is lost."""
        if self.client_lost:
            return
        self.client.dataReceived(data)
        self.settle()

    def settle(self) -> None:
        """Answer what the backend can answer and deliver losses, until nothing changes."""
        changed = True
        while changed:
            changed = False
            for index, proto in enumerate(self.endpoint.connections):
                if proto.transport.disconnecting:
                    if proto.connected:
                        proto.connectionLost(Failure(error.ConnectionDone()))
                        changed = True
                    continue
                requests, _, problem = split_requests(proto.transport.value())
                if problem is not None:
                    continue
                due = len(requests) if self.respond_early else sum(r.complete for r in requests)
                done = self.answered.get(index, 0)
                if due > done:
                    self.answered[index] = done + 1
                    proto.dataReceived(response_for(requests[done]))
                    changed = True
            if self.transport.disconnecting and not self.client_lost and not self.lose_late:
                self.lose_client()
                changed = True

    def lose_client(self) -> None:
        if not self.client_lost:
            self.client_lost = True
            self.client.connectionLost(Failure(error.ConnectionDone()))

    def finish(self) -> None:
        """The end of the input: settle, then deliver any pending loss."""
        self.settle()
        if self.transport.disconnecting:
            self.lose_client()
            self.settle()

    def backend_bytes(self) -> list[bytes]:
        return [proto.transport.value() for proto in self.endpoint.connections]

    def forwarded(self) -> list[Forwarded]:
        """Every request whose head reached the backend, in the order they were sent."""
        found = []
        for index, data in enumerate(self.backend_bytes()):
            for request in split_requests(data)[0]:
                found.append(Forwarded(index, request))
        return found

    def client_bytes(self) -> bytes:
        return self.transport.value()  # type: ignore[no-any-return]


def drive(
    pieces: list[bytes],
    respond_early: bool = False,
    lose_late: bool = False,
    proxy_settings: ProxySettings = SETTINGS,
) -> Driver:
    driver = Driver(proxy_settings, respond_early=respond_early, lose_late=lose_late)
    for piece in pieces:
        driver.feed(piece)
    driver.finish()
    return driver


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """C{data} cut at the given offsets (taken modulo its length, sorted)."""
    if not data:
        return [data]
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


# -- llhttp's own view of the client's bytes --------------------------------------------------


@dataclasses.dataclass
class Message:
    method: bytes
    target: bytes
    version: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool
    #: fields llhttp reported after the head: the trailer section
    trailers: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)


#: a request line whose method is any RFC 9110 token (tchar+)
EXTENSION_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) [^ \r\n]+ HTTP/[0-9]\.[0-9]\r\n")


def reference_messages(data: bytes) -> tuple[list[Message], str | None]:
    """
    llhttp's parse of C{data} (a fresh parser, same options as the proxy's):
    the messages it began, and the error or upgrade that stopped it.

    llhttp refuses methods it does not know; the proxy, like nginx, forwards
    any RFC 9110 token.  So the bytes are fed one at a time, which tells
    exactly where each message began, and a request refused for its method
    is parsed again from its start by a fresh parser, with GET in its place
    (no request framing depends on the method but CONNECT's and HEAD's),
    and recorded with its own method: a model that shares nothing with how
    the proxy finds such requests in what it reads.
    """

    class Collect:
        def __init__(self) -> None:
            self.messages: list[Message] = []
            self.url = b""
            self.headers: list[tuple[bytes, bytes]] = []
            self.in_body = False
            #: messages complete so far
            self.completed = 0
            #: the method of the request being parsed under GET
            self.method: bytes | None = None

        def on_message_begin(self) -> None:
            self.url, self.headers, self.in_body = b"", [], False

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            # after the head, llhttp reports trailer fields here too: not part of the head
            if self.messages and not self.messages[-1].complete and self.in_body:
                self.messages[-1].trailers.append((name, value))
            else:
                self.headers.append((name, value))

        def on_headers_complete(self) -> None:
            method, self.method = self.method or parser.get_method(), None
            self.messages.append(Message(
                method, self.url, parser.get_http_version(), list(self.headers), b"", False,
            ))
            self.in_body = True

        def on_body(self, body: bytes) -> None:
            self.messages[-1].body += body

        def on_message_complete(self) -> None:
            self.messages[-1].complete = True
            self.completed += 1

    collector = Collect()
    parser = httptools.HttpRequestParser(collector)
    stop: str | None = None
    start = 0  # where the current message began (llhttp skips blank lines before it)
    restarted_at = -1
    at = 0
    while at < len(data):
        completed = collector.completed
        try:
            parser.feed_data(data[at : at + 1])
        except httptools.HttpParserUpgrade:
            return collector.messages, "upgrade"
        except httptools.HttpParserInvalidMethodError as e:
            begin = start + len(data[start:]) - len(data[start:].lstrip(b"\r\n"))
            line = EXTENSION_LINE.match(data, begin)
            if line is None or begin == restarted_at:
                return collector.messages, f"error: {e}"
            collector.method = line.group(1)
            data = data[:begin] + b"GET" + data[line.end(1) :]
            parser = httptools.HttpRequestParser(collector)
            at = restarted_at = begin
            continue
        except httptools.HttpParserError as e:
            return collector.messages, f"error: {e}"
        at += 1
        if collector.completed > completed:
            start = at
    return collector.messages, stop


# -- the invariants ------------------------------------------------------------------------


def framing_names(request: RawRequest) -> list[bytes]:
    return [
        n for n, _ in request.headers
        if canonical_name(n) in (b"content-length", b"transfer-encoding")
    ]


def identity_problems(request: RawRequest) -> list[str]:
    """The proxy's own headers exactly once each, and no client-sent reserved header."""
    problems = []
    names = [canonical_name(n) for n, _ in request.headers]
    if request.values("X-Client-Cert-CN") != [CN]:
        problems.append(f"X-Client-Cert-CN is {request.values('X-Client-Cert-CN')!r}")
    if request.values("X-Forwarded-For") != [PEER]:
        problems.append(f"X-Forwarded-For is {request.values('X-Forwarded-For')!r}")
    if request.values("X-Forwarded-Proto") != [b"https"]:
        problems.append(f"X-Forwarded-Proto is {request.values('X-Forwarded-Proto')!r}")
    if names.count(b"x-forwarded-host") > 1:
        problems.append("more than one X-Forwarded-Host")
    for name in names:
        reserved = name.startswith(RESERVED_PREFIXES) or name in RESERVED_EXACT
        if reserved and name not in PROXY_SET:
            problems.append(f"reserved header {name!r} reached the backend")
    return problems


def check_invariants(
    data: bytes, driver: Driver, *, strict_framing: bool = True, strict_host: bool = True
) -> list[str]:
    """
    What must hold whatever the client sent.  Returns the violations (empty when all hold).

    @param strict_framing: also require exactly one framing field per request
        (the proxy's own), not merely a consistent one.
    @param strict_host: also require exactly one Host per forwarded request.
    """
    problems: list[str] = []
    expected, _ = reference_messages(data)
    forwarded = driver.forwarded()
    for index, raw in enumerate(driver.backend_bytes()):
        requests, rest, problem = split_requests(raw)
        if problem is not None:
            problems.append(f"backend connection {index} cannot be delimited: {problem}: {raw!r}")
    if len(forwarded) > len(expected):
        problems.append(
            f"{len(forwarded)} requests forwarded, llhttp parsed {len(expected)} heads"
        )
    idle = set(map(id, driver.pool._idle))
    for position, (item, message) in enumerate(zip(forwarded, expected, strict=False)):
        request = item.request
        where = f"request {position} ({request.method!r} {request.target!r})"
        if (request.method, request.target) != (message.method, message.target):
            problems.append(
                f"{where}: forwarded as {request.method!r} {request.target!r}, "
                f"parsed as {message.method!r} {message.target!r}"
            )
        if request.framing_fields and {n.lower() for n, _ in request.framing_fields} == {
            b"content-length", b"transfer-encoding"
        }:
            problems.append(f"{where}: both Content-Length and Transfer-Encoding")
        if strict_framing and len(framing_names(request)) > 1:
            problems.append(f"{where}: framing fields {framing_names(request)!r}")
        if strict_host and len(request.values("Host")) != 1:
            problems.append(f"{where}: {len(request.values('Host'))} Host fields")
        problems.extend(f"{where}: {p}" for p in identity_problems(request))
        # llhttp keeps trailing blanks of a value (the proxy forwards them); the
        # strict splitter strips them, as RFC 9110 5.5 says a recipient does
        head_fields = {(n, v.strip(b" \t")) for n, v in message.headers}
        # an HTTP/1.0 request may omit Host; the backend gets the proxy's own
        host_added = message.version == "1.0" and not any(
            n.lower() == b"host" for n, _ in message.headers
        )
        for name, value in request.headers:
            if canonical_name(name) in PROXY_SET or name.lower() in (
                b"content-length", b"transfer-encoding"
            ):
                continue
            if host_added and name.lower() == b"host":
                continue
            if (name, value) not in head_fields:
                trailer = (name, value) in {(n, v.strip(b" \t")) for n, v in message.trailers}
                problems.append(
                    f"{where}: field {name!r}: {value[:60]!r} is not in the request head "
                    + ("(a trailer merged into the head)" if trailer else "the client sent")
                )
        proto = driver.endpoint.connections[item.connection]
        open_ = not proto.transport.disconnecting
        if request.complete:
            if not message.complete or request.body != message.body:
                problems.append(
                    f"{where}: the backend reads body {request.body[:200]!r} "
                    f"(complete), llhttp parsed {message.body[:200]!r} "
                    f"(complete={message.complete})"
                )
        else:
            if not message.body.startswith(request.body):
                problems.append(f"{where}: partial body {request.body[:200]!r} is not a prefix")
            if message.complete and open_:
                problems.append(
                    f"{where}: llhttp ended the message but the backend still expects "
                    f"more body on an open connection (declared "
                    f"{request.declared_length}, got {len(request.body)})"
                )
            if id(proto) in idle:
                problems.append(f"{where}: a connection mid-request went back to the pool")
    for proto in driver.pool._idle:
        requests, rest, _ = split_requests(proto.transport.value())
        if rest or not all(r.complete for r in requests):
            problems.append(f"pooled backend connection not at a message boundary: {rest!r}")
    if driver.heads_at_close is not None and len(forwarded) > driver.heads_at_close:
        problems.append(
            f"{len(forwarded) - driver.heads_at_close} request(s) forwarded after the proxy "
            "decided to close the client connection"
        )
    out = driver.client_bytes()
    if out and not out.startswith(b"HTTP/1.1 "):
        problems.append(f"client received {out[:100]!r}")
    return problems


# -- strategies -----------------------------------------------------------------------------

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
PCHAR = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@%/"
METHODS = [b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"PURGE", b"PROPFIND"]
SPECIAL = (
    RESERVED_EXACT | PROXY_SET | HOP_BY_HOP
    | {b"content-length", b"host", b"expect", b"x-forwarded-client-cert"}
)

tokens = st.text(TCHAR, min_size=1, max_size=12).map(str.encode)
plain_names = tokens.filter(
    lambda n: canonical_name(n) not in SPECIAL
    and not canonical_name(n).startswith(RESERVED_PREFIXES + (b"proxy-",))
)
field_values = st.binary(max_size=40).map(
    lambda v: bytes(b for b in v if b == 0x09 or 0x20 <= b <= 0x7E or b >= 0x80).strip(b" \t")
)
targets = st.text(PCHAR, max_size=30).map(lambda t: ("/" + t).encode())


@st.composite
def chunk_lines(draw: Any, body: bytes) -> bytes:
    """C{body} as chunks of random sizes, hex in either case with leading zeros, extensions."""
    out = bytearray()
    pos = 0
    while pos < len(body):
        size = draw(st.integers(1, max(1, len(body) - pos)))
        hexed = b"%x" % size if draw(st.booleans()) else b"%X" % size
        out += b"0" * draw(st.integers(0, 3)) + hexed
        if draw(st.booleans()):
            name = draw(tokens)
            value = draw(st.one_of(st.none(), tokens, st.text(
                string.ascii_letters + " ;=", max_size=8).map(lambda v: b'"' + v.encode() + b'"')))
            out += b";" + name + (b"=" + value if value is not None else b"")
        out += b"\r\n" + body[pos : pos + size] + b"\r\n"
        pos += size
    out += b"0" * draw(st.integers(1, 3)) + b"\r\n"
    for name, value in draw(st.lists(st.tuples(plain_names, field_values), max_size=2)):
        out += name + b": " + value + b"\r\n"
    return bytes(out + b"\r\n")


@dataclasses.dataclass
class ValidRequest:
    data: bytes
    method: bytes
    target: bytes
    fields: list[tuple[bytes, bytes]]
    body: bytes
    version: bytes


@st.composite
def valid_requests(draw: Any, keep_alive: bool = True) -> ValidRequest:
    """A request RFC 9112 and llhttp both accept, with a Content-Length or chunked body."""
    method = draw(st.sampled_from(METHODS))
    target = draw(targets)
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    fields = draw(st.lists(st.tuples(plain_names, field_values), max_size=5))
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["content-length", "chunked"]))
    if version == b"HTTP/1.0":
        framing = "content-length"
    lines = [method + b" " + target + b" " + version]
    host = draw(st.sampled_from([b"app.example", b"app.example:8443", b"[::1]:8443"]))
    head_fields = [(b"Host", host)] + fields
    if version == b"HTTP/1.0" and keep_alive:
        head_fields.append((b"Connection", b"keep-alive"))
    if framing == "content-length":
        head_fields.insert(draw(st.integers(0, len(head_fields))),
                           (b"Content-Length", b"%d" % len(body)))
        payload = body
    else:
        head_fields.insert(draw(st.integers(0, len(head_fields))),
                           (b"Transfer-Encoding", b"chunked"))
        payload = draw(chunk_lines(body))
    lines += [n + b": " + v for n, v in head_fields]
    data = b"\r\n".join(lines) + b"\r\n\r\n" + payload
    return ValidRequest(data, method, target, [(b"Host", host)] + fields, body, version)


#: fragments that matter to framing, for byte strings that are nearly requests
FRAGMENTS = [
    b"GET / HTTP/1.1\r\n", b"POST / HTTP/1.1\r\n", b"POST / HTTP/1.0\r\n",
    b"CONNECT a:1 HTTP/1.1\r\n",
    b"Host: a\r\n", b"Content-Length: 5\r\n", b"Content-Length: 0\r\n", b"Content-Length: 40\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: chunked\t\r\n",
    b"Transfer-Encoding: gzip\r\n", b"Transfer_Encoding: chunked\r\n", b"Content_Length: 3\r\n",
    b"Connection: close\r\n", b"Connection: keep-alive\r\n", b"Connection: Upgrade\r\n",
    b"Upgrade: websocket\r\n", b"Expect: 100-continue\r\n", b"X-Client-Cert-CN: admin\r\n",
    b"x_forwarded_for: 10.0.0.1\r\n", b"Connection: Host\r\n",
    b"\r\n", b"\n", b"\r", b" ", b"\t", b"\x00", b"5\r\nhello\r\n", b"0\r\n\r\n", b"0x5\r\n",
    b"hello", b";ext=1", b"-1\r\n", b"FFFFFFFFFFFFFFFFF\r\n",
]

nearly_requests = st.lists(st.sampled_from(FRAGMENTS), max_size=14).map(b"".join)


@st.composite
def mutated(draw: Any) -> bytes:
    """A valid request with a few bytes inserted, removed or replaced."""
    data = bytearray(draw(valid_requests()).data)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.sampled_from(FRAGMENTS + [bytes([b]) for b in b"\r\n\t\x0b :,;_-+0xX"]))
        if op == "insert":
            data[at:at] = piece
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        else:
            data[at : at + len(piece)] = piece
    return bytes(data)


any_bytes = st.one_of(
    st.binary(max_size=400),
    nearly_requests,
    mutated(),
    st.lists(valid_requests(), min_size=2, max_size=3).map(lambda rs: b"".join(r.data for r in rs)),
)

cuts = st.lists(st.integers(0, 10_000), max_size=6)
HYPOTHESIS = settings(
    deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow]
)


# -- properties ----------------------------------------------------------------------------------


@HYPOTHESIS
@given(st.lists(valid_requests(), min_size=1, max_size=3), cuts)
def test_valid_requests_reach_the_backend_with_the_same_bodies(
    requests: list[ValidRequest], split: list[int]
) -> None:
    """
    Any valid requests (Content-Length or chunked, with extensions, trailers,
    leading zeros, pipelined), fed in any pieces: the backend receives each
    one, complete and in order, with the same method, target, end-to-end
    fields and body bytes, and the client gets one response per request.
    """
    data = b"".join(r.data for r in requests)
    driver = drive(split_at(data, split))
    forwarded = [f.request for f in driver.forwarded()]
    assert len(forwarded) == len(requests), driver.backend_bytes()
    for got, want in zip(forwarded, requests, strict=True):
        assert got.complete
        assert (got.method, got.target, got.body) == (want.method, want.target, want.body)
        client_fields = [
            (n, v) for n, v in got.headers
            if canonical_name(n) not in PROXY_SET | {b"content-length", b"transfer-encoding"}
        ]
        assert client_fields == want.fields
        assert identity_problems(got) == []
    assert driver.client_bytes().count(b"HTTP/1.1 200 OK\r\n") == len(requests)


@HYPOTHESIS
@given(valid_requests(), cuts)
def test_valid_request_is_framed_by_exactly_one_field_of_the_proxys_making(
    request: ValidRequest, split: list[int]
) -> None:
    """
    RFC 9112 6.3 as the backend reads it: the forwarded request carries
    exactly one framing field, Content-Length with the body's length or
    Transfer-Encoding: chunked with canonical chunks (upper-case hex, no
    leading zeros, no extensions, no trailers), never both and never the
    client's own Content-Length beside the proxy's.
    """
    driver = drive(split_at(request.data, split))
    (got,) = [f.request for f in driver.forwarded()]
    assert framing_names(got) in ([b"Content-Length"], [b"Transfer-Encoding"]), got.head
    if got.framing == "content-length":
        assert got.framing_fields == [(b"Content-Length", b"%d" % len(request.body))]
    else:
        assert got.framing_fields == [(b"Transfer-Encoding", b"chunked")]
        assert all(c == b"%X" % int(c, 16) for c in got.chunks), got.chunks
        assert got.chunks[-1] == b"0" and got.trailers == b""


@HYPOTHESIS
@given(any_bytes, cuts, st.booleans(), st.booleans())
@example(  # an Upgrade request with a Content-Length: llhttp ends it at the head
    b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: x\r\n"
    b"Content-Length: 5\r\n\r\nhello", [], True, False,
)
@example(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n",
         [], False, False)
# junk before an extension-method line, which a first version skipped to forward the line
@example(b"\x00\n! / HTTP/1.0\r\n*:\r\n!:\r\n\r\n", [], False, False)
@example(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nx\nBREW / HTTP/1.1\r\nHost: a\r\n\r\n",
         [], False, False)
def test_no_byte_string_makes_the_proxy_forward_a_request_framed_otherwise(
    data: bytes, split: list[int], respond_early: bool, lose_late: bool
) -> None:
    """
    Whatever bytes a client sends, in whatever pieces, whether the backend
    answers early or late: no exception escapes; every backend connection's
    stream can be delimited (never both Content-Length and Transfer-Encoding,
    never differing lengths); each forwarded request is the one llhttp parsed
    (method, target, body); a request the proxy considered complete is
    complete at the backend or its connection is closed; a pooled backend
    connection is always at a message boundary; nothing is forwarded after the
    proxy decided to close the client connection; the identity headers are the
    proxy's own.  (Duplicate-but-equal Content-Length and missing Host are
    the subject of other tests.)
    """
    driver = drive(split_at(data, split), respond_early=respond_early, lose_late=lose_late)
    problems = check_invariants(data, driver, strict_framing=False, strict_host=False)
    assert problems == [], "\n".join(problems)


def _spellings(name: bytes, flips: list[bool], dashes: list[bool]) -> bytes:
    out = bytearray()
    for i, ch in enumerate(name):
        c = bytes([ch])
        if c == b"-" and dashes[i % len(dashes)]:
            c = b"_"
        if flips[i % len(flips)]:
            c = c.swapcase()
        out += c
    return bytes(out)


RESERVED_NAMES = [
    b"x-client-cert-cn", b"x-client-cert", b"x-client-cert-subject", b"x-client-cert-san",
    b"x-forwarded-client-cert", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
    b"x-forwarded-port", b"forwarded", b"client-cert", b"client-cert-chain",
]


@HYPOTHESIS
@given(
    st.lists(
        st.tuples(
            st.sampled_from(RESERVED_NAMES),
            st.text(string.ascii_letters + "-_", max_size=6).map(str.encode),
            st.lists(st.booleans(), min_size=1, max_size=8),
            st.lists(st.booleans(), min_size=1, max_size=8),
        ),
        min_size=1, max_size=6,
    ),
    st.booleans(),
)
def test_no_reserved_header_survives_in_any_spelling(
    spoofs: list[tuple[bytes, bytes, list[bool], list[bool]]], name_in_connection: bool
) -> None:
    """
    Header hygiene: a client-sent header whose name is a reserved one (or
    starts with X-Client-Cert / X-Forwarded-), in any mix of case and "-" /
    "_", never reaches the backend, also when named in Connection; the
    proxy's own X-Client-Cert-CN, X-Forwarded-For and X-Forwarded-Proto are
    there exactly once with the true values.
    """
    fields = []
    for name, suffix, flips, dashes in spoofs:
        spelled = _spellings(name, flips, dashes)
        if name.startswith((b"x-client-cert", b"x-forwarded-")) and suffix:
            spelled += suffix
        fields.append(spelled + b": admin")
    if name_in_connection:
        fields.append(b"Connection: " + b", ".join(f.split(b":")[0] for f in fields))
    data = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"\r\n".join(fields) + b"\r\n\r\n"
    driver = drive([data])
    (got,) = [f.request for f in driver.forwarded()]
    assert identity_problems(got) == [], got.head
    assert b"admin" not in got.head


printable = set(range(0x20, 0x7F))


@HYPOTHESIS
@given(
    st.text(max_size=40),
    st.text(max_size=40),
    st.lists(st.text(max_size=20), max_size=3),
)
def test_identity_values_are_printable_ascii_and_decode_back(
    cn: str, subject: str, sans: list[str]
) -> None:
    """
    Identity encoding: whatever text a certificate holds (controls, CR LF,
    NUL, non-ASCII, surrogates, leading or trailing blanks, "%"), every
    identity header value reaching the backend is non-empty printable ASCII
    without a blank at either end, the head still parses strictly, and
    percent-decoding gives back the exact UTF-8 of the CN, the subject and
    each SAN item.
    """
    identity = ClientIdentity(cn=cn or None, subject=subject or None,
                              sans=tuple("DNS:" + s for s in sans))
    driver = Driver()
    driver.client.identity = identity
    driver.client.identity_headers = identity_headers(identity, HeaderSettings())
    driver.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    driver.finish()
    raw = driver.backend_bytes()[0]
    requests, _, problem = split_requests(raw)
    assert problem is None and len(requests) == 1, raw
    got = requests[0]
    for name, value in got.headers:
        if canonical_name(name).startswith(b"x-client-cert"):
            assert value and set(value) <= printable, (name, value)
            assert value[:1] != b" " and value[-1:] != b" "
    surrogate = "surrogatepass"
    if cn:
        assert [unquote_to_bytes(v) for v in got.values("X-Client-Cert-CN")] == [
            cn.encode("utf-8", surrogate)
        ]
    else:
        assert got.values("X-Client-Cert-CN") == []
    if subject:
        assert [unquote_to_bytes(v) for v in got.values("X-Client-Cert-Subject")] == [
            subject.encode("utf-8", surrogate)
        ]
    if sans:
        (value,) = got.values("X-Client-Cert-SAN")
        items = [unquote_to_bytes(item.strip()) for item in value.split(b",")]
        assert items == [("DNS:" + s).encode("utf-8", surrogate) for s in sans]
