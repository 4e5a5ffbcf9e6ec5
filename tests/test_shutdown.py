"""Graceful stop: drain() on fake connections and a task.Clock, no sockets."""

from __future__ import annotations

from twisted.internet.task import Clock

from mtlsproxy.shutdown import DrainResult, drain


class FakeTransport:
    """Records what drain() asked for; closing removes the connection after C{delay} seconds."""

    def __init__(self, conn: FakeConnection, delay: float | None) -> None:
        self.conn = conn
        self.delay = delay
        self.lose_calls = 0
        self.aborted = False

    def loseConnection(self) -> None:
        self.lose_calls += 1
        if self.delay is not None:
            self.conn.factory.clock.callLater(self.delay, self.conn.gone)

    def abortConnection(self) -> None:
        self.aborted = True
        self.conn.gone()


class FakeConnection:
    """A client connection: C{current} is the request in flight, if any."""

    def __init__(self, factory: FakeFactory, busy: bool, close_delay: float | None = 0.0) -> None:
        self.factory = factory
        self.current: object | None = object() if busy else None
        self.transport = FakeTransport(self, close_delay)
        factory.connections.add(self)

    def gone(self) -> None:
        self.factory.connections.discard(self)

    def finish_request(self, close: bool) -> None:
        """The response is complete; with draining set, the HTTP layer closes the connection."""
        self.current = None
        if close:
            self.gone()


class FakeFactory:
    def __init__(self) -> None:
        self.clock = Clock()
        self.connections: set[FakeConnection] = set()
        self.draining = False


def result_of(d: object) -> DrainResult:
    results: list[DrainResult] = []
    d.addCallback(results.append)  # type: ignore[attr-defined]
    assert results, "drain has not finished"
    return results[0]


def test_nothing_open_finishes_at_once() -> None:
    """With no connection open, drain fires immediately, and the factory is marked draining."""
    factory = FakeFactory()
    d = drain(factory, factory.clock, 10)
    assert factory.draining is True
    assert result_of(d) == DrainResult(0, 0, 0, 0, 0.0)
    assert factory.clock.getDelayedCalls() == []


def test_idle_connections_are_closed_at_once() -> None:
    """Connections between requests (or handshaking) are closed politely right away."""
    factory = FakeFactory()
    idle = [FakeConnection(factory, busy=False, close_delay=0.05) for _ in range(3)]
    d = drain(factory, factory.clock, 10)
    assert all(c.transport.lose_calls == 1 for c in idle)
    assert not d.called
    factory.clock.advance(0.05)  # the TLS close completes
    factory.clock.advance(0.1)  # the next sweep sees them gone
    result = result_of(d)
    assert result.closed_idle == 3 and result.aborted == 0
    assert not any(c.transport.aborted for c in idle)


def test_in_flight_requests_are_left_to_finish() -> None:
    """A connection with a request in flight is not touched; drain ends once it closes."""
    factory = FakeFactory()
    busy = FakeConnection(factory, busy=True)
    d = drain(factory, factory.clock, 10)
    factory.clock.advance(3)
    assert busy.transport.lose_calls == 0 and not d.called
    busy.finish_request(close=True)
    factory.clock.advance(0.1)
    result = result_of(d)
    assert result.finished == 1 and result.aborted == 0 and result.closed_idle == 0
    assert 3.0 < result.elapsed <= 3.2


def test_a_connection_left_open_after_its_request_is_closed() -> None:
    """A client that keeps the connection after its last response is closed at the next sweep."""
    factory = FakeFactory()
    busy = FakeConnection(factory, busy=True)
    d = drain(factory, factory.clock, 10)
    busy.finish_request(close=False)
    factory.clock.advance(0.1)
    assert busy.transport.lose_calls == 1
    factory.clock.advance(0.1)  # closed by now; this sweep finds nothing left
    result = result_of(d)
    assert result.finished == 1 and result.closed_idle == 0


def test_timeout_aborts_what_is_left() -> None:
    """At the timeout, remaining connections are aborted; requests cut short are counted."""
    factory = FakeFactory()
    slow = FakeConnection(factory, busy=True)
    stubborn = FakeConnection(factory, busy=False, close_delay=None)  # never closes by itself
    d = drain(factory, factory.clock, 0.25)
    factory.clock.advance(0.1)
    factory.clock.advance(0.1)
    assert not d.called
    factory.clock.advance(0.05)  # the last wait is shortened to end exactly at the timeout
    result = result_of(d)
    assert slow.transport.aborted and stubborn.transport.aborted
    assert result == DrainResult(closed_idle=1, finished=0, aborted=2, interrupted=1, elapsed=0.25)
    assert factory.connections == set()
    assert factory.clock.getDelayedCalls() == []


def test_idle_connections_are_asked_once() -> None:
    """A connection already asked to close is not asked again on every sweep."""
    factory = FakeFactory()
    lingering = FakeConnection(factory, busy=False, close_delay=None)
    drain(factory, factory.clock, 1)
    factory.clock.pump([0.1] * 5)
    assert lingering.transport.lose_calls == 1


def test_cancel_stops_sweeping() -> None:
    """Cancelling the drain leaves the connections alone and schedules nothing more."""
    factory = FakeFactory()
    busy = FakeConnection(factory, busy=True)
    d = drain(factory, factory.clock, 10)
    d.addErrback(lambda f: None)
    d.cancel()
    assert factory.clock.getDelayedCalls() == []
    factory.clock.advance(20)
    assert not busy.transport.aborted
