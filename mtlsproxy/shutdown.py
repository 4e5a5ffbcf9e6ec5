"""
Graceful stop: let in-flight requests finish, up to C{--shutdown-timeout}.

On SIGTERM the service stops listening, then calls L{drain} on the proxy
factory: idle connections (between requests, or still handshaking) are closed
at once, connections with a request in flight are left to finish it (the
factory's C{draining} flag makes their response end with C{Connection: close}),
and whatever is still open when the timeout passes is aborted, so that the
process always exits within the time systemd allows (C{TimeoutStopSec}).

Only a small interface is needed from the HTTP layer (L{DrainableFactory},
L{DrainableConnection}), so this logic is tested on fakes and a C{task.Clock}.

Why polling: a connection that finishes its last request while draining must
be noticed and, if it stays open (a client that ignores C{Connection: close}),
closed.  Sweeping the set of live connections every L{SWEEP_INTERVAL} seconds
does both, needs no callback from the HTTP layer, and costs nothing next to the
network round trips it waits for.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger("mtlsproxy")

#: Seconds between two looks at the remaining connections.
SWEEP_INTERVAL = 0.1


class DrainableTransport(Protocol):
    """What L{drain} does to a connection: close it politely, or abort it."""

    def loseConnection(self) -> Any: ...

    def abortConnection(self) -> Any: ...


class DrainableConnection(Protocol):
    """
    A client connection as L{drain} sees it (C{http.server.ClientConnection}).

    @ivar current: the request being answered, C{None} between requests.
    """

    @property
    def current(self) -> object | None: ...

    @property
    def transport(self) -> Any: ...


class DrainableFactory(Protocol):
    """
    The proxy factory as L{drain} sees it (C{http.server.ProxyFactory}).

    @ivar connections: the live client connections: added in
        C{connectionMade}, discarded in C{connectionLost}.
    @ivar draining: set by L{drain}; once true, each response ends with
        C{Connection: close} and its connection is closed after it.
    """

    @property
    def connections(self) -> Collection[DrainableConnection]: ...

    draining: bool


@dataclass(frozen=True)
class DrainResult:
    """
    How a drain went, for the log line after it.

    @ivar closed_idle: connections closed because no request was in flight.
    @ivar finished: connections that had a request in flight and ended in time.
    @ivar aborted: connections still open at the timeout, and aborted.
    @ivar interrupted: how many of those had a request in flight (cut short).
    @ivar elapsed: seconds the drain took.
    """

    closed_idle: int
    finished: int
    aborted: int
    interrupted: int
    elapsed: float


class _Drain:
    def __init__(
        self, factory: DrainableFactory, clock: IReactorTime, timeout: float, interval: float
    ) -> None:
        self.factory = factory
        self.clock = clock
        self.timeout = timeout
        self.interval = interval
        self.start = clock.seconds()
        self.asked: set[DrainableConnection] = set()  # connections asked to close
        self.busy: set[DrainableConnection] = set()  # seen with a request in flight
        self.closed_idle = 0
        self.call: IDelayedCall | None = None
        self.done: Deferred[DrainResult] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[DrainResult]) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None

    def sweep(self) -> None:
        self.call = None
        for conn in list(self.factory.connections):
            if conn.current is not None:
                self.busy.add(conn)
            elif conn not in self.asked:
                self.asked.add(conn)
                if conn not in self.busy:
                    self.closed_idle += 1
                conn.transport.loseConnection()
        remaining = list(self.factory.connections)
        elapsed = self.clock.seconds() - self.start
        if not remaining:
            self._finish(0, 0, elapsed)
        elif elapsed >= self.timeout:
            interrupted = 0
            for conn in remaining:
                if conn.current is not None:
                    interrupted += 1
                conn.transport.abortConnection()
            self._finish(len(remaining), interrupted, elapsed)
        else:
            self.call = self.clock.callLater(
                min(self.interval, self.timeout - elapsed), self.sweep
            )

    def _finish(self, aborted: int, interrupted: int, elapsed: float) -> None:
        finished = max(0, len(self.busy) - interrupted)
        result = DrainResult(self.closed_idle, finished, aborted, interrupted, elapsed)
        if aborted:
            log.warn(
                "shutdown timeout ({timeout}s) passed: aborted {aborted} connection(s), "
                "{interrupted} with a request in flight",
                timeout=self.timeout,
                aborted=aborted,
                interrupted=interrupted,
            )
        self.done.callback(result)


def drain(
    factory: DrainableFactory,
    clock: IReactorTime,
    timeout: float,
    interval: float = SWEEP_INTERVAL,
) -> Deferred[DrainResult]:
    """
    Close the factory's connections as their requests finish; abort what is
    left after C{timeout} seconds.

    Call it after the listening port has stopped accepting.  The returned
    Deferred fires (never fails) once every connection is gone or the rest
    were aborted; cancelling it stops the sweeping and leaves the
    connections as they are.
    """
    factory.draining = True
    connections = list(factory.connections)
    in_flight = sum(1 for c in connections if c.current is not None)
    if connections:
        log.info(
            "stopping: draining {count} connection(s), {in_flight} with a request in "
            "flight, for up to {timeout}s",
            count=len(connections),
            in_flight=in_flight,
            timeout=timeout,
        )
    state = _Drain(factory, clock, timeout, interval)
    state.sweep()
    return state.done
