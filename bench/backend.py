#!/usr/bin/env python3
"""
A fast keep-alive HTTP/1.1 backend for benchmarks: answers every request with a fixed
small body (or N bytes with ?bytes=N), so that the proxy, not the application, is measured.

    python bench/backend.py --port 18080

asyncio + a minimal request reader; request bodies with Content-Length are read and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
from urllib.parse import parse_qs, urlsplit

SMALL = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
PATTERN = bytes(range(256)) * 256  # 64 KiB


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].split(b" ", 2)
            length = 0
            http10 = lines[0].endswith(b"HTTP/1.0")
            close = http10  # HTTP/1.0 closes unless it asks for keep-alive (ab -k does)
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                lname = name.strip().lower()
                if lname == b"content-length":
                    length = int(value)
                elif lname == b"connection":
                    close = b"close" in value.lower() or (http10 and b"alive" not in value.lower())
            # An HTTP/1.0 client only keeps the connection if told so.
            tail = b"Connection: keep-alive\r\n\r\n" if http10 and not close else b"\r\n"
            while length:
                chunk = await reader.read(min(length, 1 << 20))
                if not chunk:
                    return
                length -= len(chunk)
            query = parse_qs(urlsplit(target.decode("latin-1")).query)
            if "bytes" in query:
                n = int(query["bytes"][0])
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % n + tail)
                while n:
                    piece = PATTERN[: min(n, len(PATTERN))]
                    writer.write(piece)
                    n -= len(piece)
                    await writer.drain()
            else:
                writer.write(SMALL + tail + b"ok\n")
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=18080)
    args = parser.parse_args()
    server = await asyncio.start_server(handle, "127.0.0.1", args.port, backlog=1024)
    print(f"bench backend listening on 127.0.0.1:{args.port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
