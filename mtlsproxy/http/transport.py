"""
Cheaper writes for the two hops: corked TLS records and sends without a reactor round trip.

Per keep-alive request the proxy writes a response head and a body to the
client, and a request head to the backend.  Twisted's default TLS transport
aggregates small writes with a C{callLater(0)} per burst, and every TCP write
is queued until the next reactor iteration, which costs two C{epoll_ctl}
calls and a pass through the loop before the C{send}.  Measured on the
keep-alive path, that glue cost more than the parsing and the TLS itself
(see docs/performance.md).  Here:

  - L{CorkedTLSProtocol} collects what is written while the proxy handles one
    event and turns it into TLS records once, when that event is done
    (L{uncork}), or at the end of the reactor iteration if nobody uncorks;
  - L{send_now} hands bytes to the kernel at once when nothing is queued on
    the TCP transport, and falls back to the ordinary queued write otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IReactorTime
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy


def no_delay(transport: Any) -> None:
    """
    Turn off Nagle's algorithm on a TCP transport (a no-op for unix sockets).

    A response head and its body leave in separate segments; with Nagle on,
    the second waits for the peer's delayed ACK (up to 40 ms) whenever the
    first was small. nginx sets tcp_nodelay on keep-alive connections for the
    same reason.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:  # pragma: no cover - not a TCP socket after all
            pass


def send_now(transport: Any, data: bytes) -> None:
    """
    Write C{data} on a TCP or UNIX transport, straight to the socket when
    nothing is waiting in Twisted's buffer (so ordering is kept), else queued.

    Relies on L{twisted.internet.abstract.FileDescriptor}'s buffer attributes;
    any transport without them gets the ordinary C{write}.
    """
    sock = getattr(transport, "socket", None)
    if (
        sock is None
        or transport.dataBuffer
        or transport._tempDataBuffer
        or not transport.connected
        or transport.disconnecting
    ):
        transport.write(data)
        return
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        transport.write(data)  # let Twisted see and report the error
        return
    if sent < len(data):
        transport.write(data[sent:])


class _DirectWrites:
    """Stands in for the TCP transport under TLS, sending records at once."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        # The TLS layer declares what its transport provides (ITCPTransport, ...).
        directlyProvides(self, providedBy(transport))

    def write(self, data: bytes) -> None:
        send_now(self._transport, data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        send_now(self._transport, b"".join(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CorkedTLSProtocol(TLSMemoryBIOProtocol):
    """
    A TLS transport whose writes wait for L{uncork} (or the end of the
    reactor iteration) and are then encrypted and sent in one go.
    """

    def __init__(self, factory: Any, wrappedProtocol: Any, _connectWrapped: bool = True) -> None:
        super().__init__(factory, wrappedProtocol, _connectWrapped)
        self._corked: list[bytes] = []
        self._flush_call: Any = None
        #: a caller that will uncork when its event is handled has said so
        self._held = False
        self._clock: IReactorTime = factory.clock

    def makeConnection(self, transport: Any) -> None:
        no_delay(transport)
        super().makeConnection(_DirectWrites(transport))

    def hold(self) -> None:
        """
        The caller is handling an event and will call L{uncork} when done, in
        a C{finally}: writes until then need no end-of-iteration flush (a
        C{callLater} and its cancellation per response saved).
        """
        self._held = True

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._corked.append(data)
        if self._flush_call is None and not self._held:
            self._flush_call = self._clock.callLater(0, self.uncork)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        corked = self._corked
        corked.extend(data)
        if self._flush_call is None and corked and not self._held:
            self._flush_call = self._clock.callLater(0, self.uncork)

    def uncork(self) -> None:
        """Encrypt and send everything written since the last uncork."""
        self._held = False
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        if self._corked:
            data = self._corked[0] if len(self._corked) == 1 else b"".join(self._corked)
            self._corked = []
            TLSMemoryBIOProtocol.write(self, data)

    def loseConnection(self) -> None:
        self.uncork()
        super().loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        self._corked = []
        if self._handshakeDone:
            # The peer closed without a close_notify (most HTTP clients do, and
            # we never wait for one).  OpenSSL treats that as a fatal error and
            # drops the session from the server-side cache, so TLS 1.2 clients
            # without tickets could never resume.  Marking the TLS connection
            # as shut down both ways keeps the session, as nginx does on close.
            self._tlsConnection.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        super().connectionLost(reason)  # type: ignore[arg-type]


class CorkedTLSFactory(TLSMemoryBIOFactory):
    """L{TLSMemoryBIOFactory} building L{CorkedTLSProtocol}s."""

    protocol = CorkedTLSProtocol  # type: ignore[assignment]

    def __init__(self, creator: Any, wrappedFactory: Any, clock: IReactorTime) -> None:
        super().__init__(creator, False, wrappedFactory, clock)
        self.clock = clock
