"""
WebSocket through the running daemon (docs/design.md, "Protocol upgrades"):
a real TLS client with a certificate upgrades to a WebSocket echo backend
(tests/e2e/wsbackend.py), frames go both ways, including one sent right
after the request head; the backend sees the identity header; a client
without a certificate never gets that far, and a [[rule]] refusing the path
refuses the upgrade request with 403 before anything is forwarded.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import ProxyLauncher, TlsConnection
from .wsbackend import WebSocketBackend, accept_for, frame, read_frame

pytestmark = pytest.mark.e2e

RULES = """\
[[rule]]
path = "/private"
allow-cn = ["someone-else"]
"""


@pytest.fixture
def ws_backend() -> Iterator[WebSocketBackend]:
    app = WebSocketBackend()
    yield app
    app.stop()


def upgrade_request(conn: TlsConnection, path: str, key: bytes) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {conn.host}\r\nConnection: Upgrade\r\n"
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "X-Client-Cert-CN: admin\r\n"
    ).encode() + b"Sec-WebSocket-Key: " + key + b"\r\n\r\n"


def read_head(conn: TlsConnection) -> list[bytes]:
    lines = []
    while True:
        line = conn.rfile.readline(65536)
        assert line, f"connection closed after {lines!r}"
        if line == b"\r\n":
            return lines
        lines.append(line.rstrip(b"\r\n"))


def test_websocket_echo_through_the_proxy(
    launcher: ProxyLauncher, ws_backend: WebSocketBackend
) -> None:
    """
    The 101 reaches the client with the backend's Sec-WebSocket-Accept; a
    masked frame pipelined with the head, and one sent later, come back
    echoed; the backend saw the verified CN (not the client's forged one).
    """
    proxy = launcher.start(backend=ws_backend.url)
    key = base64.b64encode(os.urandom(16))
    with proxy.tls("client") as conn:
        conn.send(upgrade_request(conn, "/chat", key) + frame(b"first", mask=os.urandom(4)))
        head = read_head(conn)
        assert head[0] == b"HTTP/1.1 101 Switching Protocols", head
        assert b"Sec-WebSocket-Accept: " + accept_for(key) in head
        assert b"Upgrade: websocket" in head and b"Connection: upgrade" in head
        assert read_frame(conn.rfile) == (1, b"first")
        conn.send(frame(b"second", mask=os.urandom(4)))
        assert read_frame(conn.rfile) == (1, b"second")
        conn.send(frame(b"", opcode=8, mask=os.urandom(4)))
        assert read_frame(conn.rfile) == (8, b"")
        assert conn.closed_by_peer()
    assert ws_backend.heads[0][0] == b"GET /chat HTTP/1.1"
    assert ws_backend.header(0, b"X-Client-Cert-CN") == [b"client"]
    assert ws_backend.header(0, b"Upgrade") == [b"websocket"]
    assert ws_backend.header(0, b"Connection") == [b"upgrade"]
    line = proxy.wait_for_log(r'"GET /chat HTTP/1\.1" 101 \d+ ')
    assert line is not None


def test_client_without_certificate_is_refused_at_the_handshake(
    launcher: ProxyLauncher, ws_backend: WebSocketBackend
) -> None:
    proxy = launcher.start(backend=ws_backend.url)
    attempt = proxy.attempt(
        None,
        b"GET /chat HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n\r\n",
    )
    assert attempt.refused, attempt
    assert ws_backend.heads == []


def test_rule_refusing_the_path_refuses_the_upgrade(
    launcher: ProxyLauncher, ws_backend: WebSocketBackend, tmp_path: Path
) -> None:
    """A [[rule]] is checked before forwarding: 403, nothing reaches the backend."""
    config = tmp_path / "rules.toml"
    config.write_text(RULES)
    proxy = launcher.start("--config", str(config), backend=ws_backend.url)
    key = base64.b64encode(os.urandom(16))
    with proxy.tls("client") as conn:
        conn.send(upgrade_request(conn, "/private/chat", key))
        response = conn.read_response()
        assert response.status == 403
        assert conn.closed_by_peer()
    assert ws_backend.heads == []
    with proxy.tls("client") as conn:  # other paths still upgrade
        conn.send(upgrade_request(conn, "/open", key))
        assert read_head(conn)[0] == b"HTTP/1.1 101 Switching Protocols"


def test_h2c_upgrade_is_refused_and_never_reaches_the_backend(
    launcher: ProxyLauncher, ws_backend: WebSocketBackend
) -> None:
    """
    Upgrade: h2c would let a backend that accepts it read HTTP/2 requests
    straight from the client, past the proxy ("h2c smuggling"): 400.
    """
    proxy = launcher.start(backend=ws_backend.url)
    with proxy.tls("client") as conn:
        conn.send(
            f"GET / HTTP/1.1\r\nHost: {conn.host}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".encode()
        )
        response = conn.read_response()
        assert response.status == 400
        assert conn.closed_by_peer()
    assert ws_backend.heads == []
    proxy.wait_for_log(r"upgrade to 'h2c' is not proxied")
