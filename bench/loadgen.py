#!/usr/bin/env python3
"""
A small HTTP/1.1 keep-alive load generator with client certificates, for bench/run.py.

ab speaks HTTP/1.0 (keep-alive only through `Connection: keep-alive`), and the Debian tools that
speak HTTP/1.1 (h2load --h1, wrk, hey) cannot present a client certificate, so this one does.
Standard library only: one process, non-blocking sockets (TLS through `ssl`) on a selector,
C connections, each sending one request at a time (no pipelining), reconnecting when the server
closes. Bounded in time and in count.

    python bench/loadgen.py https://127.0.0.1:8443/ -c 32 -t 5 -n 1000000 \
        --cert client-cert.pem --key client-key.pem

prints one JSON object: requests, non2xx, errors, reconnects, elapsed, rps, p50_ms, p99_ms.

With --hold N it instead opens N connections, sends one request on each (keep-alive), prints
`ready N` and keeps them open, idle, until stdin is closed (or --hold-seconds pass): how
bench/run.py measures the proxy's memory per idle connection.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import ssl
import sys
import time
from urllib.parse import urlsplit


class Conn:
    __slots__ = ("sock", "buf", "sent_at", "head_end", "body_len", "chunked", "status", "close")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.sent_at = 0.0
        self.reset()

    def reset(self) -> None:
        self.head_end = -1
        self.body_len = 0
        self.chunked = False
        self.status = 0
        self.close = False

    def response_done(self) -> bool:
        """True when buf holds one whole response (which is then removed from buf)."""
        buf = self.buf
        if self.head_end < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            self.head_end = end + 4
            head = bytes(buf[:end]).lower()
            self.status = int(head[9:12])
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                self.body_len = int(head[i + 17 : j if j >= 0 else len(head)])
            elif b"\r\ntransfer-encoding: chunked" in head:
                self.chunked = True
            self.close = b"\r\nconnection: close" in head or head.startswith(b"http/1.0")
        if self.chunked:
            # Enough for the benchmark's bodies: the response ends with the last chunk.
            end = buf.find(b"\r\n0\r\n\r\n", self.head_end - 2)
            if end < 0:
                return False
            del buf[: end + 7]
            return True
        total = self.head_end + self.body_len
        if len(buf) < total:
            return False
        del buf[:total]
        return True


def make_context(args: argparse.Namespace) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # as ab and s_time: the server is ours
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
    return ctx


def connect(host: str, port: int, ctx: ssl.SSLContext | None, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ctx is not None:
        sock = ctx.wrap_socket(sock, server_hostname=host)  # handshake, blocking
    return sock


def blocking_request(sock: socket.socket, request: bytes) -> int:
    sock.sendall(request)
    conn = Conn(sock)
    while not conn.response_done():
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the response ended")
        conn.buf += data
    return conn.status


def hold(args: argparse.Namespace, host: str, port: int, ctx: ssl.SSLContext | None,
         request: bytes) -> None:
    socks = []
    bad = 0
    for _ in range(args.hold):
        sock = connect(host, port, ctx, 30)
        status = blocking_request(sock, request)
        bad += not 200 <= status < 300
        socks.append(sock)
    print(f"ready {len(socks)} non2xx {bad}", flush=True)
    deadline = time.monotonic() + args.hold_seconds
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if sel.select(max(0.0, deadline - time.monotonic())):
            if not os.read(sys.stdin.fileno(), 1024):
                break
    for sock in socks:
        sock.close()


def run(args: argparse.Namespace, host: str, port: int, ctx: ssl.SSLContext | None,
        request: bytes) -> dict[str, float]:
    sel = selectors.DefaultSelector()
    conns: dict[int, Conn] = {}
    latencies: list[float] = []
    errors = reconnects = non2xx = 0
    want = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError)

    def open_conn() -> None:
        sock = connect(host, port, ctx, 10)
        sock.setblocking(False)
        conn = Conn(sock)
        conns[sock.fileno()] = conn
        sel.register(sock, selectors.EVENT_READ, conn)
        send(conn)

    def send(conn: Conn) -> None:
        conn.reset()
        conn.sent_at = time.perf_counter()
        try:
            n = conn.sock.send(request)
        except want:
            n = 0
        if n != len(request):  # never happens with a 100-byte request on a fresh window
            conn.sock.setblocking(True)
            conn.sock.sendall(request[n:])
            conn.sock.setblocking(False)

    def drop(conn: Conn) -> None:
        sel.unregister(conn.sock)
        del conns[conn.sock.fileno()]
        conn.sock.close()

    for _ in range(args.connections):
        open_conn()
    started = time.perf_counter()
    deadline = started + args.duration
    count = 0
    while count < args.requests:
        now = time.perf_counter()
        if now >= deadline:
            break
        for key, _ in sel.select(deadline - now):
            conn = key.data
            closed = False
            try:
                while True:
                    data = conn.sock.recv(262144)
                    if not data:
                        closed = True
                        break
                    conn.buf += data
            except want:
                pass
            except OSError:
                closed = True
            done = False
            if conn.buf and conn.response_done():
                done = True
                latencies.append(time.perf_counter() - conn.sent_at)
                count += 1
                non2xx += not 200 <= conn.status < 300
            if closed or (done and conn.close):
                if not done:
                    errors += 1
                drop(conn)
                reconnects += 1
                try:
                    open_conn()
                except OSError:
                    errors += 1
            elif done:
                send(conn)
    elapsed = time.perf_counter() - started
    for conn in list(conns.values()):
        drop(conn)
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000

    return {
        "requests": count,
        "non2xx": non2xx,
        "errors": errors,
        "reconnects": reconnects,
        "elapsed": elapsed,
        "rps": count / elapsed if elapsed else 0.0,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="http://HOST:PORT/PATH or https://...")
    parser.add_argument("-c", "--connections", type=int, default=32)
    parser.add_argument("-t", "--duration", type=float, default=5.0, help="seconds at most")
    parser.add_argument("-n", "--requests", type=int, default=1_000_000, help="requests at most")
    parser.add_argument("--cert", help="client certificate (PEM)")
    parser.add_argument("--key", help="client private key (PEM)")
    parser.add_argument("--hold", type=int, default=0,
                        help="open N keep-alive connections and hold them idle instead")
    parser.add_argument("--hold-seconds", type=float, default=120.0)
    args = parser.parse_args()
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or (443 if url.scheme == "https" else 80)
    ctx = make_context(args) if url.scheme == "https" else None
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    request = f"GET {target} HTTP/1.1\r\nHost: {url.netloc}\r\nUser-Agent: loadgen\r\n\r\n".encode()
    if args.hold:
        hold(args, host, port, ctx, request)
    else:
        print(json.dumps(run(args, host, port, ctx, request)), flush=True)


if __name__ == "__main__":
    main()
