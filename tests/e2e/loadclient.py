#!/usr/bin/env python3
"""
The load generator of the load-and-faults test (C{tests/e2e/test_load.py}).

One process holds C{--connections} TLS connections to the proxy at once
(asyncio and C{ssl}, each with a client certificate) and sends C{--requests}
HTTP/1.1 requests over them in total, one at a time per connection
(keep-alive, no pipelining).  Standard library only; run it as a script::

    python tests/e2e/loadclient.py --port 8443 --ca ca.pem \\
        --cert a.pem --key a-key.pem --cert b.pem --key b-key.pem \\
        --cn load-a --cn load-b --client A --connections 500 --requests 25000 \\
        --records records.txt --hold

Connection C{i} uses certificate C{i mod k}.  Each request carries a unique
id, C{X-Request-Id: <client>-<connection>-<seq>}, and a POST body starts with
C{id=<id>;}.  The backend (C{tests/e2e/loadbackend.py}) answers with the id
and the C{X-Client-Cert-CN} it received, in headers and body: a response is
C{ok} only if all of them are this request's id and this connection's CN and
the body length the backend counted is the one sent; a 200 that is not is a
C{mismatch} (cross-talk).  Other outcomes: C{status} (502, 503 or 504: an
honest error), C{unexpected} (any other status, or an unreadable response),
C{conn_error} (the connection ended or failed before the whole response),
C{timeout}, and C{reset}: a POST of 32 KiB whose connection this client resets
on purpose (C{--reset-fraction}) with a TCP RST (C{SO_LINGER} 0) after
sending half of the body and waiting 0 to 20 ms, so that the proxy has
usually forwarded the head and part of the body by then.

After an error (C{status}, C{conn_error}, C{timeout}) a connection waits a
little before its next request (0.1 s doubling to 1 s), as a real client
would back off, so that an outage does not burn the whole request budget.
A closed connection is reopened.

With C{--hold}, every connection is first opened and sends one request; then
the process prints C{ready N} and waits for a line C{go} on stdin, so that
the test can count the connections the proxy holds at that moment.

Standard output: C{ready N}, C{progress {...}} about every 0.5 s, and last
C{result {...}}, one JSON object with the counts.  C{--records} gets one line
per request: C{id kind outcome status start end}, the times in
C{time.monotonic()} seconds (CLOCK_MONOTONIC, the same for every process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import socket
import ssl
import struct
import sys
import time
from collections import Counter

ERROR_STATUSES = (502, 503, 504)
REQUEST_TIMEOUT = 90.0
CONNECT_TIMEOUT = 60.0
CONNECT_ATTEMPTS = 30


class ConnectFailed(Exception):
    pass


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.contexts: list[tuple[ssl.SSLContext, str]] = []
        for cert, key, cn in zip(args.cert, args.key, args.cn, strict=True):
            ctx = ssl.create_default_context(cafile=args.ca)
            ctx.load_cert_chain(cert, key)
            self.contexts.append((ctx, cn))
        self.remaining = args.requests
        self.records: list[tuple[str, str, str, int, float, float]] = []
        self.outcomes: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.kinds: Counter[str] = Counter()
        self.mismatches: list[dict[str, object]] = []
        self.unexpected: list[str] = []
        self.connect_errors: Counter[str] = Counter()
        self.conn_errors: Counter[str] = Counter()
        self.handshakes = 0
        self.open_now = 0
        self.max_open = 0
        self.open_at_go = 0
        self.ready = 0
        self.go = asyncio.Event()
        self.handshake_slots = asyncio.Semaphore(args.handshake_concurrency)
        self.rng = random.Random(args.seed)
        self.times: dict[str, float] = {}

    # -- connections ---------------------------------------------------------

    async def connect(
        self, ctx: ssl.SSLContext
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        for attempt in range(CONNECT_ATTEMPTS):
            async with self.handshake_slots:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(
                            "127.0.0.1", self.args.port, ssl=ctx, server_hostname="localhost"
                        ),
                        CONNECT_TIMEOUT,
                    )
                except (OSError, ssl.SSLError, TimeoutError) as e:
                    self.connect_errors[type(e).__name__] += 1
                    error = e
                else:
                    self.handshakes += 1
                    self.open_now += 1
                    self.max_open = max(self.max_open, self.open_now)
                    return reader, writer
            await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
        raise ConnectFailed(f"{CONNECT_ATTEMPTS} attempts to connect failed, last: {error!r}")

    def closed(self, writer: asyncio.StreamWriter, abort: bool = False) -> None:
        self.open_now -= 1
        if abort:
            writer.transport.abort()
        else:
            writer.close()

    # -- requests --------------------------------------------------------------

    def take(self) -> bool:
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True

    def choose(self) -> str:
        x = self.rng.random()
        if x < self.args.reset_fraction:
            return "reset"
        if x < self.args.reset_fraction + self.args.post_fraction:
            return "post"
        return "get"

    def request_bytes(self, rid: str, kind: str) -> tuple[bytes, bytes]:
        """The head and the body of request C{rid}."""
        target = f"/load/{rid}"
        if kind == "get":
            head = (
                f"GET {target} HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: {rid}\r\n\r\n"
            ).encode("ascii")
            return head, b""
        size = self.rng.randint(1024, 16384) if kind == "post" else 32768
        prefix = f"id={rid};".encode("ascii")
        body = prefix + bytes(self.rng.getrandbits(8) for _ in range(64)) * (
            (size - len(prefix)) // 64 + 1
        )
        body = body[:size]
        head = (
            f"POST {target} HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: {rid}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode("ascii")
        return head, body

    async def read_response(
        self, reader: asyncio.StreamReader
    ) -> tuple[int, dict[str, str], bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        else:
            body = await reader.read()
        return status, headers, body

    def record(self, rid: str, kind: str, outcome: str, status: int, start: float) -> None:
        self.records.append((rid, kind, outcome, status, start, time.monotonic()))
        self.outcomes[outcome] += 1
        self.kinds[kind] += 1
        if status:
            self.statuses[status] += 1

    async def one(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rid: str,
        kind: str,
        cn: str,
    ) -> tuple[str, bool]:
        """Send request C{rid} and judge its answer: (outcome, connection still usable)."""
        head, body = self.request_bytes(rid, kind)
        start = time.monotonic()
        if kind == "reset":
            writer.write(head + body[: len(body) // 2])
            try:
                await writer.drain()
            except OSError as e:
                self.conn_errors[f"reset: {type(e).__name__}"] += 1
            await asyncio.sleep(self.rng.uniform(0, 0.02))
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.closed(writer, abort=True)
            self.record(rid, kind, "reset", 0, start)
            return "reset", False
        try:
            writer.write(head + body)
            status, headers, got = await asyncio.wait_for(
                self.read_response(reader), REQUEST_TIMEOUT
            )
        except TimeoutError:
            self.record(rid, kind, "timeout", 0, start)
            self.closed(writer, abort=True)
            return "timeout", False
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, EOFError) as e:
            self.conn_errors[type(e).__name__] += 1
            self.record(rid, kind, "conn_error", 0, start)
            self.closed(writer, abort=True)
            return "conn_error", False
        except (ValueError, IndexError, asyncio.LimitOverrunError) as e:
            self.unexpected.append(f"{rid}: unreadable response ({e!r})")
            self.record(rid, kind, "unexpected", 0, start)
            self.closed(writer, abort=True)
            return "unexpected", False
        keep = "close" not in headers.get("connection", "").lower()
        if status == 200:
            body_id = rid if kind == "post" else "-"
            expected = f"{rid} {cn} {body_id} {len(body)}\n".encode("latin-1")
            if (
                headers.get("x-request-id") == rid
                and headers.get("x-echo-cn") == cn
                and got == expected
            ):
                outcome = "ok"
            else:
                outcome = "mismatch"
                if len(self.mismatches) < 50:
                    self.mismatches.append({
                        "id": rid, "cn": cn, "kind": kind,
                        "got_id": headers.get("x-request-id"),
                        "got_cn": headers.get("x-echo-cn"),
                        "body": got[:200].decode("latin-1"),
                    })
        elif status in ERROR_STATUSES:
            outcome = "status"
        else:
            outcome = "unexpected"
            if len(self.unexpected) < 50:
                self.unexpected.append(f"{rid}: {status} {got[:200]!r}")
        self.record(rid, kind, outcome, status, start)
        if not keep:
            self.closed(writer)
        return outcome, keep

    # -- one connection slot ----------------------------------------------------

    async def slot(self, slot: int) -> None:
        ctx, cn = self.contexts[slot % len(self.contexts)]
        seq = 0
        backoff = 0.0
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        first = True
        while self.take():
            if conn is None:
                conn = await self.connect(ctx)
            seq += 1
            rid = f"{self.args.client}-{slot}-{seq}"
            # the first request of each slot is a GET: with --hold, the
            # connection then waits, open, for the go
            kind = "get" if first else self.choose()
            outcome, keep = await self.one(*conn, rid, kind, cn)
            if not keep:
                conn = None
            if first:
                first = False
                self.ready += 1
                if self.ready == self.args.connections:
                    self.times["ready"] = time.monotonic()
                    print(f"ready {self.open_now}", flush=True)
                await self.go.wait()
            if outcome in ("status", "conn_error", "timeout"):
                backoff = min(max(backoff * 2, 0.1), 1.0)
                await asyncio.sleep(backoff)
            elif outcome in ("ok", "reset"):
                backoff = 0.0
        if conn is not None:
            self.closed(conn[1])

    # -- the run -----------------------------------------------------------------

    def summary(self) -> dict[str, object]:
        t = self.times
        load_seconds = t["done"] - t["go"]
        return {
            "client": self.args.client,
            "connections": self.args.connections,
            "requests_sent": len(self.records),
            "kinds": dict(self.kinds),
            "outcomes": dict(self.outcomes),
            "responses_ok": self.outcomes["ok"],
            "mismatched": self.outcomes["mismatch"],
            "error_statuses": {str(k): v for k, v in self.statuses.items() if k != 200},
            "conn_errors": dict(self.conn_errors),
            "connect_errors": dict(self.connect_errors),
            "resets_done": self.outcomes["reset"],
            "handshakes": self.handshakes,
            "max_open": self.max_open,
            "open_at_go": self.open_at_go,
            "mismatch_samples": self.mismatches,
            "unexpected_samples": self.unexpected,
            "connect_seconds": round(t.get("ready", t["go"]) - t["start"], 3),
            "load_seconds": round(load_seconds, 3),
            "requests_per_second": round(len(self.records) / max(load_seconds, 1e-9), 1),
        }

    async def progress(self) -> None:
        while True:
            print("progress " + json.dumps({
                "sent": len(self.records), "ok": self.outcomes["ok"],
                "status": self.outcomes["status"], "conn_error": self.outcomes["conn_error"],
                "open": self.open_now,
            }), flush=True)
            await asyncio.sleep(0.5)

    async def wait_go(self) -> None:
        if self.args.hold:
            line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            if line.strip() != "go":
                raise SystemExit(f"expected 'go' on stdin, got {line!r}")
        self.open_at_go = self.open_now
        self.times["go"] = time.monotonic()
        self.go.set()

    async def run(self) -> dict[str, object]:
        self.times["start"] = time.monotonic()
        reporter = asyncio.create_task(self.progress())
        slots = [asyncio.create_task(self.slot(i)) for i in range(self.args.connections)]
        go = asyncio.create_task(self.wait_go())
        try:
            results = await asyncio.gather(*slots, return_exceptions=True)
        finally:
            reporter.cancel()
            go.cancel()
        self.times["done"] = time.monotonic()
        self.times.setdefault("go", self.times["done"])
        summary = self.summary()
        summary["slot_failures"] = [repr(r) for r in results if isinstance(r, BaseException)]
        return summary


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SystemExit(f"ulimit -n: need {needed} descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", action="append", required=True)
    parser.add_argument("--key", action="append", required=True)
    parser.add_argument("--cn", action="append", required=True, help="CN of each --cert")
    parser.add_argument("--client", required=True, help="prefix of this process's request ids")
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--requests", type=int, default=25000)
    parser.add_argument("--post-fraction", type=float, default=0.3)
    parser.add_argument("--reset-fraction", type=float, default=0.02)
    parser.add_argument("--handshake-concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--records", help="write one line per request to this file")
    parser.add_argument("--hold", action="store_true")
    args = parser.parse_args(argv)
    if args.requests < args.connections:
        parser.error("--requests must be at least --connections (each sends one to start)")
    raise_fd_limit(args.connections + 256)
    load = Load(args)
    result = asyncio.run(load.run())
    if args.records:
        with open(args.records, "w", encoding="ascii") as f:
            for rid, kind, outcome, status, start, end in load.records:
                f.write(f"{rid} {kind} {outcome} {status} {start:.6f} {end:.6f}\n")
    print("result " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
