#!/usr/bin/env python3
"""
The handshake flood of C{tests/e2e/test_handshake_flood.py}: clients that
will never be admitted, opening TLS connections to the proxy as fast as they
can.  Standard library only; run it as a script::

    python tests/e2e/floodclient.py --port 8443 --rogue-cert r.pem --rogue-key r-key.pem \\
        --mode nocert --mode rogue --mode garbage --mode stall --duration 40

One thread per C{--mode} (a mode may be given more than once):

  - C{nocert}: a full handshake without a client certificate, then a request;
  - C{rogue}: the same with a certificate from a CA the proxy does not trust;
    both alternate between TLS 1.2 (refused in the handshake) and TLS 1.3
    (refused at the first read, after the client's side of the handshake);
  - C{garbage}: a real ClientHello followed by a junk record (see L{JUNK}),
    or, every third time, a plain-text HTTP request instead of a ClientHello;
  - C{stall}: keeps C{--stall-batch} connections open that sent a real
    ClientHello (and read what the proxy answers) but never go on: only the
    proxy's handshake timeout can end them.  It records how long each one
    lived until the proxy closed it.

C{nocert} and C{rogue} send C{GET /flood-leak} after their handshake, and so
does the plain-text variant of C{garbage}: a response to it, C{accepted}, is
a client the proxy must not have let through (or spoke HTTP without TLS).
The outcome of one attempt is C{refused} (a TLS alert, a reset or the
connection closed without an HTTP response), C{accepted}, C{timeout}, or
C{connect_error} (no TCP connection).

The process prints C{started} once its threads run, then stops when standard
input closes (or says C{stop}) or after C{--duration} seconds, whichever
comes first, closes every connection it holds and prints C{result {...}}: one
JSON object with the counts per mode and the stall figures.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from typing import Any

REQUEST = b"GET /flood-leak HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
#: whole records that cannot follow a ClientHello: one of an unknown content
#: type, and application data (undecryptable) where the handshake should go on
JUNK = (
    b"\x42\x03\x03\x00\x20" + os.urandom(32),
    b"\x17\x03\x03\x00\x40" + os.urandom(64),
)
IO_TIMEOUT = 5.0
MODES = ("nocert", "rogue", "garbage", "stall")


def client_context(
    version: ssl.TLSVersion, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """A client context that does not check the server (we only want its work)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = version
    ctx.maximum_version = version
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def client_hello(ctx: ssl.SSLContext) -> bytes:
    """The bytes of a real ClientHello, made by OpenSSL without a socket."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def read_until_closed(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """What the peer sends until it closes; raises on reset, TLS alert or timeout."""
    data = bytearray()
    while len(data) < 65536:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return bytes(data)


class Flood:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: dict[str, Counter[str]] = {mode: Counter() for mode in MODES}
        self.errors: Counter[str] = Counter()
        self.stall_delays: list[float] = []
        self.stall_open_ages: list[float] = []
        self.started = time.monotonic()

    def count(self, mode: str, outcome: str, error: BaseException | None = None) -> None:
        with self.lock:
            self.counts[mode][outcome] += 1
            if error is not None and outcome != "refused":
                self.errors[f"{mode}: {type(error).__name__}: {error}"[:160]] += 1

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.args.port), timeout=IO_TIMEOUT)
        sock.settimeout(IO_TIMEOUT)
        return sock

    # -- the modes -----------------------------------------------------------

    def handshake_loop(self, mode: str) -> None:
        cert = key = None
        if mode == "rogue":
            cert, key = self.args.rogue_cert, self.args.rogue_key
        contexts = [
            client_context(ssl.TLSVersion.TLSv1_2, cert, key),
            client_context(ssl.TLSVersion.TLSv1_3, cert, key),
        ]
        n = 0
        while not self.stop.is_set():
            ctx = contexts[n % 2]
            n += 1
            try:
                raw = self.connect()
            except OSError as e:
                self.count(mode, "connect_error", e)
                continue
            try:
                with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
                    sock.sendall(REQUEST)
                    data = read_until_closed(sock)
            except TimeoutError as e:
                self.count(mode, "timeout", e)
            except (ssl.SSLError, OSError) as e:
                self.count(mode, "refused", e)
            else:
                self.count(mode, "accepted" if b"HTTP/" in data else "refused")
            finally:
                raw.close()

    def garbage_loop(self, mode: str) -> None:
        hello = client_hello(client_context(ssl.TLSVersion.TLSv1_3))
        n = 0
        while not self.stop.is_set():
            payload = REQUEST if n % 3 == 2 else hello + JUNK[n % 3]
            n += 1
            try:
                sock = self.connect()
            except OSError as e:
                self.count(mode, "connect_error", e)
                continue
            try:
                sock.sendall(payload)
                data = read_until_closed(sock)
            except TimeoutError as e:
                self.count(mode, "timeout", e)
            except OSError as e:
                self.count(mode, "refused", e)
            else:
                self.count(mode, "accepted" if b"HTTP/" in data else "refused")
            finally:
                sock.close()

    def stall_loop(self, mode: str) -> None:
        """
        Hold up to --stall-batch connections that sent a ClientHello and then
        nothing; note when the proxy closes each one.
        """
        hello = client_hello(client_context(ssl.TLSVersion.TLSv1_3))
        held: dict[socket.socket, float] = {}
        # epoll, not select(): a batch may hold more than FD_SETSIZE sockets
        selector = selectors.DefaultSelector()
        try:
            while not self.stop.is_set():
                # A few at a time, so that closes are seen in time, and so
                # that bursts of connects stay below the proxy's listen
                # backlog (Twisted's default is 50): beyond it the kernel
                # drops SYNs and connects stall for a 1 s retransmission.
                room = min(self.args.stall_batch - len(held), 10)
                for _ in range(room):
                    if self.stop.is_set():
                        break
                    try:
                        sock = self.connect()
                        sock.sendall(hello)
                    except OSError as e:
                        self.count(mode, "connect_error", e)
                        break
                    sock.setblocking(False)
                    held[sock] = time.monotonic()
                    selector.register(sock, selectors.EVENT_READ)
                if not held:
                    continue
                for key, _ in selector.select(0.1 if len(held) >= self.args.stall_batch else 0):
                    sock = key.fileobj
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if data:
                        if b"HTTP/" in data:
                            self.count(mode, "accepted")
                        continue  # the server's first flight: read and ignore it
                    opened = held.pop(sock)
                    selector.unregister(sock)
                    sock.close()
                    with self.lock:
                        self.stall_delays.append(time.monotonic() - opened)
                    self.count(mode, "refused")
        finally:
            now = time.monotonic()
            with self.lock:
                self.stall_open_ages.extend(now - opened for opened in held.values())
            for sock in held:
                sock.close()
            selector.close()

    # -- running -------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        loops = {
            "nocert": self.handshake_loop,
            "rogue": self.handshake_loop,
            "garbage": self.garbage_loop,
            "stall": self.stall_loop,
        }
        threads = [
            threading.Thread(target=loops[mode], args=(mode,), daemon=True)
            for mode in self.args.mode
        ]
        for thread in threads:
            thread.start()
        print("started", flush=True)
        watcher = threading.Thread(target=self._watch_stdin, daemon=True)
        watcher.start()
        self.stop.wait(self.args.duration)
        self.stop.set()
        stopped = time.monotonic()
        # every blocking call has IO_TIMEOUT: the threads end soon after stop
        deadline = stopped + IO_TIMEOUT * 2
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0))
        delays = sorted(self.stall_delays)
        return {
            "seconds": round(stopped - self.started, 3),
            "counts": {mode: dict(c) for mode, c in self.counts.items() if c},
            "refused": sum(c["refused"] for c in self.counts.values()),
            "accepted": sum(c["accepted"] for c in self.counts.values()),
            "stall_closed": len(delays),
            "stall_delay_min": delays[0] if delays else None,
            "stall_delay_max": delays[-1] if delays else None,
            "stall_open_at_stop": len(self.stall_open_ages),
            "stall_open_max_age": max(self.stall_open_ages, default=0.0),
            "errors": dict(self.errors.most_common(10)),
            "threads_alive": sum(t.is_alive() for t in threads),
        }

    def _watch_stdin(self) -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        self.stop.set()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rogue-cert", required=True)
    parser.add_argument("--rogue-key", required=True)
    parser.add_argument("--mode", action="append", choices=MODES, required=True)
    parser.add_argument("--stall-batch", type=int, default=30)
    parser.add_argument("--duration", type=float, default=40.0, help="stop after this at most")
    args = parser.parse_args(argv)
    result = Flood(args).run()
    print("result " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
