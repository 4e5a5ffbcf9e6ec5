#!/usr/bin/env python3
"""
The backend of the load-and-faults test (C{tests/e2e/test_load.py}).

A plain HTTP/1.1 keep-alive server (asyncio, standard library only) that
records every request it receives, so that the test can count after the run
how often each request reached the application:

    python tests/e2e/loadbackend.py --listen 127.0.0.1:PORT --log FILE --instance N

It prints one line, C{load backend listening on http://HOST:PORT}, once it
accepts connections.  Each event is appended to C{FILE} with one unbuffered
C{write(2)} on an C{O_APPEND} descriptor, so that a SIGKILL loses nothing
already recorded (several instances may share the file)::

    N H <id> <method> <content-length>   the head of request <id> arrived
    N C <id> <body-length> <body-id>     its body arrived in full; answered 200
    N T <id> <got> <content-length>      the connection ended inside its body

C{<id>} is the C{X-Request-Id} header (C{-} if none), C{<body-id>} what the
body says after C{id=} up to the first C{;} (C{-} if it does not start so).

Every complete request is answered 200 with C{X-Request-Id} (the id received),
C{X-Echo-CN} (the C{X-Client-Cert-CN} received) and the body
C{<id> <cn> <body-id> <body-length>\\n}, so that the client can tell that the
answer is the one to its own request.  C{Connection: close} is honoured.

SIGUSR1 closes every connection that is idle between two requests: how the
test empties the proxy's pool of idle backend connections before it compares
file descriptor counts (the proxy keeps idle pooled connections until the
backend closes them).  SIGTERM stops it; the test kills it with SIGKILL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

MAX_HEAD = 65536


class Server:
    def __init__(self, log_path: str, instance: int) -> None:
        self.log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.instance = instance
        #: connections waiting for the next request head
        self.idle: set[asyncio.StreamWriter] = set()
        self.stopping = asyncio.Event()

    def record(self, *fields: object) -> None:
        line = " ".join(str(f) for f in (self.instance, *fields)) + "\n"
        os.write(self.log_fd, line.encode("ascii", "backslashreplace"))

    def close_idle(self) -> None:
        for writer in list(self.idle):
            writer.close()
        self.idle.clear()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # stopping (SIGTERM): asyncio.run cancels the open connections
        finally:
            self.idle.discard(writer)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            self.idle.add(writer)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            finally:
                self.idle.discard(writer)
            lines = head[:-4].split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) != 3:
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
                return
            method = parts[0].decode("latin-1")
            request_id = cn = "-"
            length = 0
            close = parts[2] != b"HTTP/1.1"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                lname = name.strip().lower()
                value = value.strip()
                if lname == b"x-request-id":
                    request_id = value.decode("latin-1")
                elif lname == b"x-client-cert-cn":
                    cn = value.decode("latin-1")
                elif lname == b"content-length":
                    length = int(value)
                elif lname == b"connection":
                    close = close or b"close" in value.lower()
                elif lname == b"transfer-encoding":
                    writer.write(b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
                    return
            self.record("H", request_id, method, length)
            body = b""
            if length:
                try:
                    body = await reader.readexactly(length)
                except asyncio.IncompleteReadError as e:
                    self.record("T", request_id, len(e.partial), length)
                    return
                except ConnectionError:
                    self.record("T", request_id, "?", length)
                    return
            body_id = "-"
            if body.startswith(b"id="):
                body_id = body[3:].split(b";", 1)[0].decode("latin-1")
            self.record("C", request_id, len(body), body_id)
            text = f"{request_id} {cn} {body_id} {len(body)}\n".encode("latin-1")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                b"X-Request-Id: %s\r\nX-Echo-CN: %s\r\nContent-Length: %d\r\n%s\r\n%s"
                % (
                    request_id.encode("latin-1"),
                    cn.encode("latin-1"),
                    len(text),
                    b"Connection: close\r\n" if close else b"",
                    text,
                )
            )
            await writer.drain()
            if close:
                return


async def amain(args: argparse.Namespace) -> int:
    host, _, port = args.listen.rpartition(":")
    server = Server(args.log, args.instance)
    listener = await asyncio.start_server(
        server.handle, host, int(port), backlog=4096, reuse_address=True, limit=MAX_HEAD
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, server.close_idle)
    loop.add_signal_handler(signal.SIGTERM, server.stopping.set)
    bound = listener.sockets[0].getsockname()
    print(f"load backend listening on http://{bound[0]}:{bound[1]}", flush=True)
    async with listener:
        await server.stopping.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--log", required=True, metavar="FILE")
    parser.add_argument("--instance", type=int, default=1)
    args = parser.parse_args(argv)
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
