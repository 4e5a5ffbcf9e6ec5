"""
The backend half: HTTP/1.1 connections to the plain-HTTP application, kept alive in a pool.

A connection carries one exchange at a time.  It knows nothing about the
client: it writes the request head and body it is given, parses the response
with llhttp (httptools) and reports each event to the L{BackendExchange} it is
serving.  Reading from the backend is paused and resumed by the client side
when the client reads slowly; writing to the backend pauses the client when the
backend reads slowly.

A connection goes back to the pool only after the whole read that completed
a response has been parsed with nothing after the response, and bytes that
arrive while it is idle close it: what a backend sends beyond the response
it framed is not read as the next request's response (unless it arrives
only after that request went out, which HTTP/1.1 cannot tell apart).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from typing import Any
from typing import Protocol as TypingProtocol

import httptools
from twisted.internet import defer, error
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import Backend
from .headers import TUNNELLED_PROTOCOLS, upgrade_protocols
from .transport import no_delay, send_now

log = Logger()

Headers = list[tuple[bytes, bytes]]


class BackendExchange(TypingProtocol):
    """What a backend connection reports to, for the exchange it is serving."""

    def backend_informational(self, status: int, reason: bytes, headers: Headers) -> None: ...

    def backend_headers(
        self, status: int, reason: bytes, headers: Headers, version: bytes
    ) -> None: ...

    def backend_body(self, data: bytes) -> None: ...

    def backend_complete(self) -> None: ...

    def backend_failed(self, reason: str, response_started: bool) -> None: ...

    def backend_switched(self, reason: bytes, headers: Headers, rest: bytes) -> None:
        """The backend accepted an upgrade (101); C{rest}: what followed its head."""


class TunnelSink(TypingProtocol):
    """Where a connection that switched protocols sends what it reads, and its end."""

    def tunnel_data(self, data: bytes) -> None: ...

    def tunnel_closed(self) -> None: ...


#: A response head (status line and fields) or trailer section larger than
#: this, or with more field lines, is refused with 502: llhttp sets no limit of
#: its own, so a backend could otherwise make the proxy hold (and forward) any
#: amount.  The same figures as a request's (--max-header-bytes' default, and
#: HAProxy's tune.http.maxhdr).
MAX_RESPONSE_HEAD_BYTES = 65536
MAX_RESPONSE_HEADERS = 100


class ClientCork(TypingProtocol):
    """The part of L{CorkedTLSProtocol} a backend connection uses."""

    def hold(self) -> None: ...

    def uncork(self) -> None: ...


class BackendProtocolError(Exception):
    """The backend's answer could not be parsed as HTTP/1.1."""


class _Stop(Exception):
    """Raised in a parser callback: nothing more of this read belongs to the exchange."""


class BackendConnection(Protocol):
    """
    One HTTP/1.1 connection to the backend.

    @ivar reusable: whether the connection may serve another exchange once the
        current one is complete (the backend kept it alive and framed the
        response so that its end was known).
    @ivar received: whether any byte of a response to the current exchange
        has arrived (a request that got no byte back may be retried).
    """

    #: a TCP or UNIX transport: ITransport plus producers and abortConnection
    transport: Any

    def __init__(self, pool: BackendPool) -> None:
        self._pool = pool
        self._exchange: BackendExchange | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._head_request = False
        self._headers: Headers = []
        self._head_bytes = 0
        self._fields = 0
        self._reason = b""
        self._status = 0
        self._response_started = False
        self._close_delimited = False
        self._complete = False
        #: the keep-alive verdict of a response completed during the current read
        self._done: bool | None = None
        #: bytes came after the complete response: the backend is out of step
        self._stray = False
        self.reusable = False
        self.received = False
        self.connected = False
        self.used = 0
        #: the current exchange asked for a protocol upgrade (a 101 may answer it)
        self._upgrade = False
        #: the head of a 101 answering it, until llhttp stops at its end
        self._switch: tuple[bytes, Headers] | None = None
        #: after a 101: where the raw bytes read go (see L{tunnel})
        self._sink: TunnelSink | None = None
        #: when it last went back to the pool (BackendPool.release)
        self.idle_since = 0.0
        #: the client's corked TLS transport: held while a read from the
        #: backend is handled, uncorked after it (see http/transport.py)
        self.client_cork: ClientCork | None = None

    # -- Protocol ----------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._exchange is None:
            # Bytes nobody asked for: the backend is out of step; never reuse.
            if self.reusable:
                log.warn("backend sent data on an idle connection; closing it")
            self.reusable = False
            self.transport.loseConnection()
            return
        self.received = True
        cork = self.client_cork
        if cork is not None:
            cork.hold()
        try:
            self._parse(parser, data)
        finally:
            if cork is not None:
                cork.uncork()  # what this read produced for the client: one TLS write

    def _parse(self, parser: httptools.HttpResponseParser, data: bytes) -> None:
        failure: str | None = None
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, BackendProtocolError):
                failure = f"invalid HTTP response from backend: {cause}"
            elif not isinstance(cause, _Stop):
                log.failure("handling the backend response failed", Failure(cause))
                failure = "internal error while handling the backend response"
        except httptools.HttpParserError as e:
            failure = f"invalid HTTP response from backend: {e}"
        except httptools.HttpParserUpgrade as e:
            switch, self._switch = self._switch, None
            exchange = self._exchange
            if switch is not None and exchange is not None:
                # llhttp stops at the end of a 101's head: what follows in
                # this read is the new protocol's, for the client.
                self._exchange = None
                self._response_started = True
                exchange.backend_switched(switch[0], switch[1], data[e.args[0] :])
                return
            failure = "invalid HTTP response from backend: protocol switch"  # pragma: no cover
        done, self._done = self._done, None
        if done is not None:
            # The response is complete, and only now, with llhttp done with
            # this read, may the connection go back to the pool: handing it
            # to the next exchange from inside a parser callback would let
            # the rest of this read be parsed as that exchange's response.
            if self._stray or failure is not None:
                log.warn("backend sent data after a complete response; closing the connection")
                done = False
            self._finish(done)
        elif failure is not None:
            self._fail(failure)

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self.connected = False
        self.reusable = False
        self._pool._lost(self)
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.tunnel_closed()
            return
        exchange = self._exchange
        if exchange is None:
            return
        if self._close_delimited and self._response_started and not self._complete:
            # A body delimited by the end of the connection has now ended.
            self._complete = True
            self._exchange = None
            exchange.backend_complete()
            return
        self._exchange = None
        exchange.backend_failed(
            "backend closed the connection" + _describe(reason), self._response_started
        )

    # -- driven by the client side ----------------------------------------

    def start(
        self,
        exchange: BackendExchange,
        head: bytes,
        method: bytes,
        client_cork: ClientCork | None = None,
        upgrade: bool = False,
    ) -> None:
        """
        Begin an exchange: send the request head; the body follows through
        L{write}.  C{upgrade}: the request asks for a protocol switch, so a
        101 answer is accepted (and the connection then leaves HTTP for good).
        """
        self._exchange = exchange
        self._upgrade = upgrade
        self._parser = httptools.HttpResponseParser(self)
        self._head_request = method == b"HEAD"
        self._response_started = False
        self._close_delimited = False
        self._complete = False
        self._done = None
        self._stray = False
        self.reusable = False
        self.received = False
        self.used += 1
        self.client_cork = client_cork
        send_now(self.transport, head)

    def write(self, data: bytes) -> None:
        send_now(self.transport, data)

    def write_sequence(self, data: list[bytes]) -> None:
        send_now(self.transport, b"".join(data))

    def abandon(self) -> None:
        """The client side gave up on this exchange: the connection is in an unknown state."""
        self._exchange = None
        self._sink = None
        self.reusable = False
        self.transport.abortConnection()

    def tunnel(self, sink: TunnelSink, rest: bytes) -> None:
        """
        After a 101: every byte read from now on (C{rest} first, what came
        with the 101's head) goes to C{sink} as is, and the end of the
        connection too.  The connection is never reused.
        """
        self._sink = sink
        self._parser = None
        self.reusable = False
        self.dataReceived = sink.tunnel_data  # type: ignore[method-assign]
        if rest:
            sink.tunnel_data(rest)

    def end_tunnel(self) -> None:
        """The client side of a tunnel ended: close after what was written to the backend."""
        self._sink = None
        self.transport.loseConnection()

    def pause_reading(self) -> None:
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self.transport.resumeProducing()

    # -- httptools callbacks ----------------------------------------------

    def _live(self) -> BackendExchange:
        """The exchange the bytes being parsed belong to; stop parsing if none does."""
        exchange = self._exchange
        if exchange is None:
            raise _Stop()
        if self._complete:
            # A byte past the end of the complete response.
            self._stray = True
            raise _Stop()
        return exchange

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
            raise BackendProtocolError("response headers too large")

    def on_message_begin(self) -> None:
        self._live()
        self._headers = []
        self._head_bytes = self._fields = 0
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._count(len(status))
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        self._fields += 1
        if self._fields > MAX_RESPONSE_HEADERS:
            raise BackendProtocolError("too many response header fields")
        if not self._response_started:
            self._headers.append((name, value))  # trailer fields are not forwarded

    def on_headers_complete(self) -> None:
        parser = self._parser
        exchange = self._live()
        assert parser is not None
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise BackendProtocolError(f"unsupported HTTP version {version}")
        status = parser.get_status_code()
        if status > 599:
            raise BackendProtocolError(f"invalid status code {status}")
        if 100 <= status < 200:
            if status == 101:
                if not self._upgrade:
                    raise BackendProtocolError("101 Switching Protocols, which was not asked for")
                if not parser.should_upgrade():
                    raise BackendProtocolError("101 without Upgrade and Connection: upgrade")
                try:
                    switched = upgrade_protocols(self._headers)
                except ValueError as e:
                    raise BackendProtocolError(f"101 with {e}") from None
                if switched is None or switched.lower() not in TUNNELLED_PROTOCOLS:
                    # RFC 9110 7.8: the protocol switched to is one the client
                    # asked for, and the client may only ask for websocket.
                    raise BackendProtocolError(
                        f"101 switching to {(switched or b'').decode('latin-1')!r}, "
                        "not websocket"
                    )
                self._switch = (self._reason, self._headers)
                self._headers = []
                return
            exchange.backend_informational(status, self._reason, self._headers)
            return
        headers = self._headers
        self._headers = []
        self._head_bytes = self._fields = 0  # a trailer section has limits of its own
        self._status = status
        has_length = False
        codings = []
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                has_length = True
            elif lower == b"transfer-encoding":
                codings.append(value)
        no_body = self._head_request or status in (204, 304)
        chunked = False
        if codings and not no_body:
            # llhttp would read another coding's body to the close and hand
            # over still-encoded bytes, and the proxy drops the field
            # (hop-by-hop): only a single "chunked" frames a body the proxy
            # can re-frame, as on the request side.
            if version == "1.0":
                raise BackendProtocolError("Transfer-Encoding in an HTTP/1.0 response")
            if len(codings) > 1 or codings[0].rstrip(b" ").lower() != b"chunked":
                raise BackendProtocolError("Transfer-Encoding other than chunked")
            chunked = True
        self._response_started = True
        self._close_delimited = not (no_body or has_length or chunked)
        exchange.backend_headers(status, self._reason, headers, version.encode("ascii"))
        if self._head_request and self._exchange is exchange:
            # llhttp cannot be told that a HEAD response has no body: it ends here.
            self._complete = True
            self._done = parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._live().backend_body(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        if parser is None or self._exchange is None:
            raise _Stop()
        if self._complete:
            return  # llhttp's end of a HEAD response, which ended with its head
        if not self._response_started:
            return  # the end of a 1xx response
        self._complete = True
        self._done = parser.should_keep_alive() and not self._close_delimited

    # -- internals ---------------------------------------------------------

    def _finish(self, keep_alive: bool) -> None:
        exchange = self._exchange
        self._complete = True
        self.reusable = keep_alive
        self._exchange = None
        if exchange is not None:
            exchange.backend_complete()
        elif self.connected:
            self.transport.loseConnection()

    def _fail(self, reason: str) -> None:
        exchange = self._exchange
        self._exchange = None
        self.reusable = False
        self.transport.abortConnection()
        if exchange is not None:
            exchange.backend_failed(reason, self._response_started)


def _describe(reason: Failure) -> str:
    if reason.check(error.ConnectionDone):
        return ""
    return f" ({reason.getErrorMessage()})"


def backend_endpoint(reactor: Any, backend: Backend, timeout: float) -> IStreamClientEndpoint:
    """The client endpoint for C{--backend}: TCP (name resolved, IPv6 too) or a unix socket."""
    if backend.path is not None:
        return UNIXClientEndpoint(reactor, backend.path, timeout=timeout)
    assert backend.host is not None and backend.port is not None
    try:
        address = ipaddress.ip_address(backend.host.strip("[]"))
    except ValueError:
        return HostnameEndpoint(
            reactor, backend.host.encode("idna"), backend.port, timeout=timeout
        )
    # An address needs no resolving: HostnameEndpoint would still hand it to
    # getaddrinfo in a thread, and report a refused connection only at its
    # next attempt, 0.3 s later (a 502 then took that long).
    if address.version == 6:
        return TCP6ClientEndpoint(reactor, str(address), backend.port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, str(address), backend.port, timeout=timeout)


#: seconds an idle pooled backend connection is kept (nginx's upstream keepalive_timeout)
POOL_IDLE_TIMEOUT = 60.0


class BackendPool:
    """
    Keep-alive connections to one backend, handed out one exchange at a time.

    Idle connections are kept up to C{max_idle}, and for at most
    C{idle_timeout} seconds: a burst of traffic must not leave hundreds of
    sockets open on a backend that keeps them as long as it is asked to
    (each can hold a thread or a worker there).  One that the backend closes
    while idle simply leaves the pool.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        backend: Backend,
        connect_timeout: float,
        max_idle: int = 256,
        endpoint: IStreamClientEndpoint | None = None,
        idle_timeout: float = POOL_IDLE_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self.backend = backend
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._sweep: IDelayedCall | None = None
        #: most recently released at the right: acquire takes from there, the
        #: sweep closes from the left, so neither searches
        self._idle: deque[BackendConnection] = deque()
        self._endpoint = endpoint or backend_endpoint(reactor, backend, connect_timeout)
        self._factory = Factory.forProtocol(lambda: BackendConnection(self))
        self._factory.noisy = False  # one log line per backend connection is noise
        self.open_connections = 0

    def acquire(self) -> tuple[BackendConnection | None, defer.Deferred[BackendConnection] | None]:
        """
        An idle connection right away, or a Deferred for a new one.

        Returning the idle connection directly (rather than through an already
        fired Deferred) keeps the common keep-alive path free of Deferred overhead.
        """
        while self._idle:
            conn = self._idle.pop()
            # One found out of step while idle is closing but not yet closed.
            if conn.connected and conn.reusable:
                return conn, None
        return None, self.connect()

    def connect(self) -> defer.Deferred[BackendConnection]:
        """A new connection, failing after the connect timeout."""
        d: defer.Deferred[BackendConnection] = self._endpoint.connect(self._factory)  # type: ignore[assignment]
        d.addTimeout(self._connect_timeout, self._reactor)  # type: ignore[arg-type]

        def opened(conn: BackendConnection) -> BackendConnection:
            self.open_connections += 1
            return conn

        d.addCallback(opened)
        return d

    def release(self, conn: BackendConnection) -> None:
        """Give back a connection whose exchange is complete."""
        if conn.reusable and conn.connected and len(self._idle) < self._max_idle:
            conn.idle_since = self._reactor.seconds()
            self._idle.append(conn)
            if self._sweep is None:
                self._sweep = self._reactor.callLater(self._idle_timeout, self._close_expired)
        elif conn.connected:
            conn.transport.loseConnection()

    def _close_expired(self) -> None:
        """
        Close the connections idle for C{idle_timeout}, oldest first, and wake
        up again when the next one is due: one timer per pool, not per request.
        """
        self._sweep = None
        idle = self._idle
        due = self._reactor.seconds() - self._idle_timeout
        while idle and idle[0].idle_since <= due:
            conn = idle.popleft()
            if conn.connected:
                conn.transport.loseConnection()
        if idle:
            wait = max(0.0, idle[0].idle_since - due)
            self._sweep = self._reactor.callLater(wait, self._close_expired)

    def _lost(self, conn: BackendConnection) -> None:
        self.open_connections -= 1
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def close_idle(self) -> None:
        """Close every idle connection (at shutdown)."""
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        while self._idle:
            self._idle.pop().transport.loseConnection()


def connect_error_reason(failure: Failure) -> str:
    """Plain words for why a backend connection could not be made."""
    if failure.check(defer.TimeoutError, error.TimeoutError):
        return "backend connect timeout"
    if failure.check(error.ConnectionRefusedError):
        return "backend refused the connection"
    if failure.check(error.DNSLookupError):
        return "backend host name does not resolve"
    return f"backend unreachable: {failure.getErrorMessage()}"
