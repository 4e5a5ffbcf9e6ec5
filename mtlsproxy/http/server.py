"""
The client half: an HTTP/1.1 server protocol, inside the TLS layer, that forwards each request.

Why not twisted.web: its C{Request} reads the whole body before any resource
sees it, it never keeps HTTP/1.0 connections alive, and its proxy resource
opens a backend connection per request.  Here llhttp (httptools) parses, the
request head is forwarded as soon as it is complete, body chunks are written
to the backend as they arrive, and each side pauses the other when it cannot
keep up (see docs/design.md).

One client connection serves its requests in order.  Pipelined requests are
queued with their bodies while the one before them is answered, and reading
from the client stops as soon as one is waiting, so what is held is bounded by
what one read delivers.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httptools
from OpenSSL import SSL
from twisted.internet import error
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import tls
from ..identity import (
    CN_ONLY,
    ClientIdentity,
    HeaderSettings,
    IdentityCache,
    UnreadableCertificate,
    encode_header_value,
    identity_from_connection,
    identity_headers,
)
from ..logformat import ACCESS_FORMAT, ACCESS_NAMESPACE
from ..metrics import Metrics
from ..policy import Policy, asterisk_form_allowed, parse_target
from .backend import (
    BackendConnection,
    BackendPool,
    ClientCork,
    Headers,
    connect_error_reason,
)
from .headers import (
    connection_tokens,
    normalise,
    request_headers_for_backend,
    response_headers_for_client,
    upgrade_protocols,
)

log = Logger("mtlsproxy")
access_log = Logger(ACCESS_NAMESPACE)

#: more header lines than this get 431, as HAProxy's tune.http.maxhdr (101) does:
#: each costs memory and work on both hops, and no real client needs them
MAX_HEADERS = 100

_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    504: b"Gateway Timeout",
}


@dataclass(frozen=True)
class ProxySettings:
    """What the forwarding needs from the configuration, resolved once."""

    handshake_timeout: float
    idle_timeout: float
    backend_timeout: float
    max_header_bytes: int
    client_auth_required: bool
    policy: Policy = field(default_factory=Policy)
    header_settings: HeaderSettings = CN_ONLY
    #: identities of verified clients by certificate, so that a resumed
    #: session (whose verified chain OpenSSL does not keep) gets the same headers
    identity_cache: IdentityCache = field(default_factory=IdentityCache, compare=False)
    #: 0 for no limit
    max_connections: int = 0


class _HeadersTooLarge(Exception):
    pass


class _BadRequest(Exception):
    pass


class _Closing(Exception):
    """Raised to stop parsing once the connection is to close."""


#: RFC 9110 4.2 / 3986 3.2.2: a Host value is a reg-name, IPv4 or [IP-literal],
#: with an optional numeric port; anything else gets 400 rather than reaching
#: the backend and X-Forwarded-Host.
_HOST = re.compile(
    rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*|\[[0-9A-Fa-f:.vV]+\](?::[0-9]{1,5})?"
    rb"|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+:[0-9]{1,5}"
)
_ABSOLUTE_FORM = re.compile(rb"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")


class Request:
    """One request from the client, from its head to the last body byte."""

    __slots__ = (
        "method",
        "target",
        "version",
        "headers",
        "keep_alive",
        "content_length",
        "chunked",
        "expect_continue",
        "body_done",
        "pending",
        "started",
        "backend_version",
        "host_generated",
        "connection",
        "host",
        "upgrade",
    )

    def __init__(self, method: bytes, target: bytes, version: bytes, headers: Headers) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = False
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.body_done = False
        self.pending: list[bytes] = []
        self.started = 0.0
        #: the proxy added Host (an HTTP/1.0 request without one)
        self.host_generated = False
        #: the options of the Connection header(s), lower case
        self.connection: frozenset[bytes] = frozenset()
        #: the Host value forwarded (the client's, the target's authority, or made up)
        self.host = b""
        #: the checked protocols of an upgrade request (forwarded as Upgrade), else None
        self.upgrade: bytes | None = None

    @property
    def body_pending(self) -> bool:
        """Whether body bytes may still be on their way from the client."""
        return not self.body_done and (self.chunked or bool(self.content_length))


def _other_protocol(chunks: list[bytes], method: bytes, url: bytes) -> str | None:
    """
    "RTSP" or "ICE" when the request line just parsed named that protocol, else None.

    llhttp accepts C{GET / RTSP/1.0} and C{SOURCE / ICE/1.0} and reports only
    the version, and httptools exposes no offsets, so the raw chunks the head
    arrived in are searched for the exact request line llhttp must have seen
    (strict llhttp allows single spaces only).  The common case costs two
    substring scans of one chunk; a match elsewhere in those chunks with the
    same method and target (a body spelling out the request line) is the only
    way to be refused wrongly.
    """
    if len(chunks) == 1:
        raw = chunks[0]
        if b"RTSP/" not in raw and b"ICE/" not in raw:
            return None
    else:
        raw = b"".join(chunks)  # the token may straddle two chunks
    line = method + b" " + url + b" "
    for name in ("RTSP", "ICE"):
        if line + name.encode() + b"/" in raw:
            return name
    return None


#: RFC 9110 5.6.2 tchar: what a method token may be made of
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
#: a request line with a method token, cut short by the end of the input
_LINE_PREFIX = re.compile(rb"(" + _TCHAR + rb"+)(?: [^ \r\n]*(?: [^\r\n]*)?)?\r?\Z")
#: a whole request line whose method llhttp does not know
_EXTENSION_LINE = re.compile(
    rb"(" + _TCHAR + rb"+) [^ \r\n]+ (HTTP|RTSP|ICE)/[0-9]\.[0-9]\r\n"
)
#: the method llhttp parses an extension-method request under: one with no
#: special framing in requests (only CONNECT and HEAD have any)
_PLACEHOLDER_METHOD = b"GET"


def _llhttp_knows(method: bytes) -> bool:
    """Whether llhttp parses C{method} itself (then it cannot be the one it refused)."""
    parser = httptools.HttpRequestParser(None)
    try:
        parser.feed_data(method + b" / HTTP/1.1\r\n")
    except httptools.HttpParserInvalidMethodError:
        return False
    except httptools.HttpParserError:
        pass
    return True


def _extension_request_start(raw: bytes) -> int | None:
    """
    Where, in C{raw} (the chunks a request head arrived in, joined, the
    first of which began with that request: see L{ClientConnection._begun_mid_chunk}),
    the request that llhttp refused for its method begins; C{None} when that
    is not the start of a request line with a method llhttp does not know.

    llhttp skips blank lines before a request, so it begins at the first byte
    that is neither CR nor LF; its line there is either whole, or (not ended
    yet) the start of one.  Nothing before it is skipped: junk ahead of a
    well-formed line is the client's mistake, and gets 400 as before.
    """
    start = len(raw) - len(raw.lstrip(b"\r\n"))
    line = _EXTENSION_LINE.match(raw, start)
    if line is not None:
        return None if _llhttp_knows(line.group(1)) else start
    if raw.find(b"\n", start) < 0:
        prefix = _LINE_PREFIX.match(raw, start)
        if prefix is not None and not _llhttp_knows(prefix.group(1)):
            return start
    return None


class _ExtensionMethodParser:
    """
    The parser while llhttp parses an extension-method request under
    C{_PLACEHOLDER_METHOD}: C{get_method} (asked once per request, when its
    head is complete) answers the real method and gives the connection its
    plain parser back, so that known methods never pass through here.
    """

    __slots__ = ("parser", "method", "client")

    def __init__(self, parser: Any, method: bytes, client: ClientConnection) -> None:
        self.parser = parser
        self.method = method
        self.client = client

    def feed_data(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def get_http_version(self) -> str:
        return self.parser.get_http_version()  # type: ignore[no-any-return]

    def should_upgrade(self) -> bool:
        return self.parser.should_upgrade()  # type: ignore[no-any-return]

    def get_method(self) -> bytes:
        client = self.client
        client.parser = self.parser
        client._extension_head = (self.method, client._url)
        return self.method


def _status_line(status: int, reason: bytes) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def _sanitise_reason(reason: bytes) -> bytes:
    return bytes(b for b in reason if 0x20 <= b < 0x7F or b == 0x09) or b"Unknown"


@implementer(IHandshakeListener)
class ClientConnection(Protocol):
    """
    One client, after (and during) its TLS handshake.

    The protocol sits inside L{twisted.protocols.tls.TLSMemoryBIOProtocol}, so
    C{self.transport} is the TLS transport and C{getHandle()} the OpenSSL
    connection that holds the verified peer certificate.
    """

    #: the TLS transport: ITransport plus getHandle, producers and abortConnection
    transport: Any

    def __init__(self, factory: ProxyFactory) -> None:
        self.factory = factory
        self.settings = factory.settings
        self.clock = factory.clock
        self.parser = httptools.HttpRequestParser(self)
        self.peer = "-"
        self.identity: ClientIdentity | None = None
        self.identity_headers: Headers = []
        #: the transport when it corks writes (set at connectionMade)
        self.cork: ClientCork | None = None
        #: the CN as the access log writes it (percent-encoded), once per connection
        self.log_cn = "-"
        self.handshake_done = False
        self.closed = False
        self.queue: deque[Request] = deque()
        self.current: Request | None = None
        self.parsing: Request | None = None
        self.exchange: Exchange | None = None
        self.broken: tuple[int, str] | None = None
        #: the proxy has sent (or is sending) a response that ends the connection
        self.closing = False
        self._timer: IDelayedCall | None = None
        self._idle_since = 0.0
        self._pauses: set[str] = set()
        self._url = b""
        self._headers: Headers = []
        self._header_bytes = 0
        self._header_name: bytes | None = None
        self._in_message = False
        #: the raw chunks the current request head arrived in (see _other_protocol)
        self._chunk = b""
        self._head_chunks: list[bytes] = []
        #: a request ended in the chunk being parsed (so the next one begins mid-chunk)
        self._completed_in_chunk = False
        #: the request being parsed began after another in the same chunk
        self._begun_mid_chunk = False
        #: offset in the joined _head_chunks where an extension-method request begins
        self._extension_at = 0
        #: (method, target) of the last extension-method request, for the refusal's access line
        self._extension_head: tuple[bytes, bytes] | None = None
        #: the upgrade request llhttp is about to stop at, and the bytes the
        #: client sent after its head, held until the backend answers it
        self._upgrading: Request | None = None
        self._held: list[bytes] = []

    # -- connection life --------------------------------------------------

    def connectionMade(self) -> None:
        # The TLS transport corks writes (http/transport.py); in-memory test
        # transports do not.
        self.cork = self.transport if hasattr(self.transport, "uncork") else None
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None)
        self.peer = f"{host}:{getattr(peer, 'port', '')}" if host is not None else str(peer)
        self.peer_host = host or ""
        self.factory.connection_opened(self)
        self._set_timer(self.settings.handshake_timeout, self._handshake_timed_out)

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self.factory.handshake_finished(self)
        conn: SSL.Connection = self.transport.getHandle()
        try:
            self.identity = identity_from_connection(conn, self.settings.identity_cache)
        except UnreadableCertificate as e:
            # OpenSSL verified it, but it cannot be read back: never forward
            # a client whose identity we cannot state.
            self._refuse(f"unreadable certificate ({e})")
            return
        if self.identity is None and self.settings.client_auth_required:
            self._refuse("certificate required")  # pragma: no cover - OpenSSL refuses first
            return
        if self.identity is not None:
            # A resumed session is not verified again: its certificate may
            # have expired since the full handshake.
            now = datetime.now(UTC)
            not_after, not_before = self.identity.not_after, self.identity.not_before
            if not_after is not None and now > not_after:
                self._refuse("certificate expired (resumed session)")
                return
            if not_before is not None and now < not_before:  # pragma: no cover - clock jumped back
                self._refuse("certificate not yet valid (resumed session)")
                return
        if self.identity is not None:
            self.identity_headers = identity_headers(self.identity, self.settings.header_settings)
            if self.identity.cn is not None:
                self.log_cn = encode_header_value(self.identity.cn).decode("ascii")
            for problem in self.identity.problems:
                log.warn("client {peer}: {problem}", peer=self.peer, problem=problem)
        if self.factory.metrics is not None:
            self.factory.metrics.handshake("ok")
        self._cancel_timer()
        self._arm_idle()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        self.factory.connection_closed(self)
        self._cancel_timer()
        self._cancel_stall()
        if not self.handshake_done:
            handle = None
            try:
                handle = self.transport.getHandle()
            except Exception:  # pragma: no cover - transport without a handle
                pass
            if (
                handle is not None
                and handle.client_random() is None
                and reason is not None
                and reason.check(error.ConnectionDone, error.ConnectionLost)
            ):
                # Closed before a ClientHello: a port probe or a load
                # balancer's TCP check, not a client that was refused.
                return
            self._log_refusal(tls.refusal_reason(handle, reason))
            return
        if self.exchange is not None:
            self.exchange.client_lost()

    def _log_refusal(self, reason: str) -> None:
        """One line per refused handshake, in the words operators grep for."""
        log.info("refused {peer}: {reason}", peer=self.peer, reason=reason)
        if self.factory.metrics is not None:
            self.factory.metrics.handshake("refused", reason)

    def _refuse(self, reason: str) -> None:
        self._log_refusal(reason)
        self.handshake_done = True  # the refusal is logged; do not log it again
        self.transport.abortConnection()

    # -- timers -----------------------------------------------------------

    def _set_timer(self, seconds: float, call: Callable[[], None]) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(seconds, call)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def give_way(self) -> None:
        """Drop this unfinished handshake to make room under --max-connections."""
        self.factory.handshake_finished(self)
        if not self.handshake_done:
            self._refuse("handshake not finished when --max-connections was reached")

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if not self.handshake_done:
            self._refuse("handshake timeout")

    def _arm_idle(self) -> None:
        """
        --idle-timeout (and the time to send the next request's head) counts
        from now.  An idle timer already pending is kept and moved on when it
        fires, instead of being cancelled and made again for every request.
        """
        self._idle_since = self.clock.seconds()
        if self._timer is None or not self._timer.active():
            self._timer = self.clock.callLater(self.settings.idle_timeout, self._idle_timed_out)

    def _lose(self) -> None:
        """
        Close after what has been written: TLS sends its close_notify and
        waits for the client's, so reading must go on (whatever paused it), or
        neither that reply nor the client's FIN is ever seen and the connection
        stays open for good.  A client that never closes is cut off after
        --idle-timeout.
        """
        if self._pauses and not self.closed:
            self._pauses.clear()
            self.transport.resumeProducing()
        self.transport.loseConnection()
        if not self.closed:
            self._cancel_timer()
            self._timer = self.clock.callLater(self.settings.idle_timeout, self._abort_closing)

    def _abort_closing(self) -> None:
        self._timer = None
        if not self.closed:
            self.transport.abortConnection()

    def _idle_timed_out(self) -> None:
        self._timer = None
        if self.current is not None or self.closing:
            return  # busy (exchange_done arms the timer again) or ending anyway
        remaining = self._idle_since + self.settings.idle_timeout - self.clock.seconds()
        if remaining > 0:
            self._timer = self.clock.callLater(remaining, self._idle_timed_out)
            return
        if self._in_message:
            log.info("closing {peer}: request headers not received in time", peer=self.peer)
            self._send_error(408, "request headers not received in time")
        else:
            self._lose()

    # -- reading from the client ------------------------------------------

    def pause(self, why: str) -> None:
        if not self._pauses and not self.transport.disconnecting:
            self.transport.pauseProducing()
            self._cancel_stall()  # not the client's fault while we do not read
        self._pauses.add(why)

    def resume(self, why: str) -> None:
        if why in self._pauses:
            self._pauses.discard(why)
            if not self._pauses and not self.closed and not self.transport.disconnecting:
                self.transport.resumeProducing()
                self._arm_stall()

    # A request body that stops arriving (a slow-POST client) ties up a
    # backend connection: while the proxy is reading and a body is still
    # due, each --idle-timeout without a byte ends the exchange.

    _stall: IDelayedCall | None = None

    def _arm_stall(self) -> None:
        request = self.current
        if request is None or not request.body_pending or self._pauses or self.closed:
            return
        if self._stall is not None and self._stall.active():
            self._stall.reset(self.settings.idle_timeout)
        else:
            self._stall = self.clock.callLater(self.settings.idle_timeout, self._body_stalled)

    def _cancel_stall(self) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None

    def _body_stalled(self) -> None:
        self._stall = None
        if self.exchange is not None and self.current is not None and self.current.body_pending:
            self.exchange.client_body_stalled()

    def dataReceived(self, data: bytes) -> None:
        if self.broken is not None or self.closed or (self.closing and self.current is None):
            return  # the connection is ending: nothing more is read as HTTP
        cork = self.cork
        if cork is not None:
            cork.hold()
        self._chunk = data
        self._completed_in_chunk = False
        if self._in_message:
            chunks = self._head_chunks
            chunks.append(data)
            if len(chunks) > 64:  # a head trickling in: keep memory, not list length, bounded
                chunks[:] = [b"".join(chunks)]
        try:
            self._feed(data)
        finally:
            self._chunk = b""  # an idle connection keeps no request bytes alive
            if cork is not None:
                cork.uncork()

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            failed: Exception = e
        else:
            return
        # Outside the except block: parsing may go on (an extension method),
        # and an exception raised while this one is handled would take it
        # as its __context__, hiding the cause httptools records there.
        self._parse_failed(failed)

    def _parse_failed(self, e: Exception) -> None:
        """What llhttp stopped at: an upgrade, a refusal of ours, or malformed input."""
        if isinstance(e, httptools.HttpParserUpgrade) and self._upgrading is not None:
            # An upgrade request that will be forwarded as one: what follows
            # its head is the new protocol's (a first WebSocket frame, say),
            # held for the backend should it switch, and nothing more is
            # read until it answers (see Exchange.backend_switched).
            if self.parsing is not None:
                self._body_complete(self.parsing)
            rest = self._chunk[e.args[0] :]
            if rest:
                self._held.append(rest)
            self.dataReceived = self._hold_upgrade  # type: ignore[method-assign]
            self.pause("upgrade")
        elif isinstance(e, httptools.HttpParserUpgrade):
            # The head was complete and has been queued without its Upgrade
            # header; what follows is not HTTP, so the connection ends with
            # this request.
            if self.parsing is not None:
                self.parsing.keep_alive = False
                self._body_complete(self.parsing)
            self.broken = (0, "upgrade requested")
            self.pause("upgrade")
        elif isinstance(e, httptools.HttpParserCallbackError):
            cause = e.__context__
            if isinstance(cause, _Closing):
                self.pause("closing")
            elif isinstance(cause, _HeadersTooLarge):
                self._break(431, "request headers too large")
            elif isinstance(cause, _BadRequest):
                self._break(400, str(cause))
            else:
                self._break(500, f"internal error: {cause!r}")
                log.failure("request handling failed", Failure(cause) if cause else None)
        elif isinstance(e, httptools.HttpParserInvalidMethodError) and self._extension_found():
            self._feed_extension(b"")
        else:
            self._break(400, f"malformed request: {e}")

    def _hold_upgrade(self, data: bytes) -> None:
        """Client bytes after an upgrade request's head, before the backend's answer."""
        if not self.closing and not self.closed:
            self._held.append(data)

    def start_tunnel(self, exchange: Exchange) -> list[bytes]:
        """
        The backend switched protocols: from now on every byte the client
        sends goes to C{exchange} unparsed.  Returns the bytes held since
        the request's head.
        """
        held, self._held = self._held, []
        self.dataReceived = exchange.tunnel_from_client  # type: ignore[method-assign]
        self._cancel_stall()
        self.resume("upgrade")
        return held

    # An extension method (RFC 9110 9.1: any token): llhttp knows a fixed
    # list and refuses the rest.  Only then is the request line looked at
    # here; known methods never come this way (docs/design.md).

    def _extension_found(self) -> bool:
        """
        llhttp refused a method: if the request line starts with a valid
        token, the request's bytes go to L{_feed_extension} instead of the
        (now dead) parser until its line is whole; else C{False} (400).
        """
        if not self._in_message or not self._head_chunks:
            return False
        if self._begun_mid_chunk:
            # After a request that ended in the same read: httptools reports
            # no offsets, so where this one starts is unknown (docs/design.md).
            return False
        raw = b"".join(self._head_chunks)
        start = _extension_request_start(raw)
        if start is None:
            return False
        self._head_chunks = [raw]
        self._extension_at = start
        self._feed = self._feed_extension  # type: ignore[method-assign]
        return True

    def _feed_extension(self, data: bytes) -> None:
        """
        Bytes of an extension-method request whose line is not whole yet
        (dataReceived has added C{data} to C{_head_chunks}).  Once it is,
        llhttp parses the request under a placeholder method, with a fresh
        parser, and the real method is put back when its head is complete.
        """
        while True:  # a loop, not recursion: a read may hold many such requests
            raw = b"".join(self._head_chunks)[self._extension_at :]
            end = raw.find(b"\n")
            if end < 0:
                if len(raw) > self.settings.max_header_bytes:
                    del self._feed
                    self._break(431, "request headers too large")
                elif _LINE_PREFIX.match(raw) is None:
                    del self._feed
                    self._break(400, "malformed request: invalid method")
                return
            del self._feed
            line = _EXTENSION_LINE.match(raw)
            if line is None or end + 1 != line.end():
                self._break(400, "malformed request: invalid request line")
                return
            if line.group(2) != b"HTTP":
                self._break(400, f"unsupported protocol {line.group(2).decode()}")
                return
            method = line.group(1)
            self._in_message = False
            self.parser = _ExtensionMethodParser(  # type: ignore[assignment]
                httptools.HttpRequestParser(self), method, self
            )
            # What llhttp sees is what the head chunks keep (on_message_begin):
            # this request's line, there, has the placeholder method.
            self._chunk = _PLACEHOLDER_METHOD + raw[len(method) :]
            self._completed_in_chunk = False  # this chunk begins with the request
            try:
                # The placeholder alone first: on_message_begin has then reset
                # the head's size, which must count this method's length.
                self.parser.feed_data(_PLACEHOLDER_METHOD)
                self._header_bytes += len(method)
                if self._header_bytes > self.settings.max_header_bytes:
                    self._break(431, "request headers too large")
                    return
                self.parser.feed_data(self._chunk[len(_PLACEHOLDER_METHOD) :])
                return
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
                failed: Exception = e
            if not isinstance(failed, httptools.HttpParserInvalidMethodError):
                self._parse_failed(failed)
                return
            if not self._extension_found():
                self._break(400, f"malformed request: {failed}")
                return

    def _break(self, status: int, reason: str) -> None:
        """The byte stream cannot be trusted past this point: answer once, then close."""
        self.broken = (status, reason)
        self.pause("broken")
        queued = self.parsing
        if queued is not None and queued is not self.current:
            # A queued request whose body went wrong is never forwarded.
            if queued in self.queue:
                self.queue.remove(queued)
            self.parsing = None
        if self.parsing is not None and self.parsing is self.current and self.exchange:
            # The request being forwarded has a body that went wrong mid-way.
            self.exchange.client_body_failed(reason)
            return
        if self.current is None:
            log.info("refused {peer}: {reason}", peer=self.peer, reason=reason)
            self._send_error(status, reason)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.closing:
            # The proxy has answered "Connection: close": nothing the client
            # sends after that is a request (RFC 9112 9.6).
            raise _Closing()
        self._in_message = True
        self._head_chunks = [self._chunk]
        self._begun_mid_chunk = self._completed_in_chunk
        self._url = b""
        self._headers = []
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self.settings.max_header_bytes:
            raise _HeadersTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.settings.max_header_bytes or len(self._headers) >= MAX_HEADERS:
            raise _HeadersTooLarge()
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        version = parser.get_http_version().encode("ascii")
        if version not in (b"1.1", b"1.0"):
            raise _BadRequest(f"unsupported HTTP version {version.decode()}")
        method = parser.get_method()
        protocol = _other_protocol(self._head_chunks, method, self._url)
        self._head_chunks = []
        if protocol is not None:
            raise _BadRequest(f"unsupported protocol {protocol}/{version.decode()}")
        request = Request(method, self._url, version, self._headers)
        # Trailer fields of a chunked body arrive through on_header too: they
        # must never join the head already taken (RFC 9110 6.5.2).
        self._headers = []
        tokens = request.connection = connection_tokens(request.headers)
        if version == b"1.1":
            request.keep_alive = b"close" not in tokens
        else:
            request.keep_alive = b"keep-alive" in tokens
        host: bytes | None = None
        upgrade = False
        for name, value in request.headers:
            lower = name.lower()
            if lower == b"content-length":
                request.content_length = int(value)
            elif lower == b"transfer-encoding":
                if version == b"1.0":
                    raise _BadRequest("Transfer-Encoding in an HTTP/1.0 request")
                if request.chunked or value.rstrip(b" ").lower() != b"chunked":
                    # Only a single "chunked" frames a request unambiguously
                    # (and exactly what llhttp accepts as chunked).
                    raise _BadRequest("Transfer-Encoding other than chunked")
                request.chunked = True
            elif lower == b"host":
                if host is not None:
                    raise _BadRequest("more than one Host header")
                host = value
            elif lower == b"expect" and value.strip().lower() == b"100-continue":
                request.expect_continue = version == b"1.1"
            elif lower == b"upgrade":
                upgrade = True
            elif normalise(name) in (b"content-length", b"transfer-encoding"):
                # Content_Length / Transfer_Encoding: a backend reading "_" as
                # "-" would frame the body differently from the proxy.
                raise _BadRequest(f"framing header spelled {name.decode('latin-1')!r}")
        if host is None:
            if version == b"1.1":
                raise _BadRequest("HTTP/1.1 request without Host")
            # HTTP/1.0 may omit Host (openssl s_time -www does), but the
            # request goes on as HTTP/1.1, which needs one: the name the
            # client asked for in the handshake, else the address it reached.
            host = self.default_host()
            request.headers.append((b"Host", host))
            request.host_generated = True
        if not _HOST.fullmatch(host):
            raise _BadRequest("invalid Host")
        absolute = _ABSOLUTE_FORM.match(request.target)
        if absolute is not None:
            # RFC 9112 3.2.2: the target's authority takes the place of Host,
            # so a backend reading Host sees the same authority as one reading
            # the target.
            authority = absolute.group(1)
            if not authority or not _HOST.fullmatch(authority):
                raise _BadRequest("invalid authority in the request target")
            request.headers = [(n, v) for n, v in request.headers if n.lower() != b"host"]
            request.headers.append((b"Host", authority))
            host = authority
        request.host = host
        if request.method == b"CONNECT":
            raise _BadRequest("CONNECT is not supported")
        if not asterisk_form_allowed(request.method, request.target):
            raise _BadRequest("asterisk-form target (*) with a method other than OPTIONS")
        if upgrade:
            if request.chunked or request.content_length:
                # llhttp ends an Upgrade request at its head: a declared body
                # would reach the backend as the start of the next request.
                raise _BadRequest("Upgrade request with a body")
            if (
                b"upgrade" in tokens
                and version == b"1.1"
                and request.method == b"GET"
                and parser.should_upgrade()
            ):
                # Forwarded as an upgrade (WebSocket): with the checked
                # protocol list only, and never followed by another request.
                try:
                    request.upgrade = upgrade_protocols(request.headers)
                except ValueError as e:
                    raise _BadRequest(str(e)) from None
                request.keep_alive = False
                self._upgrading = request
        self._in_message = False
        self.parsing = request
        self.queue.append(request)
        if self.current is None:
            self._start_next()
        else:
            self.pause("pipeline")

    def default_host(self) -> bytes:
        """SNI server name, else the local address, as a Host value."""
        handle = self.transport.getHandle()
        name = handle.get_servername() if hasattr(handle, "get_servername") else None
        if name:
            return bytes(name)
        local = self.transport.getHost()
        address = getattr(local, "host", "localhost")
        if ":" in address:
            address = f"[{address}]"
        return f"{address}:{getattr(local, 'port', 443)}".encode("ascii")

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        assert request is not None
        if request is self.current and self.exchange is not None and self.exchange.forwarding:
            self.exchange.client_body(body)
            self._arm_stall()
        else:
            request.pending.append(body)
            self.pause("body-wait")

    def on_message_complete(self) -> None:
        self._completed_in_chunk = True
        request = self.parsing
        if request is not None:
            self._body_complete(request)

    def _body_complete(self, request: Request) -> None:
        request.body_done = True
        self.parsing = None
        if request is self.current:
            self._cancel_stall()
        if request is self.current and self.exchange is not None and self.exchange.forwarding:
            self.exchange.client_body_done()

    # -- exchanges --------------------------------------------------------

    def _start_next(self) -> None:
        if not self.queue:
            return
        request = self.queue.popleft()
        self.current = request
        # The idle timer stays armed: it does nothing while a request is in
        # flight (see _idle_timed_out), which saves a cancel and a callLater
        # per keep-alive request.
        request.started = time.monotonic()
        self.exchange = Exchange(self, request)
        self.exchange.start()

    def exchange_done(self, keep_alive: bool) -> None:
        """Called by the exchange once the response has been written in full."""
        self.current = None
        self.exchange = None
        # A body that arrived while the backend connection was being made is
        # held with reading paused; if that connection failed, nothing else
        # resumes it.
        self.resume("body-wait")
        if not keep_alive or self.closed or self.factory.draining:
            self._lose()
            return
        if self.queue:
            self._start_next()
            if not self.queue:
                self.resume("pipeline")
            return
        self.resume("pipeline")
        if self.broken is not None:
            status, reason = self.broken
            if status:
                log.info("refused {peer}: {reason}", peer=self.peer, reason=reason)
                self._send_error(status, reason)
            else:
                self._lose()
            return
        self._arm_idle()

    def _send_error(self, status: int, reason: str) -> None:
        """An answer of the proxy's own, after which the connection closes."""
        self.closing = True
        if self.factory.metrics is not None:
            self.factory.metrics.request(status, 0.0)
        body = f"{status} {_REASONS[status].decode()}: {reason}\n".encode()
        self.transport.write(
            _status_line(status, _REASONS[status])
            + b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            + body
        )
        self._log_refused(status, len(body))
        self._lose()

    def _log_refused(self, status: int, sent: int) -> None:
        """
        The access line of a request refused before it was forwarded (400,
        431, 408), as L{Exchange._log} writes them: the method and target
        when llhttp got that far, else C{-}; the duration counts from when
        the connection began waiting for this request.
        """
        method = target = "-"
        version = "1.1"
        if self._url:
            extension = self._extension_head
            parser = self.parser
            if isinstance(parser, _ExtensionMethodParser):
                raw_method = parser.method
            elif extension is not None and extension[1] is self._url:
                raw_method = extension[0]
            else:
                raw_method = parser.get_method()
            method = raw_method.decode("latin-1")
            target = self._url.decode("latin-1")
            version = self.parser.get_http_version() or version
        duration = max(0.0, self.clock.seconds() - self._idle_since) if self._idle_since else 0.0
        access_log.info(
            ACCESS_FORMAT,
            line=f'{self.peer} {self.log_cn} "{method} {target} HTTP/{version}" {status} '
            f"{sent} {duration:.3f}s",
            peer=self.peer,
            cn=self.log_cn,
            method=method,
            target=target,
            version=version,
            status=status,
            bytes=sent,
            duration=duration,
        )


@implementer(IPushProducer)
class _PauseClient:
    """Registered with the backend transport: a full backend pauses reading from the client."""

    def __init__(self, client: ClientConnection) -> None:
        self.client = client

    def pauseProducing(self) -> None:
        self.client.pause("backend-full")

    def resumeProducing(self) -> None:
        self.client.resume("backend-full")

    def stopProducing(self) -> None:
        self.client.resume("backend-full")


@implementer(IPushProducer)
class _PauseBackend:
    """
    Registered with the client transport: a slow client pauses reading from
    the backend, and one that reads nothing for --idle-timeout is dropped.
    """

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self._stalled: IDelayedCall | None = None

    def pauseProducing(self) -> None:
        exchange = self.exchange
        backend = exchange.backend
        if backend is not None and backend.connected:
            backend.pause_reading()
        if self._stalled is None:
            client = exchange.client
            self._stalled = client.clock.callLater(
                client.settings.idle_timeout, self._timed_out
            )

    def resumeProducing(self) -> None:
        self._cancel()
        backend = self.exchange.backend
        if backend is not None and backend.connected:
            backend.resume_reading()

    def stopProducing(self) -> None:
        self._cancel()

    def _cancel(self) -> None:
        if self._stalled is not None and self._stalled.active():
            self._stalled.cancel()
        self._stalled = None

    def _timed_out(self) -> None:
        self._stalled = None
        self.exchange.client_stopped_reading()


class Exchange:
    """
    One request forwarded and its response streamed back.

    @ivar forwarding: the backend connection is ready for body bytes.
    """

    def __init__(self, client: ClientConnection, request: Request) -> None:
        self.client = client
        self.request = request
        self.backend: BackendConnection | None = None
        self.forwarding = False
        self.response_started = False
        self.finished = False
        self.status = 0
        self.bytes_sent = 0
        self.keep_alive = request.keep_alive
        self.chunked_out = False
        self.retried = False
        self.body_forwarded = 0
        self._timeout: IDelayedCall | None = None
        self._client_producer: _PauseBackend | None = None
        self._backend_producer: _PauseClient | None = None
        #: the backend switched protocols: bytes pass both ways unparsed
        self.tunnelling = False
        self._last_activity = 0.0
        self._tunnel_timer: IDelayedCall | None = None

    @property
    def pool(self) -> BackendPool:
        return self.client.factory.pool

    # -- towards the backend ----------------------------------------------

    def start(self) -> None:
        request = self.request
        if not self._authorise():
            return
        if request.expect_continue:
            self.client.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        conn, pending = self.pool.acquire()
        if conn is not None:
            self._attach(conn)
        else:
            assert pending is not None
            self.client.pause("connecting")
            pending.addCallbacks(self._connected, self._connect_failed)

    def _authorise(self) -> bool:
        """
        Apply the allow rules; answer 400 or 403 and return False to refuse.

        Per-path rules decide on the normalised path, so the normalised
        target is what gets forwarded: the backend must act on the request
        that was checked, never on a spelling that could route elsewhere.
        Without per-path rules the path decides nothing and the client's
        target is forwarded byte for byte.
        """
        policy = self.client.settings.policy
        path = "/"
        if policy.rules:
            target = parse_target(self.request.target)
            if target is None:
                self.client.broken = (0, "bad request target")
                self._respond_error(400, "request target is ambiguous or not allowed")
                return False
            path = target.path
            self.request.target = target.forward
        if not policy.restricts:
            return True
        decision = policy.decide(self.client.identity, path)
        if decision.allowed:
            return True
        log.info("refused {peer}: {reason}", peer=self.client.peer, reason=decision.reason)
        self._respond_error(403, "not allowed", logged=True)
        return False

    def _connected(self, conn: BackendConnection) -> None:
        self.client.resume("connecting")
        if self.finished or self.client.closed:
            self.pool.release(conn)
            return
        self._attach(conn)

    def _connect_failed(self, failure: Failure) -> None:
        self.client.resume("connecting")
        if self.finished or self.client.closed:
            return
        reason = connect_error_reason(failure)
        self._backend_error(reason)
        self._respond_error(502, reason)

    def _head(self) -> bytes:
        request = self.request
        headers = request_headers_for_backend(request.headers, request.connection)
        client = self.client
        host = request.host
        parts = [request.method, b" ", request.target, b" HTTP/1.1\r\n"]
        for name, value in headers:
            parts += [name, b": ", value, b"\r\n"]
        for name, value in client.identity_headers:
            parts += [name, b": ", value, b"\r\n"]
        parts += [b"X-Forwarded-For: ", client.peer_host.encode("ascii"), b"\r\n"]
        parts.append(b"X-Forwarded-Proto: https\r\n")
        if host and not request.host_generated:
            parts += [b"X-Forwarded-Host: ", host, b"\r\n"]
        if request.upgrade is not None:
            parts += [b"Connection: upgrade\r\nUpgrade: ", request.upgrade, b"\r\n"]
        if request.content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % request.content_length)
        elif request.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _attach(self, conn: BackendConnection) -> None:
        self.backend = conn
        request = self.request
        conn.start(
            self, self._head(), request.method, self.client.cork, request.upgrade is not None
        )
        self._backend_producer = _PauseClient(self.client)
        conn.transport.registerProducer(self._backend_producer, True)
        self._client_producer = _PauseBackend(self)
        self.client.transport.registerProducer(self._client_producer, True)
        self.forwarding = True
        if request.pending:
            pending, request.pending = request.pending, []
            for chunk in pending:
                self.client_body(chunk)
        self.client.resume("body-wait")
        if request.body_done:
            self.client_body_done()

    def client_body(self, data: bytes) -> None:
        backend = self.backend
        assert backend is not None
        self.body_forwarded += len(data)
        if self.request.chunked:
            backend.write_sequence([b"%X\r\n" % len(data), data, b"\r\n"])
        else:
            backend.write(data)

    def client_body_done(self) -> None:
        if self.request.chunked and self.backend is not None:
            self.backend.write(b"0\r\n\r\n")
        if not self.response_started and not self.finished:
            self._timeout = self.client.clock.callLater(
                self.client.settings.backend_timeout, self._backend_timed_out
            )

    def client_body_failed(self, reason: str) -> None:
        """The client's body was malformed after the head was forwarded."""
        log.info("refused {peer}: {reason}", peer=self.client.peer, reason=reason)
        self._drop_backend()
        if not self.response_started:
            self._respond_error(400, reason)
        else:
            self.client.transport.abortConnection()

    def client_body_stalled(self) -> None:
        """The client stopped sending its body for --idle-timeout seconds."""
        reason = "request body stalled"
        log.info("closing {peer}: {reason}", peer=self.client.peer, reason=reason)
        self.client.broken = (0, reason)
        self._drop_backend()
        if not self.response_started:
            self._respond_error(408, reason)
        else:
            self.finished = True
            self._log(self.status)
            self.client.transport.abortConnection()

    def client_stopped_reading(self) -> None:
        """The client read nothing of the response for --idle-timeout seconds."""
        if self.finished:
            return
        log.info("aborting {peer}: client stopped reading the response", peer=self.client.peer)
        self.finished = True
        self._drop_backend()
        self._log(self.status)
        self.client.transport.abortConnection()

    def client_lost(self) -> None:
        if self.tunnelling:
            self._end_tunnel()
        elif not self.finished:
            self.finished = True
            self._cancel_timeout()
            self._drop_backend()
            self._log(499)

    def _backend_error(self, kind: str) -> None:
        metrics = self.client.factory.metrics
        if metrics is not None:
            metrics.backend_error(kind)

    def _backend_timed_out(self) -> None:
        self._timeout = None
        if not self.response_started and not self.finished:
            self._backend_error("response timeout")
            self._drop_backend()
            self._respond_error(504, "backend sent no response headers in time")

    # -- from the backend (BackendExchange) --------------------------------

    def backend_informational(self, status: int, reason: bytes, headers: Headers) -> None:
        if status == 100 or self.request.version != b"1.1":
            return  # the proxy already answered Expect itself; 1.0 clients get no 1xx
        lines = [_status_line(status, _sanitise_reason(reason))]
        for name, value in response_headers_for_client(headers, connection_tokens(headers)):
            lines += [name, b": ", value, b"\r\n"]
        lines.append(b"\r\n")
        self.client.transport.writeSequence(lines)

    def backend_headers(self, status: int, reason: bytes, headers: Headers, version: bytes) -> None:
        self._cancel_timeout()
        self.response_started = True
        self.status = status
        request = self.request
        connection = connection_tokens(headers)
        kept = response_headers_for_client(headers, connection)
        length: bytes | None = None
        chunked = False
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                length = value.strip()
            elif lower == b"transfer-encoding":
                chunked = True
        no_body = request.method == b"HEAD" or status in (204, 304)
        parts = [_status_line(status, _sanitise_reason(reason))]
        for name, value in kept:
            parts += [name, b": ", value, b"\r\n"]
        if status == 204:
            pass
        elif length is not None and not chunked:
            parts += [b"Content-Length: ", length, b"\r\n"]
        elif no_body:
            pass
        elif request.version == b"1.1":
            self.chunked_out = True
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            self.keep_alive = False  # an HTTP/1.0 client reads this body to the close
        if request.body_pending:
            # Answered before the client finished sending: the rest of its
            # body cannot be skipped safely, so the connection ends here.
            self.keep_alive = False
        if self.client.broken is not None or self.client.factory.draining:
            self.keep_alive = False
        if not self.keep_alive:
            parts.append(b"Connection: close\r\n")
            self.client.closing = True
        elif request.version == b"1.0":
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self.client.transport.writeSequence(parts)

    def backend_body(self, data: bytes) -> None:
        self.bytes_sent += len(data)
        if self.chunked_out:
            self.client.transport.writeSequence([b"%X\r\n" % len(data), data, b"\r\n"])
        else:
            self.client.transport.write(data)

    def backend_complete(self) -> None:
        if self.finished:
            return
        if self.chunked_out:
            self.client.transport.write(b"0\r\n\r\n")
        backend = self.backend
        self._detach()
        if backend is not None:
            length = self.request.content_length
            if (
                self.request.body_pending
                or (length is not None and self.body_forwarded != length)
                or self.request.upgrade is not None
            ):
                # (An upgrade request's connection never serves another:
                # the backend may have begun switching.)
                # The backend did not get exactly the body it was promised:
                # whatever it reads next on this connection would be off.
                backend.reusable = False
            self.pool.release(backend)
        self._finish(self.status, self.keep_alive)

    def backend_failed(self, reason: str, response_started: bool) -> None:
        if self.finished:
            return
        self._backend_error(reason)
        self._detach()
        if response_started:
            # Too late for an error answer: end the connection so the client
            # sees a truncated response, never a complete-looking one.
            log.info("aborting {peer}: {reason}", peer=self.client.peer, reason=reason)
            self.finished = True
            self._log(self.status)
            self.client.transport.abortConnection()
            return
        backend, self.backend = self.backend, None
        if (
            backend is not None
            and backend.used > 1
            and not backend.received
            and not self.retried
            and self._replayable()
        ):
            # A pooled connection the backend closed as we reused it: the
            # request never reached the application, so one fresh try is safe.
            self.retried = True
            self.forwarding = False
            self.client.pause("connecting")
            self.pool.connect().addCallbacks(self._connected, self._connect_failed)
            return
        self._respond_error(502, reason)

    # -- after a 101: a tunnel (TunnelSink) ---------------------------------

    def backend_switched(self, reason: bytes, headers: Headers, rest: bytes) -> None:
        """
        The backend accepted the upgrade: relay its 101 with the protocol it
        chose, then pass bytes both ways until either side ends.  The
        producers registered at _attach stay, so each side still pauses the
        other.  The access line is written once, when the tunnel ends.
        """
        self._cancel_timeout()
        self.response_started = True
        self.status = 101
        client = self.client
        backend = self.backend
        assert backend is not None
        parts = [_status_line(101, _sanitise_reason(reason))]
        for name, value in response_headers_for_client(headers, connection_tokens(headers)):
            parts += [name, b": ", value, b"\r\n"]
        parts.append(b"Connection: upgrade\r\n")
        for name, value in headers:
            if name.lower() == b"upgrade":
                parts += [b"Upgrade: ", value, b"\r\n"]
        parts.append(b"\r\n")
        client.transport.writeSequence(parts)
        self.tunnelling = True
        self._last_activity = client.clock.seconds()
        self._tunnel_timer = client.clock.callLater(
            client.settings.idle_timeout, self._tunnel_idle
        )
        for chunk in client.start_tunnel(self):
            backend.write(chunk)
        backend.tunnel(self, rest)

    def tunnel_data(self, data: bytes) -> None:
        """Bytes from the backend, for the client."""
        if self.finished:
            return
        self.bytes_sent += len(data)
        self._last_activity = self.client.clock.seconds()
        self.client.transport.write(data)

    def tunnel_from_client(self, data: bytes) -> None:
        """Bytes from the client, for the backend."""
        backend = self.backend
        if self.finished or backend is None:
            return
        self._last_activity = self.client.clock.seconds()
        backend.write(data)

    def tunnel_closed(self) -> None:
        """The backend ended the tunnel."""
        self.backend = None
        self._end_tunnel()

    def _tunnel_idle(self) -> None:
        self._tunnel_timer = None
        if self.finished:
            return
        client = self.client
        idle = client.settings.idle_timeout
        remaining = self._last_activity + idle - client.clock.seconds()
        if remaining > 0:
            self._tunnel_timer = client.clock.callLater(remaining, self._tunnel_idle)
            return
        log.info("closing {peer}: upgraded connection idle", peer=client.peer)
        self._end_tunnel()

    def _end_tunnel(self) -> None:
        """Close both sides after what was written, once; log the exchange as 101."""
        if self.finished:
            return
        self.finished = True
        if self._tunnel_timer is not None and self._tunnel_timer.active():
            self._tunnel_timer.cancel()
        self._tunnel_timer = None
        self._detach()
        backend, self.backend = self.backend, None
        if backend is not None and backend.connected:
            backend.end_tunnel()
        self._log(101)
        if not self.client.closed:
            self.client.exchange_done(False)

    def _replayable(self) -> bool:
        request = self.request
        return (
            request.content_length in (None, 0)
            and not request.chunked
            and request.method in (b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE")
        )

    # -- ending -----------------------------------------------------------

    def _respond_error(self, status: int, reason: str, logged: bool = False) -> None:
        self._cancel_timeout()
        self._drop_backend()
        if not logged:
            log.info(
                "{status} for {peer}: {reason}",
                status=status,
                peer=self.client.peer,
                reason=reason,
            )
        body = f"{status} {_REASONS[status].decode()}: {reason}\n".encode()
        keep_alive = (
            self.keep_alive
            and not self.request.body_pending
            and self.client.broken is None
            and not self.client.factory.draining
        )
        head = _status_line(status, _REASONS[status]) + (
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body)
        )
        if not keep_alive:
            head += b"Connection: close\r\n"
            self.client.closing = True
        elif self.request.version == b"1.0":
            head += b"Connection: keep-alive\r\n"
        self.bytes_sent = len(body)
        if self.request.method != b"HEAD":
            self.client.transport.write(head + b"\r\n" + body)
        else:
            self.client.transport.write(head + b"\r\n")
        self._finish(status, keep_alive)

    def _drop_backend(self) -> None:
        self._detach()
        backend, self.backend = self.backend, None
        if backend is not None and backend.connected:
            backend.abandon()

    def _detach(self) -> None:
        self.forwarding = False
        if self._backend_producer is not None and self.backend is not None:
            if self.backend.connected:
                self.backend.transport.unregisterProducer()
            self._backend_producer = None
            self.client.resume("backend-full")
        if self._client_producer is not None:
            self._client_producer._cancel()
            if not self.client.closed:
                self.client.transport.unregisterProducer()
            self._client_producer = None

    def _cancel_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def _finish(self, status: int, keep_alive: bool) -> None:
        self.finished = True
        self._cancel_timeout()
        self._log(status)
        self.client.exchange_done(keep_alive)

    def _log(self, status: int) -> None:
        request = self.request
        duration = time.monotonic() - request.started
        metrics = self.client.factory.metrics
        if metrics is not None:
            metrics.request(status, duration)
        cn = self.client.log_cn
        peer = self.client.peer
        method = request.method.decode("latin-1")
        target = request.target.decode("latin-1")
        version = request.version.decode("ascii")
        # Formatted here with an f-string: twisted.logger's own formatting of
        # a many-field format string was a large part of each request's cost.
        # The fields are still passed for structured (JSON) log observers.
        access_log.info(
            ACCESS_FORMAT,
            line=f'{peer} {cn} "{method} {target} HTTP/{version}" {status} '
            f"{self.bytes_sent} {duration:.3f}s",
            peer=peer,
            cn=cn,
            method=method,
            target=target,
            version=version,
            status=status,
            bytes=self.bytes_sent,
            duration=duration,
        )


class ProxyFactory(Factory):
    """Builds one L{ClientConnection} per accepted client; holds what they share."""

    noisy = False

    def __init__(
        self,
        settings: ProxySettings,
        pool: BackendPool,
        clock: IReactorTime,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.clock = clock
        self.metrics = metrics
        self.connections: set[ClientConnection] = set()
        #: connections whose handshake has not finished, oldest first
        self.handshaking: dict[ClientConnection, None] = {}
        #: set when stopping: every response ends its connection
        self.draining = False
        #: the listening port, paused while --max-connections clients are connected
        self.port: Any = None
        self._accept_paused = False

    def connection_opened(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        self.handshaking[conn] = None
        limit = self.settings.max_connections
        if limit and len(self.connections) >= limit and self.port is not None:
            # Full: the oldest unfinished handshake gives way before accepting
            # pauses, so clients that open connections and never finish their
            # handshake cannot hold every slot for --handshake-timeout and
            # lock verified clients out (as pausing alone let them).
            for oldest in self.handshaking:
                if oldest is not conn:
                    oldest.give_way()
                    return
            if not self._accept_paused:
                # New clients wait in the kernel's accept queue, as with
                # HAProxy's maxconn, instead of being accepted and starved.
                log.warn(
                    "{count} connections open (--max-connections): not accepting more for now",
                    count=len(self.connections),
                )
                self.port.stopReading()
                self._accept_paused = True

    def handshake_finished(self, conn: ClientConnection) -> None:
        self.handshaking.pop(conn, None)

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        self.handshaking.pop(conn, None)
        if self._accept_paused and len(self.connections) < self.settings.max_connections:
            self._accept_paused = False
            if self.port is not None and not self.draining:
                self.port.startReading()

    def buildProtocol(self, addr: Any) -> ClientConnection:
        return ClientConnection(self)
