"""
CorkedTLSProtocol (http/transport.py): application writes wait for uncork()
or the end of the reactor iteration and leave as one TLS write; hold()
spares the end-of-iteration timer when the caller promises to uncork.
In memory, over real pyOpenSSL connections (twisted.test.iosim).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient

from mtlsproxy.http.transport import CorkedTLSFactory, CorkedTLSProtocol
from tests.certfactory import make_client
from tests.test_tls import PKI, ClientCreator, client_context, pki  # noqa: F401 (fixture)


class Sink(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class Pair:
    """A corked TLS server and a plain Twisted TLS client, connected in memory."""

    def __init__(self, pki: PKI) -> None:  # noqa: F811
        self.clock = Clock()
        self.server_app, self.client_app = Protocol(), Sink()
        server = CorkedTLSFactory(
            pki.creator(), Factory.forProtocol(lambda: self.server_app), self.clock
        )
        context = client_context(make_client(pki.client_ca), pki.server_ca)
        client = TLSMemoryBIOFactory(
            ClientCreator(context), True, Factory.forProtocol(lambda: self.client_app), self.clock
        )
        _, _, self.pump = connectedServerAndClient(
            lambda: server.buildProtocol(None), lambda: client.buildProtocol(None), clock=self.clock
        )
        self.pump.flush()
        self.tls: Any = self.server_app.transport
        assert isinstance(self.tls, CorkedTLSProtocol)

    def deliver(self) -> bytes:
        """Move bytes between the ends without running any timer."""
        self.pump.flush(advanceClock=False)
        return self.client_app.received


def test_writes_wait_for_the_end_of_the_iteration(pki: PKI) -> None:  # noqa: F811
    pair = Pair(pki)
    pair.tls.write(b"HTTP/1.1 200 OK\r\n")
    pair.tls.writeSequence([b"Content-Length: 2\r\n\r\n", b"ok"])
    assert pair.deliver() == b""
    assert len(pair.clock.getDelayedCalls()) == 1
    pair.clock.advance(0)
    assert pair.deliver() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert pair.clock.getDelayedCalls() == []


def test_held_writes_schedule_nothing_and_leave_at_uncork(pki: PKI) -> None:  # noqa: F811
    pair = Pair(pki)
    calls_before = len(pair.clock.getDelayedCalls())
    pair.tls.hold()
    pair.tls.write(b"one ")
    pair.tls.writeSequence([b"two ", b"three"])
    assert len(pair.clock.getDelayedCalls()) == calls_before
    assert pair.deliver() == b""
    pair.tls.uncork()
    assert pair.deliver() == b"one two three"
    # After uncork the hold is over: the next write is flushed by the timer again.
    pair.tls.write(b"!")
    assert len(pair.clock.getDelayedCalls()) == calls_before + 1
    pair.clock.advance(0)
    assert pair.deliver() == b"one two three!"


def test_uncork_cancels_the_pending_flush(pki: PKI) -> None:  # noqa: F811
    pair = Pair(pki)
    pair.tls.write(b"x")
    assert len(pair.clock.getDelayedCalls()) == 1
    pair.tls.uncork()
    assert pair.clock.getDelayedCalls() == []
    assert pair.deliver() == b"x"
