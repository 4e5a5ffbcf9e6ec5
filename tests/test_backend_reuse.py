"""
When a pooled backend connection may serve another exchange, in memory.

The end-to-end cases are in C{tests/e2e/test_response_framing.py}; these pin
the two orderings a real reactor makes hard to reproduce on demand.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory

from .test_forwarding import Harness

FAKE = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"


def test_connection_out_of_step_while_idle_is_not_handed_out(client_cert: Any) -> None:
    """
    Stray bytes on an idle pooled connection close it, but the close completes
    later; a request arriving in between must get a new connection.
    """
    h = Harness(client_cert)
    h.send(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    h.respond(FAKE)  # idle: the proxy starts closing it
    assert h.backend.transport.disconnecting
    h.transport.clear()
    h.send(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert len(h.endpoint.connections) == 2
    assert b"GET /2 " not in h.backend_received(0)
    assert b"GET /2 " in h.backend_received(1)


def test_rest_of_a_read_never_answers_a_pipelined_request(client_cert: Any) -> None:
    """
    A response and stray bytes in one read, with the client's next request
    already queued: the next request goes to a new connection, and the stray
    bytes reach no client.
    """
    h = Harness(client_cert)
    h.send(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + FAKE, index=0)
    assert b"SMUGGLED" not in h.client_received()
    assert b"GET /2 " not in h.backend_received(0)
    assert h.endpoint.connections[0].transport.disconnecting
    assert b"GET /2 " in h.backend_received(1)
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", index=1)
    assert h.client_received().endswith(b"\r\n\r\nok")
    assert b"SMUGGLED" not in h.client_received()


def test_backend_addresses_need_no_resolver() -> None:
    """
    An IP address in --backend is connected to directly (no getaddrinfo in a
    thread, and a refused connection reported at once, not at
    HostnameEndpoint's next attempt); a name goes through HostnameEndpoint.
    """
    from twisted.internet.endpoints import (
        HostnameEndpoint,
        TCP4ClientEndpoint,
        TCP6ClientEndpoint,
        UNIXClientEndpoint,
    )
    from twisted.internet.testing import MemoryReactorClock

    from mtlsproxy.config import parse_backend
    from mtlsproxy.http.backend import backend_endpoint

    reactor = MemoryReactorClock()
    kinds = {
        url: type(backend_endpoint(reactor, parse_backend(url), 5.0))
        for url in ("http://127.0.0.1:8080", "http://[::1]:8080", "http://app.internal:80",
                    "unix:/run/app.sock")
    }
    assert kinds == {
        "http://127.0.0.1:8080": TCP4ClientEndpoint,
        "http://[::1]:8080": TCP6ClientEndpoint,
        "http://app.internal:80": HostnameEndpoint,
        "unix:/run/app.sock": UNIXClientEndpoint,
    }
    endpoint = backend_endpoint(reactor, parse_backend("http://[::1]:8080"), 5.0)
    endpoint.connect(Factory())
    host, port, _factory, timeout, _bind = reactor.tcpClients[-1]
    assert (host, port, timeout) == ("::1", 8080, 5.0)


def test_idle_pooled_connections_close_after_the_pool_idle_timeout(
    client_cert: Any,
) -> None:
    """
    A pooled connection idle for POOL_IDLE_TIMEOUT is closed by the proxy;
    one used again in the meantime is kept, its idle time counted afresh.
    """
    from mtlsproxy.http.backend import POOL_IDLE_TIMEOUT

    h = Harness(client_cert)
    h.send(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    first = h.backend
    h.clock.advance(POOL_IDLE_TIMEOUT / 2)
    h.send(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert len(h.endpoint.connections) == 1  # reused, not timed out
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    h.clock.advance(POOL_IDLE_TIMEOUT - 1)
    assert not first.transport.disconnecting  # idle for less than the timeout since /2
    h.clock.advance(1)
    assert first.transport.disconnecting
    assert not h.pool._idle
    assert all(call.func != h.pool._close_expired for call in h.clock.getDelayedCalls())


def test_pool_sweep_closes_oldest_first_with_one_timer() -> None:
    """
    Connections released 10 s apart close 10 s apart, oldest first, with one
    pending timer at a time (not one per request).
    """
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from mtlsproxy.config import Backend
    from mtlsproxy.http.backend import POOL_IDLE_TIMEOUT, BackendConnection, BackendPool

    clock = Clock()
    pool = BackendPool(clock, Backend(url="http://127.0.0.1:80", host="127.0.0.1", port=80), 5.0)
    conns = []
    for _ in range(3):
        conn = BackendConnection(pool)
        conn.makeConnection(StringTransport())
        conn.reusable = True
        conns.append(conn)
    for conn in conns:
        pool.release(conn)
        clock.advance(10)

    def sweeps() -> int:
        return sum(1 for c in clock.getDelayedCalls() if c.func == pool._close_expired)

    assert sweeps() == 1
    clock.advance(POOL_IDLE_TIMEOUT - 30)  # the first was released 30 s ago
    assert [c.transport.disconnecting for c in conns] == [True, False, False]
    assert sweeps() == 1
    clock.advance(10)
    assert [c.transport.disconnecting for c in conns] == [True, True, False]
    clock.advance(10)
    assert all(c.transport.disconnecting for c in conns)
    assert sweeps() == 0
