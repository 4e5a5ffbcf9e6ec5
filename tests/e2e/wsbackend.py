"""
A tiny WebSocket echo server (RFC 6455) for the end-to-end tests, stdlib only.

It accepts the upgrade on any path, records each request head it receives
(so tests can check what the proxy forwarded), and echoes small text and
binary frames back unmasked; a close frame is answered with a close frame.
Frames up to 125 bytes only: enough to show bytes flow both ways.
"""

from __future__ import annotations

import base64
import hashlib
import socketserver
import threading
from typing import Any

#: RFC 6455 1.3: the GUID appended to Sec-WebSocket-Key
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_for(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept value answering C{key}."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def frame(payload: bytes, opcode: int = 1, mask: bytes | None = None) -> bytes:
    """One final frame of at most 125 bytes; masked when C{mask} (4 bytes) is given."""
    assert len(payload) <= 125
    if mask is None:
        return bytes([0x80 | opcode, len(payload)]) + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


def read_frame(rfile: Any) -> tuple[int, bytes]:
    """(opcode, payload) of one small frame read from C{rfile}, unmasking it if masked."""
    first = rfile.read(2)
    if len(first) < 2:
        raise EOFError("connection closed before a frame")
    opcode, length = first[0] & 0x0F, first[1] & 0x7F
    assert length <= 125, "only small frames are handled"
    mask = rfile.read(4) if first[1] & 0x80 else None
    payload = rfile.read(length)
    if mask is not None:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return opcode, payload


class _Handler(socketserver.StreamRequestHandler):
    server: WebSocketBackend._Server

    def handle(self) -> None:
        lines = []
        while True:
            line = self.rfile.readline(65536)
            if line in (b"\r\n", b""):
                break
            lines.append(line.rstrip(b"\r\n"))
        if not lines:
            return
        self.server.owner.heads.append(lines)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        key = headers.get(b"sec-websocket-key")
        if key is None or headers.get(b"upgrade", b"").lower() != b"websocket":
            self.wfile.write(
                b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            return
        self.wfile.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_for(key) + b"\r\n\r\n"
        )
        while True:
            try:
                opcode, payload = read_frame(self.rfile)
            except (EOFError, OSError):
                return
            if opcode == 8:
                self.wfile.write(frame(payload, opcode=8))
                return
            self.wfile.write(frame(payload, opcode=opcode))


class WebSocketBackend:
    """The echo server on a free loopback port, served by a thread until L{stop}."""

    class _Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        owner: WebSocketBackend

    def __init__(self) -> None:
        self.heads: list[list[bytes]] = []
        self._server = self._Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def header(self, index: int, name: bytes) -> list[bytes]:
        """The values of header C{name} in the C{index}th request head received."""
        found = []
        for line in self.heads[index][1:]:
            field, _, value = line.partition(b":")
            if field.strip().lower() == name.lower():
                found.append(value.strip())
        return found

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
