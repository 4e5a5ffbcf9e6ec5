"""
Protocol upgrades (WebSocket) in memory: the upgrade request forwarded with
its Upgrade, the 101 relayed, then raw bytes both ways with backpressure.

Same transports as test_forwarding.py (its Harness): no TLS here, the
end-to-end test tests/e2e/test_websocket.py runs a real WebSocket through
the daemon.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import error
from twisted.python.failure import Failure

from .test_forwarding import Harness, head_lines

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: keep-alive, Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nX-Client-Cert-CN: admin\r\n\r\n"
)
SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


def switched(h: Harness, first: bytes = b"", rest: bytes = b"") -> None:
    """Send the upgrade request (with C{first} right after its head) and answer 101 + C{rest}."""
    h.send(UPGRADE + first)
    h.respond(SWITCH + rest)


def test_upgrade_request_is_forwarded_with_upgrade_and_identity(client_cert: Any) -> None:
    """
    Connection: upgrade and the client's Upgrade reach the backend (not its
    other Connection options), with the identity and X-Forwarded headers,
    and the client's own X-Client-Cert-CN is dropped as for any request.
    """
    h = Harness(client_cert)
    h.send(UPGRADE)
    lines = head_lines(h.backend_received())
    assert lines[0] == b"GET /ws HTTP/1.1"
    assert b"Connection: upgrade" in lines
    assert b"Upgrade: websocket" in lines
    assert b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==" in lines
    assert [line for line in lines if line.lower().startswith(b"connection")] == [
        b"Connection: upgrade"
    ]
    assert [line for line in lines if line.lower().startswith(b"x-client-cert")] == [
        b"X-Client-Cert-CN: alice"
    ]
    assert b"X-Forwarded-For: 192.0.2.7" in lines


@pytest.mark.parametrize(
    "value", [b"web socket", b"websocket/", b"a/b/c", b"ws\x7f", b"web(socket)", b",,"]
)
def test_invalid_upgrade_value_gets_400(client_cert: Any, value: bytes) -> None:
    """Only RFC 9110 protocol names are forwarded: anything else is refused, nothing sent."""
    h = Harness(client_cert)
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: " + value + b"\r\n\r\n")
    assert h.client_received().startswith(b"HTTP/1.1 400 ")
    assert h.endpoint.connections == []


def test_websocket_is_forwarded_as_one_checked_list(client_cert: Any) -> None:
    h = Harness(client_cert)
    h.send(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n"
        b"Upgrade:  ,WebSocket\r\nUpgrade: websocket \r\n\r\n"
    )
    assert b"Upgrade: WebSocket, websocket" in head_lines(h.backend_received())


@pytest.mark.parametrize(
    "value", [b"h2c", b"websocket, h2c", b"h2c, websocket", b"foo/2", b"TLS/1.2"]
)
def test_upgrades_other_than_websocket_get_400(client_cert: Any, value: bytes) -> None:
    """
    h2c above all: a backend that accepts it would read HTTP/2 requests
    straight from the client, past access rules and identity headers.
    """
    h = Harness(client_cert)
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: " + value + b"\r\n\r\n")
    received = h.client_received()
    assert received.startswith(b"HTTP/1.1 400 ")
    assert b"is not proxied" in received
    assert h.endpoint.connections == []


def test_upgrade_with_body_still_gets_400(client_cert: Any) -> None:
    h = Harness(client_cert)
    h.send(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 3\r\n\r\nabc"
    )
    assert h.client_received().startswith(b"HTTP/1.1 400 ")
    assert b"Upgrade request with a body" in h.client_received()
    assert h.endpoint.connections == []


def test_101_is_relayed_and_bytes_flow_both_ways(client_cert: Any, access_lines: Any) -> None:
    """
    The 101 head reaches the client with Upgrade, Connection and
    Sec-WebSocket-Accept; bytes the client sent right after its head (in the
    same read and in a later one) and the backend sent with its 101 are
    passed on, then whatever either side sends.
    """
    h = Harness(client_cert)
    h.send(UPGRADE + b"\x81\x85first")
    h.send(b"-second")  # read before the backend answered
    assert h.backend_received().endswith(b"\r\n\r\n")  # held until the 101
    h.respond(SWITCH + b"\x81\x05hello")
    out = h.client_received()
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 101 Switching Protocols"
    assert b"Upgrade: websocket" in lines and b"Connection: upgrade" in lines
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in lines
    assert body == b"\x81\x05hello"
    assert h.backend_received().endswith(b"\r\n\r\n\x81\x85first-second")
    h.send(b"GET / HTTP/1.1\r\n\r\n")  # no longer HTTP: passed on as is
    assert h.backend_received().endswith(b"first-secondGET / HTTP/1.1\r\n\r\n")
    h.respond(b"more")
    assert h.client_received().endswith(b"hellomore")
    assert access_lines == []  # logged once, when the tunnel ends
    h.backend.connectionLost(Failure(error.ConnectionDone()))
    assert h.transport.disconnecting
    assert len(access_lines) == 1 and '"GET /ws HTTP/1.1" 101 11 ' in access_lines[0]


def test_tunnel_backpressure_both_ways(client_cert: Any) -> None:
    """A client that cannot take more pauses the backend's reading, and the reverse."""
    h = Harness(client_cert)
    switched(h)
    backend_transport = h.backend.transport
    h.transport.producer.pauseProducing()
    assert backend_transport.producerState == "paused"
    h.transport.producer.resumeProducing()
    assert backend_transport.producerState == "producing"
    backend_transport.producer.pauseProducing()
    assert h.transport.producerState == "paused"
    backend_transport.producer.resumeProducing()
    assert h.transport.producerState == "producing"


def test_non_101_answer_is_relayed_then_the_connection_closes(client_cert: Any) -> None:
    """A backend that declines the upgrade: its answer is relayed, then both connections end."""
    h = Harness(client_cert)
    h.send(UPGRADE + b"\x81\x80")
    h.respond(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 4\r\n\r\nnope")
    out = h.client_received()
    assert out.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"Connection: close\r\n" in out and out.endswith(b"nope")
    assert h.transport.disconnecting
    assert len(h.pool._idle) == 0
    assert h.backend.transport.disconnecting
    assert not h.backend_received().endswith(b"\x81\x80")  # held bytes never sent


def test_unasked_101_is_still_502(client_cert: Any) -> None:
    h = Harness(client_cert)
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.respond(SWITCH)
    assert h.client_received().startswith(b"HTTP/1.1 502 ")


def test_101_without_upgrade_header_is_502(client_cert: Any) -> None:
    h = Harness(client_cert)
    h.send(UPGRADE)
    h.respond(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    assert h.client_received().startswith(b"HTTP/1.1 502 ")


@pytest.mark.parametrize("protocol", [b"h2c", b"websocket, h2c", b"foo"])
def test_101_to_a_protocol_not_asked_for_is_502(client_cert: Any, protocol: bytes) -> None:
    """RFC 9110 7.8: the backend may only switch to what the client asked for (websocket)."""
    h = Harness(client_cert)
    h.send(UPGRADE)
    h.respond(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: " + protocol
        + b"\r\nConnection: Upgrade\r\n\r\nPRI * HTTP/2.0"
    )
    received = h.client_received()
    assert received.startswith(b"HTTP/1.1 502 ")
    assert b"PRI" not in received
    assert h.backend.transport.disconnecting


def test_pooled_connection_serves_an_upgrade_and_is_never_pooled_again(client_cert: Any) -> None:
    """The upgrade may use a pooled connection; after the tunnel the pool holds none."""
    h = Harness(client_cert)
    h.send(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert len(h.pool._idle) == 1
    h.transport.clear()
    switched(h)
    assert len(h.endpoint.connections) == 1  # the pooled one
    assert len(h.pool._idle) == 0
    h.client.connectionLost(Failure(error.ConnectionDone()))
    assert h.backend.transport.disconnecting
    assert len(h.pool._idle) == 0


def test_client_closing_the_tunnel_closes_the_backend(
    client_cert: Any, access_lines: Any
) -> None:
    h = Harness(client_cert)
    switched(h, rest=b"abc")
    h.client.connectionLost(Failure(error.ConnectionDone()))
    assert h.backend.transport.disconnecting
    assert len(access_lines) == 1 and " 101 3 " in access_lines[0]


def test_idle_tunnel_closes_both_sides(client_cert: Any) -> None:
    """--idle-timeout (60 s here) without a byte either way ends the tunnel; traffic defers it."""
    h = Harness(client_cert)
    switched(h)
    h.clock.advance(50)
    h.send(b"ping")
    h.clock.advance(50)
    assert not h.transport.disconnecting and not h.backend.transport.disconnecting
    h.respond(b"pong")
    h.clock.advance(59)
    assert not h.transport.disconnecting
    h.clock.advance(2)
    assert h.transport.disconnecting
    assert h.backend.transport.disconnecting


def test_tunnel_counts_as_in_flight(client_cert: Any) -> None:
    """Graceful stop leaves connections with a request in flight to the deadline: so a tunnel."""
    h = Harness(client_cert)
    switched(h)
    assert h.client.current is not None
    assert h.client in h.factory.connections


def test_upgrade_without_connection_upgrade_is_a_plain_request(client_cert: Any) -> None:
    """Upgrade alone (no Connection: upgrade) is dropped per hop, the request stays HTTP."""
    h = Harness(client_cert)
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n")
    assert b"upgrade" not in h.backend_received().lower()
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert not h.transport.disconnecting


def test_graceful_stop_closes_a_tunnel_at_the_deadline_only(client_cert: Any) -> None:
    """
    A tunnel counts as a request in flight: drain leaves it open until
    --shutdown-timeout, then aborts it, which closes the backend side too.
    """
    from mtlsproxy.shutdown import drain

    h = Harness(client_cert)
    switched(h)
    done = drain(h.factory, h.clock, 10.0)
    h.clock.advance(9)
    assert not h.transport.disconnecting
    h.send(b"still")
    assert h.backend_received().endswith(b"still")
    h.clock.advance(2)
    assert h.transport.disconnecting  # aborted at the deadline
    h.client.connectionLost(Failure(error.ConnectionLost()))
    assert h.backend.transport.disconnecting
    results: list[Any] = []
    done.addCallback(results.append)
    assert results and results[0].interrupted == 1


def test_upgrade_pipelined_behind_a_request_waits_its_turn(client_cert: Any) -> None:
    """An upgrade request queued behind another is forwarded once that one is answered."""
    h = Harness(client_cert)
    h.send(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n" + UPGRADE + b"early")
    assert b"/ws" not in h.backend_received()
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert h.client_received().endswith(b"\r\n\r\nok")
    assert b"Connection: close" not in h.client_received()
    assert h.backend_received().endswith(b"Upgrade: websocket\r\n\r\n")
    h.respond(SWITCH + b"srv")
    assert h.backend_received().endswith(b"\r\n\r\nearly")
    assert h.client_received().endswith(b"\r\n\r\nsrv")
