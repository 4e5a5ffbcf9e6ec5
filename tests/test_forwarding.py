"""
The forwarding core in memory: client bytes in, backend bytes out, and back.

TLS is not part of these tests (it has its own, with real handshakes, in
test_tls.py, and the end-to-end suite runs everything together): the client
transport here is a StringTransport that also hands out the verified peer
certificate, as the TLS transport does once the handshake is complete.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from OpenSSL import crypto
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mtlsproxy.config import Backend
from mtlsproxy.http.backend import BackendPool
from mtlsproxy.http.server import ClientConnection, ProxyFactory, ProxySettings

SETTINGS = ProxySettings(
    handshake_timeout=10,
    idle_timeout=60,
    backend_timeout=30,
    max_header_bytes=4096,
    client_auth_required=True,
)


class _Handle:
    """Answers like a pyOpenSSL connection after a verified handshake."""

    def __init__(self, cert: Any) -> None:
        self.cert = cert

    def get_peer_certificate(self, as_cryptography: bool = False) -> Any:
        if as_cryptography:
            return self.cert
        return crypto.X509.from_cryptography(self.cert)

    def get_verified_chain(self, as_cryptography: bool = False) -> Any:
        return [self.get_peer_certificate(as_cryptography)]

    def client_random(self) -> bytes | None:
        return None  # as before a ClientHello

    def get_servername(self) -> bytes | None:
        return None  # no SNI


class ClientTransport(StringTransport):
    """A client transport that also answers C{getHandle()} like the TLS one."""

    def __init__(self, cert: Any) -> None:
        super().__init__(
            hostAddress=IPv4Address("TCP", "10.0.0.1", 443),
            peerAddress=IPv4Address("TCP", "192.0.2.7", 50123),
        )
        self._handle = _Handle(cert)

    def getHandle(self) -> _Handle:
        return self._handle

    def abortConnection(self) -> None:
        self.loseConnection()


class FakeEndpoint:
    """Connects backend protocols to StringTransports, or fails, as the test says."""

    def __init__(self) -> None:
        self.connections: list[Any] = []
        self.fail_with: Exception | None = None
        self.hold = False
        self.pending: list[tuple[defer.Deferred[Any], Any]] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if self.fail_with is not None:
            return defer.fail(self.fail_with)
        proto = factory.buildProtocol(None)
        if self.hold:
            d: defer.Deferred[Any] = defer.Deferred()
            self.pending.append((d, proto))
            return d
        self._attach(proto)
        return defer.succeed(proto)

    def _attach(self, proto: Any) -> None:
        transport = StringTransport()
        proto.makeConnection(transport)
        self.connections.append(proto)

    def release(self) -> None:
        for d, proto in self.pending:
            self._attach(proto)
            d.callback(proto)
        self.pending = []


class Harness:
    def __init__(self, cert: Any, settings: ProxySettings = SETTINGS) -> None:
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.pool = BackendPool(
            self.clock, Backend(url="http://app:80", host="app", port=80), 5.0,
            endpoint=self.endpoint,  # type: ignore[arg-type]
        )
        self.factory = ProxyFactory(settings, self.pool, self.clock)
        self.client = ClientConnection(self.factory)
        self.transport = ClientTransport(cert)
        self.client.makeConnection(self.transport)
        self.client.handshakeCompleted()

    def send(self, data: bytes) -> None:
        self.client.dataReceived(data)

    @property
    def backend(self) -> Any:
        return self.endpoint.connections[-1]

    def backend_received(self, index: int = -1) -> bytes:
        return self.endpoint.connections[index].transport.value()  # type: ignore[no-any-return]

    def respond(self, data: bytes, index: int = -1) -> None:
        self.endpoint.connections[index].dataReceived(data)

    def client_received(self) -> bytes:
        return self.transport.value()  # type: ignore[no-any-return]


def head_lines(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def test_get_is_forwarded_with_identity_and_forwarding_headers(client_cert: Any) -> None:
    """
    A GET reaches the backend as HTTP/1.1 with method, raw target and Host unchanged,
    exactly one X-Client-Cert-CN, and the X-Forwarded-* headers set by the proxy.
    """
    h = Harness(client_cert)
    h.send(b"GET /a%2Fb/../c?x=1&y HTTP/1.1\r\nHost: app.example:8443\r\nAccept: */*\r\n\r\n")
    lines = head_lines(h.backend_received())
    assert lines[0] == b"GET /a%2Fb/../c?x=1&y HTTP/1.1"
    assert b"Host: app.example:8443" in lines
    assert b"Accept: */*" in lines
    assert [line for line in lines if line.lower().startswith(b"x-client-cert")] == [
        b"X-Client-Cert-CN: alice"
    ]
    assert b"X-Forwarded-For: 192.0.2.7" in lines
    assert b"X-Forwarded-Proto: https" in lines
    assert b"X-Forwarded-Host: app.example:8443" in lines


def test_response_is_relayed_and_connections_kept_alive(client_cert: Any) -> None:
    """
    The response comes back with its status, headers and body; both the client
    connection and the backend connection stay open for the next request, which
    reuses the same backend connection.
    """
    h = Harness(client_cert)
    h.send(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-App: yes\r\n\r\nhello")
    out = h.client_received()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"X-App: yes\r\n" in out and b"Content-Length: 5\r\n" in out
    assert out.endswith(b"\r\n\r\nhello")
    assert not h.transport.disconnecting
    h.transport.clear()
    h.send(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert len(h.endpoint.connections) == 1
    assert b"GET /2 HTTP/1.1" in h.backend_received()
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert h.client_received().endswith(b"ok")


SPOOFS = [
    b"X-Client-Cert-CN: admin",
    b"x-client-cert-cn: admin",
    b"X_Client_Cert_CN: admin",
    b"X-CLIENT-CERT-CN: admin",
    b"X-Client-Cert: admin",
    b"X-Client-Cert-Subject: CN=admin",
    b"X-Forwarded-Client-Cert: By=admin",
    b"X-Forwarded-For: 10.0.0.1",
    b"x_forwarded_for: 10.0.0.1",
    b"X-Forwarded-Proto: http",
    b"X-Forwarded-Host: evil",
    b"Forwarded: for=10.0.0.1",
]


@pytest.mark.parametrize("spoof", SPOOFS)
def test_spoofed_identity_headers_never_reach_the_backend(client_cert: Any, spoof: bytes) -> None:
    """Every client-sent reserved header is dropped, whatever its case or separator."""
    h = Harness(client_cert)
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\n" + spoof + b"\r\n\r\n")
    received = h.backend_received()
    assert b"admin" not in received and b"10.0.0.1" not in received and b"evil" not in received
    assert head_lines(received).count(b"X-Client-Cert-CN: alice") == 1


def test_connection_header_cannot_remove_the_identity_header(client_cert: Any) -> None:
    """
    Naming X-Client-Cert-CN or X-Forwarded-For in Connection removes only what
    the client sent: the proxy's own headers still reach the backend.
    """
    h = Harness(client_cert)
    h.send(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: X-Client-Cert-CN, X-Forwarded-For, X-Custom\r\n"
        b"X-Custom: gone\r\n\r\n"
    )
    lines = head_lines(h.backend_received())
    assert b"X-Client-Cert-CN: alice" in lines
    assert b"X-Forwarded-For: 192.0.2.7" in lines
    assert not [line for line in lines if line.lower().startswith((b"x-custom", b"connection"))]


def test_hop_by_hop_headers_are_not_forwarded(client_cert: Any) -> None:
    """Keep-Alive, TE, Trailer, Upgrade and Proxy-* headers are per hop."""
    h = Harness(client_cert)
    h.send(
        b"GET / HTTP/1.1\r\nHost: a\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
        b"Proxy-Authorization: x\r\nProxy-Connection: keep-alive\r\nTrailer: X\r\n\r\n"
    )
    lower = h.backend_received().lower()
    for name in (b"keep-alive:", b"te:", b"proxy-", b"trailer:"):
        assert name not in lower


def test_content_length_body_streams_to_the_backend(client_cert: Any) -> None:
    """Body bytes are written to the backend as they arrive, before the body is complete."""
    h = Harness(client_cert)
    h.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
    assert h.backend_received().endswith(b"Content-Length: 10\r\n\r\nhello")
    h.send(b"world")
    assert h.backend_received().endswith(b"helloworld")


def test_chunked_body_is_rechunked_canonically(client_cert: Any) -> None:
    """A chunked upload with extensions reaches the backend chunked, without the extensions."""
    h = Harness(client_cert)
    h.send(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n0\r\n\r\n"
    )
    received = h.backend_received()
    assert b"Transfer-Encoding: chunked\r\n" in received
    assert received.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert b"ext" not in received


def test_close_delimited_response_is_chunked_for_http11_clients(client_cert: Any) -> None:
    """
    A backend body that ends with the connection reaches an HTTP/1.1 client
    chunked, so the client connection can stay open.
    """
    h = Harness(client_cert)
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.respond(b"HTTP/1.0 200 OK\r\n\r\nsome ")
    h.respond(b"data")
    h.backend.connectionLost(Failure(error.ConnectionDone()))
    out = h.client_received()
    assert b"Transfer-Encoding: chunked\r\n" in out
    assert out.endswith(b"5\r\nsome \r\n4\r\ndata\r\n0\r\n\r\n")
    assert not h.transport.disconnecting


def test_http10_keep_alive_is_honoured(client_cert: Any) -> None:
    """
    An HTTP/1.0 client asking for keep-alive (as ab -k does) gets
    Connection: keep-alive and its connection stays open.
    """
    h = Harness(client_cert)
    h.send(b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    out = h.client_received()
    assert b"Connection: keep-alive\r\n" in out
    assert not h.transport.disconnecting


def test_http10_without_length_is_closed_after_the_body(client_cert: Any) -> None:
    """An HTTP/1.0 client cannot read chunked: the body ends with the connection."""
    h = Harness(client_cert)
    h.send(b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
    h.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    out = h.client_received()
    assert b"chunked" not in out and out.endswith(b"\r\n\r\nok")
    assert h.transport.disconnecting


def test_head_response_has_no_body_and_connection_is_reused(client_cert: Any) -> None:
    """A HEAD response keeps the backend's Content-Length and carries no body."""
    h = Harness(client_cert)
    h.send(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    out = h.client_received()
    assert out.endswith(b"Content-Length: 1000\r\n\r\n")
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert len(h.endpoint.connections) == 1
    assert h.backend_received().count(b"GET / HTTP/1.1\r\n") == 1


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(client_cert: Any, status: int) -> None:
    """204 and 304 responses are complete after their headers."""
    h = Harness(client_cert)
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.respond(b"HTTP/1.1 %d X\r\n\r\n" % status)
    out = h.client_received()
    assert out.startswith(b"HTTP/1.1 %d" % status)
    assert b"chunked" not in out and out.endswith(b"\r\n\r\n")
    assert h.client.current is None


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ],
    ids=["cl+te", "two-cl", "te-not-chunked", "te-in-1.0", "http0.9", "bare-lf", "obs-fold",
         "space-before-colon", "no-host", "two-hosts"],
)
def test_ambiguous_framing_gets_400_and_nothing_is_forwarded(
    client_cert: Any, request_bytes: bytes
) -> None:
    """Malformed or ambiguous requests are answered 400, the connection closes, no backend."""
    h = Harness(client_cert)
    h.send(request_bytes)
    assert h.client_received().startswith(b"HTTP/1.1 400 ")
    assert h.transport.disconnecting
    assert h.endpoint.connections == []


def test_headers_above_the_limit_get_431(client_cert: Any) -> None:
    """Request line plus headers over --max-header-bytes: 431, closed, nothing forwarded."""
    h = Harness(client_cert)
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 5000 + b"\r\n\r\n")
    assert h.client_received().startswith(b"HTTP/1.1 431 ")
    assert h.transport.disconnecting
    assert h.endpoint.connections == []


def test_pipelined_requests_are_answered_in_order(client_cert: Any) -> None:
    """Two requests in one read: the second waits for the first and is answered after it."""
    h = Harness(client_cert)
    h.send(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert b"GET /2" not in h.backend_received()
    assert h.transport.producerState == "paused"
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
    assert b"GET /2" in h.backend_received()
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
    out = h.client_received()
    assert out.index(b"one") < out.index(b"two")
    assert h.transport.producerState == "producing"


def test_backend_refusing_gets_502(client_cert: Any) -> None:
    """A backend that refuses the connection: 502, and the client connection stays usable."""
    h = Harness(client_cert)
    h.endpoint.fail_with = error.ConnectionRefusedError()
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.client_received().startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"refused" in h.client_received()
    assert not h.transport.disconnecting


def test_body_held_while_connecting_does_not_leave_reading_paused(client_cert: Any) -> None:
    """
    A body that arrives while the backend connection is being made pauses
    reading; when that connection fails (502), reading resumes: before, the
    connection was never read again and leaked (found by the load test).
    """
    h = Harness(client_cert)
    h.endpoint.hold = True
    h.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    assert h.transport.producerState == "paused"
    connecting, _ = h.endpoint.pending.pop()
    connecting.errback(error.ConnectionRefusedError())
    assert h.client_received().startswith(b"HTTP/1.1 502 ")
    assert h.transport.producerState == "producing"


@pytest.mark.parametrize("bad", [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"])
def test_refused_request_closes_with_reading_on_and_a_deadline(
    client_cert: Any, bad: bytes
) -> None:
    """
    After the proxy's own 400 the connection closes with reading resumed, so
    that the client's close_notify and FIN are seen; a client that never
    closes is aborted after --idle-timeout. Before, every 400 leaked its
    connection (reading stayed paused, no timer).
    """
    h = Harness(client_cert)
    aborted: list[bool] = []
    h.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    h.send(bad)
    assert h.client_received().startswith(b"HTTP/1.1 400 ")
    assert h.transport.disconnecting
    assert h.transport.producerState == "producing"
    h.clock.advance(SETTINGS.idle_timeout - 1)
    assert aborted == []
    h.clock.advance(1)
    assert aborted == [True]


def test_backend_silence_gets_504(client_cert: Any) -> None:
    """No response headers within --backend-timeout: 504, and the backend connection is dropped."""
    h = Harness(client_cert)
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.clock.advance(SETTINGS.backend_timeout + 1)
    assert h.client_received().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert h.backend.transport.disconnecting


def test_backend_closing_mid_response_aborts_the_client(client_cert: Any) -> None:
    """A truncated backend response must not look complete: the client connection is cut."""
    h = Harness(client_cert)
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    h.backend.connectionLost(Failure(error.ConnectionLost()))
    assert h.transport.disconnecting


def test_stale_pooled_connection_is_retried_once_for_a_get(client_cert: Any) -> None:
    """
    A pooled connection that the backend closed as it was reused: the GET
    never reached the application, so it is sent again on a new connection.
    """
    h = Harness(client_cert)
    h.send(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    h.transport.clear()
    h.send(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    h.endpoint.connections[0].connectionLost(Failure(error.ConnectionDone()))
    assert len(h.endpoint.connections) == 2
    assert b"GET /2" in h.backend_received(1)
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 1)
    assert h.client_received().endswith(b"ok")


def test_slow_backend_pauses_the_client(client_cert: Any) -> None:
    """
    When the backend transport's buffer is full it pauses its producer, and the
    proxy stops reading from the client until it drains.
    """
    h = Harness(client_cert)
    h.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nxx")
    backend_transport = h.backend.transport
    backend_transport.producer.pauseProducing()
    assert h.transport.producerState == "paused"
    backend_transport.producer.resumeProducing()
    assert h.transport.producerState == "producing"


def test_slow_client_pauses_the_backend(client_cert: Any) -> None:
    """When the client's transport pauses its producer, reading from the backend stops."""
    h = Harness(client_cert)
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nxx")
    h.transport.producer.pauseProducing()
    assert h.backend.transport.producerState == "paused"
    h.transport.producer.resumeProducing()
    assert h.backend.transport.producerState == "producing"


def test_body_arriving_while_connecting_is_held_and_reading_paused(client_cert: Any) -> None:
    """Before the backend connection exists, body bytes wait and the client is paused."""
    h = Harness(client_cert)
    h.endpoint.hold = True
    h.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
    assert h.transport.producerState == "paused"
    h.endpoint.release()
    assert h.backend_received().endswith(b"\r\n\r\nab")
    assert h.transport.producerState == "producing"
    h.send(b"cd")
    assert h.backend_received().endswith(b"abcd")


def test_expect_100_continue_is_answered_by_the_proxy(client_cert: Any) -> None:
    """The proxy answers 100 Continue itself and does not forward Expect."""
    h = Harness(client_cert)
    h.send(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert h.client_received() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert b"expect" not in h.backend_received().lower()


def test_idle_client_is_closed_after_idle_timeout(client_cert: Any) -> None:
    """A client that sends nothing for --idle-timeout seconds is disconnected."""
    h = Harness(client_cert)
    h.clock.advance(SETTINGS.idle_timeout + 1)
    assert h.transport.disconnecting


def test_idle_timeout_counts_from_the_last_response(client_cert: Any) -> None:
    """
    The idle timer is not made anew per request: when the first one fires
    after a later request, it moves on, and the connection closes exactly
    --idle-timeout after the last response, never during a request.
    """
    h = Harness(client_cert)
    idle = SETTINGS.idle_timeout
    h.clock.advance(idle - 10)
    h.send(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    h.clock.advance(20)  # the handshake's idle timer fires while /1 is in flight
    assert not h.transport.disconnecting
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    h.clock.advance(idle - 1)
    assert not h.transport.disconnecting
    h.send(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    h.clock.advance(idle - 1)  # a timer armed after /1 fires here and moves on
    assert not h.transport.disconnecting
    h.clock.advance(1)
    assert h.transport.disconnecting
    assert len(h.clock.getDelayedCalls()) <= 2  # no pile of stale timers


def test_slow_headers_get_408(client_cert: Any) -> None:
    """A client that starts a request but does not finish its headers in time gets 408."""
    h = Harness(client_cert)
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\n")
    h.clock.advance(SETTINGS.idle_timeout + 1)
    assert h.client_received().startswith(b"HTTP/1.1 408 ")
    assert h.transport.disconnecting


def test_more_than_max_headers_get_431(client_cert: Any) -> None:
    """More than 100 header lines (HAProxy's limit too) get 431, even when small."""
    h = Harness(client_cert)
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 100 + b"\r\n")
    assert h.client_received().startswith(b"HTTP/1.1 431 ")
    assert h.endpoint.connections == []


def test_stalled_request_body_gets_408(client_cert: Any) -> None:
    """
    A client that stops sending its announced body for --idle-timeout seconds
    (slow POST) gets 408 and the backend connection is dropped.
    """
    h = Harness(client_cert)
    h.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nstart")
    h.clock.advance(SETTINGS.idle_timeout - 1)
    h.send(b"more")  # progress resets the clock
    h.clock.advance(SETTINGS.idle_timeout - 1)
    assert h.client_received() == b""
    h.clock.advance(2)
    assert h.client_received().startswith(b"HTTP/1.1 408 ")
    assert h.backend.transport.disconnecting
    assert h.transport.disconnecting


def test_body_wait_caused_by_the_backend_is_not_a_stall(client_cert: Any) -> None:
    """While the proxy itself stops reading (backend full), the client is not timed out."""
    h = Harness(client_cert)
    h.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nstart")
    h.backend.transport.producer.pauseProducing()
    h.clock.advance(SETTINGS.idle_timeout * 3)
    assert h.client_received() == b""
    assert not h.transport.disconnecting


def test_client_that_stops_reading_is_dropped(client_cert: Any) -> None:
    """
    A client whose transport stays paused (it reads nothing) for
    --idle-timeout seconds is aborted along with the backend connection.
    """
    h = Harness(client_cert)
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\nxx")
    h.transport.producer.pauseProducing()
    h.clock.advance(SETTINGS.idle_timeout - 1)
    assert not h.transport.disconnecting
    h.transport.producer.resumeProducing()
    h.transport.producer.pauseProducing()
    h.clock.advance(SETTINGS.idle_timeout - 1)
    assert not h.transport.disconnecting
    h.clock.advance(2)
    assert h.transport.disconnecting
    assert h.backend.transport.disconnecting


class Port:
    """The listening port as ProxyFactory sees it: accepting or not."""

    reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def _with_max_connections(limit: int) -> ProxySettings:
    return dataclasses.replace(SETTINGS, max_connections=limit)


def test_max_connections_pauses_accepting(client_cert: Any) -> None:
    """At --max-connections open clients the listening port stops accepting; below, it resumes."""
    settings = _with_max_connections(2)

    first = Harness(client_cert, settings)
    factory = first.factory
    factory.port = port = Port()
    second = ClientConnection(factory)
    second.makeConnection(ClientTransport(client_cert))
    assert not port.reading
    second.connectionLost(Failure(error.ConnectionDone()))
    assert port.reading


def test_at_max_connections_the_oldest_unfinished_handshake_gives_way(
    client_cert: Any,
) -> None:
    """
    Clients that connect and never finish their handshake cannot hold every
    slot: at --max-connections the oldest unfinished handshake is dropped
    (and logged as refused) instead of accepting pausing; verified clients
    are never dropped, and with no handshake left to drop accepting pauses.
    """
    settings = _with_max_connections(3)

    verified = Harness(client_cert, settings)
    factory = verified.factory
    factory.port = port = Port()

    def connect() -> tuple[ClientConnection, ClientTransport]:
        conn, transport = ClientConnection(factory), ClientTransport(client_cert)
        conn.makeConnection(transport)
        return conn, transport

    (stalled, stalled_t), (later, later_t) = connect(), connect()
    assert stalled_t.disconnecting and not later_t.disconnecting and port.reading
    stalled.connectionLost(Failure(error.ConnectionAborted()))
    assert list(factory.handshaking) == [later]
    later.handshakeCompleted()
    assert factory.handshaking == {}
    third, third_t = connect()
    assert not third_t.disconnecting and not verified.transport.disconnecting
    assert not port.reading  # nothing left to give way: accepting pauses


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: local host\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: localhost/admin\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: user@localhost\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: localhost:http\r\n\r\n",
        b"GET http://user@other.example/x HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"CONNECT localhost:22 HTTP/1.1\r\nHost: localhost:22\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent_Length: 5\r\nContent-Length: 0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["host-space", "host-path", "host-userinfo", "host-port-name",
         "absolute-form-userinfo", "connect", "upgrade-with-body", "underscore-cl",
         "underscore-te"],
)
def test_requests_the_backend_could_read_differently_get_400(
    client_cert: Any, request_bytes: bytes
) -> None:
    """
    Requests whose routing or framing a backend might read otherwise than the
    proxy (no or invalid Host or target authority, CONNECT, an
    Upgrade with a body, framing fields spelled with '_') get 400, nothing forwarded.
    """
    h = Harness(client_cert)
    h.send(request_bytes)
    assert h.client_received().startswith(b"HTTP/1.1 400 ")
    assert h.endpoint.connections == []


def test_trailers_never_become_headers_of_a_pipelined_request(client_cert: Any) -> None:
    """Trailer fields of a queued chunked request are not added to its forwarded head."""
    h = Harness(client_cert)
    h.send(
        b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /second HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\nHost: evil\r\nX-Trailer: yes\r\n\r\n"
    )
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    second = h.backend_received().split(b"POST /second", 1)[1]
    assert b"evil" not in second and b"X-Trailer" not in second


def test_client_content_length_is_replaced_by_a_canonical_one(client_cert: Any) -> None:
    """Content-Length: 005 reaches the backend as exactly one Content-Length: 5."""
    h = Harness(client_cert)
    h.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 005\r\n\r\nhello")
    head = h.backend_received().split(b"\r\n\r\n", 1)[0]
    assert [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")] == [
        b"Content-Length: 5"
    ]


def test_nothing_after_connection_close_is_forwarded(client_cert: Any) -> None:
    """
    Once the proxy has answered with Connection: close (here: the backend
    answered before the body was complete), a request the client sends
    afterwards on that connection never reaches the backend (RFC 9112 9.6).
    """
    h = Harness(client_cert)
    h.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert b"Connection: close" in h.client_received()
    h.send(b"lo" + b"POST /after HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert all(b"/after" not in c.transport.value() for c in h.endpoint.connections)


def test_absolute_form_authority_becomes_the_host(client_cert: Any) -> None:
    """
    RFC 9112 3.2.2: for an absolute-form target the backend gets the target's
    authority as its one Host (and X-Forwarded-Host), not the client's Host.
    """
    h = Harness(client_cert)
    h.send(b"GET http://other.example/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    lines = head_lines(h.backend_received())
    assert [line for line in lines if line.lower().startswith(b"host:")] == [
        b"Host: other.example"
    ]
    assert b"X-Forwarded-Host: other.example" in lines


def test_http10_without_host_gets_one_generated(client_cert: Any) -> None:
    """
    An HTTP/1.0 request without Host (as openssl s_time -www sends) goes on as
    HTTP/1.1 with the address the client reached as its Host, and no
    X-Forwarded-Host (the client sent none).
    """
    h = Harness(client_cert)
    h.send(b"GET / HTTP/1.0\r\n\r\n")
    lines = head_lines(h.backend_received())
    hosts = [line for line in lines if line.lower().startswith(b"host:")]
    assert hosts == [b"Host: 10.0.0.1:443"]
    assert not [line for line in lines if line.lower().startswith(b"x-forwarded-host")]


OTHER_PROTOCOL_LINES = [
    b"GET / RTSP/1.0\r\nHost: a\r\n\r\n",
    b"DESCRIBE /cam RTSP/1.0\r\nHost: a\r\nCSeq: 1\r\n\r\n",
    b"SOURCE /stream ICE/1.0\r\nHost: a\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", OTHER_PROTOCOL_LINES, ids=["rtsp", "rtsp-method", "ice"])
@pytest.mark.parametrize("split", ["whole", "bytewise", "pipelined"])
def test_rtsp_and_ice_request_lines_get_400(
    client_cert: Any, request_bytes: bytes, split: str
) -> None:
    """
    llhttp accepts RTSP and Icecast request lines and reports only "1.0":
    they are refused however the bytes arrive, one read, a byte per read, or
    behind a well-formed request in the same read.
    """
    h = Harness(client_cert)
    if split == "whole":
        h.send(request_bytes)
    elif split == "bytewise":
        for i in range(len(request_bytes)):
            h.send(request_bytes[i : i + 1])
    else:
        h.send(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n" + request_bytes)
        assert h.client.broken is not None and h.client.broken[0] == 400
        h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    # Behind a request in flight, that request's answer ends the connection
    # (Connection: close) instead of a 400 nobody asked for yet.
    expected = b"HTTP/1.1 200 " if split == "pipelined" else b"HTTP/1.1 400 "
    assert h.client_received().startswith(expected)
    assert h.transport.disconnecting
    forwarded = b"".join(c.transport.value() for c in h.endpoint.connections)
    assert b"/cam" not in forwarded and b"/stream" not in forwarded
    assert forwarded.count(b"GET ") == (1 if split == "pipelined" else 0)


def test_protocol_names_in_bodies_and_headers_are_not_mistaken_for_request_lines(
    client_cert: Any,
) -> None:
    """Only the request line's own protocol is refused: "RTSP/1.0" elsewhere passes."""
    body = b"DESCRIBE /cam RTSP/1.0\r\n"
    h = Harness(client_cert)
    h.send(
        b"POST /upload HTTP/1.1\r\nHost: a\r\nUser-Agent: probe RTSP/1.0 ICE/1.0\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    received = h.backend_received()
    assert received.startswith(b"POST /upload HTTP/1.1\r\n")
    assert received.endswith(body)


# -- extension methods (RFC 9110 9.1: any token) ------------------------------


@pytest.mark.parametrize(
    "method", [b"FOOBAR", b"BREW", b"X-CUSTOM", b"get", b"GETX", b"M!#$%&'*+.^_`|~9"]
)
def test_extension_method_is_forwarded(client_cert: Any, method: bytes) -> None:
    """A method llhttp does not know, but a valid token, reaches the backend unchanged."""
    h = Harness(client_cert)
    h.send(method + b" /x?y HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
    received = h.backend_received()
    assert head_lines(received)[0] == method + b" /x?y HTTP/1.1"
    assert received.endswith(b"\r\n\r\nabc")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert h.client_received().startswith(b"HTTP/1.1 200 OK")


def test_extension_method_split_across_reads(client_cert: Any) -> None:
    """The request line of an extension method arriving a few bytes at a time."""
    h = Harness(client_cert)
    for piece in (b"BR", b"EW /po", b"t HTTP/1.1\r", b"\nHost: a\r\n", b"\r\n"):
        h.send(piece)
    assert head_lines(h.backend_received())[0] == b"BREW /pot HTTP/1.1"


FIRST_REQUESTS = [
    b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nBRE\r\n0\r\n\r\n",
    b"FOOBAR /1 HTTP/1.1\r\nHost: a\r\n\r\n",
]
FIRST_IDS = ["after-get", "after-chunked-body", "after-extension"]


@pytest.mark.parametrize("first", FIRST_REQUESTS, ids=FIRST_IDS)
def test_pipelined_extension_method_in_a_read_of_its_own(client_cert: Any, first: bytes) -> None:
    """
    An extension method pipelined behind another request, beginning a read
    of its own (where it starts is then known), then a GET.
    """
    h = Harness(client_cert)
    h.send(first)
    h.send(b"BREW /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    h.send(b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n")
    for _ in range(3):
        h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    sent = b"".join(c.transport.value() for c in h.endpoint.connections)
    lines = [line for line in sent.split(b"\r\n") if line.endswith(b" HTTP/1.1")]
    assert lines[1:] == [b"BREW /2 HTTP/1.1", b"GET /3 HTTP/1.1"]
    assert h.client_received().count(b"HTTP/1.1 200 OK") == 3


@pytest.mark.parametrize("first", FIRST_REQUESTS, ids=FIRST_IDS)
def test_extension_method_behind_another_in_one_read_gets_400(
    client_cert: Any, first: bytes
) -> None:
    """
    An extension method in the same read right after another request:
    httptools reports no offsets, so where it starts is unknown (and a guess
    could skip bytes).  The first request is answered with Connection: close,
    as before any broken pipelined request; nothing of the second reaches the
    backend.
    """
    h = Harness(client_cert)
    h.send(first + b"BREW /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    sent = b"".join(c.transport.value() for c in h.endpoint.connections)
    assert b"BREW /2" not in sent
    received = h.client_received()
    assert received.startswith(b"HTTP/1.1 200 OK") and b"Connection: close\r\n" in received
    assert received.count(b"HTTP/1.1 ") == 1
    assert h.transport.disconnecting


@pytest.mark.parametrize(
    "junk", [b"\x00\n", b"x\r\n", b"GET\n"], ids=["nul-line", "word-line", "method-only"]
)
def test_junk_before_an_extension_request_line_gets_400(client_cert: Any, junk: bytes) -> None:
    """Nothing ahead of the request line is skipped to find one (only blank lines are)."""
    h = Harness(client_cert)
    h.send(junk + b"BREW / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.client_received().startswith(b"HTTP/1.1 400 ")
    assert h.endpoint.connections == []


def test_blank_lines_before_an_extension_request_are_skipped(client_cert: Any) -> None:
    """As llhttp does for any request (RFC 9112 2.2)."""
    h = Harness(client_cert)
    h.send(b"\r\n\r\nBREW / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head_lines(h.backend_received())[0] == b"BREW / HTTP/1.1"


def test_many_extension_requests_in_one_read(client_cert: Any) -> None:
    """
    Thousands of pipelined extension-method requests in one read: the first
    is forwarded and answered (Connection: close), the rest refused, and
    nothing recurses.
    """
    h = Harness(client_cert)
    h.send(b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n" * 3000)
    assert head_lines(h.backend_received())[0] == b"FOO / HTTP/1.1"
    assert h.backend_received().count(b"FOO /") == 1
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert b"Connection: close\r\n" in h.client_received()
    assert h.transport.disconnecting


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"BRE(W / HTTP/1.1\r\nHost: a\r\n\r\n",
        "BR\u00c9W / HTTP/1.1\r\nHost: a\r\n\r\n".encode(),
        b"BREW / RTSP/1.0\r\nHost: a\r\n\r\n",
        b"BREW  / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"BREW / HTTP/1.1\nHost: a\r\n\r\n",
        b"BREW /\r\nHost: a\r\n\r\n",
        b"\x00BREW / HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
    ids=["paren", "non-ascii", "rtsp", "two-spaces", "bare-lf", "no-version", "nul"],
)
def test_invalid_method_or_line_still_gets_400(client_cert: Any, request_bytes: bytes) -> None:
    h = Harness(client_cert)
    h.send(request_bytes)
    assert h.client_received().startswith(b"HTTP/1.1 400 ")
    assert h.transport.disconnecting
    assert h.endpoint.connections == []


def test_endless_extension_request_line_gets_431(client_cert: Any) -> None:
    h = Harness(client_cert)
    h.send(b"BREW /" + b"x" * (SETTINGS.max_header_bytes + 10))
    assert h.client_received().startswith(b"HTTP/1.1 431 ")
    assert h.endpoint.connections == []


def test_extension_method_with_bad_framing_gets_400_and_its_access_line(
    client_cert: Any, access_lines: list[str]
) -> None:
    """The refusal of an extension-method request names the real method in its access line."""
    h = Harness(client_cert)
    h.send(
        b"BREW /pot HTTP/1.1\r\nHost: a\r\n"
        b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert h.client_received().startswith(b"HTTP/1.1 400 ")
    assert len(access_lines) == 1
    assert '"BREW /pot HTTP/1.1" 400 ' in access_lines[0]


def test_extension_method_split_after_a_handled_one(client_cert: Any) -> None:
    """
    An extension request, then another whose method begins in the same read
    and ends in the next: the first is forwarded, the second refused.
    """
    h = Harness(client_cert)
    h.send(b"FOOBAR /1 HTTP/1.1\r\nHost: a\r\n\r\nB")
    h.send(b"REW /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    sent = b"".join(c.transport.value() for c in h.endpoint.connections)
    lines = [line for line in sent.split(b"\r\n") if line.endswith(b" HTTP/1.1")]
    assert lines == [b"FOOBAR /1 HTTP/1.1"]
    assert b"Connection: close\r\n" in h.client_received()
    assert h.transport.disconnecting


def test_long_extension_method_counts_towards_the_head_limit(client_cert: Any) -> None:
    """A whole request line whose extension method alone is above --max-header-bytes: 431."""
    h = Harness(client_cert)
    h.send(b"A" * (SETTINGS.max_header_bytes + 1) + b" / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.client_received().startswith(b"HTTP/1.1 431 ")
    assert h.endpoint.connections == []


def test_extension_method_and_headers_together_above_the_limit_get_431(client_cert: Any) -> None:
    h = Harness(client_cert)
    half = SETTINGS.max_header_bytes // 2
    h.send(b"B" * half + b" / HTTP/1.1\r\nHost: a\r\nX-Fill: " + b"f" * half + b"\r\n\r\n")
    assert h.client_received().startswith(b"HTTP/1.1 431 ")
    assert h.endpoint.connections == []
