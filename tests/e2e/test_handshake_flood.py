"""
A flood of handshakes that fail must not starve the clients that pass.

Two flood processes (C{floodclient.py}) open TLS connections to one proxy as
fast as they can: without a client certificate, with a certificate from an
unknown CA, with a ClientHello followed by junk (or plain HTTP instead of
TLS), and connections that send a ClientHello and then stall.  Meanwhile a
verified client makes requests, each on a fresh TLS connection (a full
handshake), and must get every answer within a deadline.  The flood must have
been real (hundreds of refusals, counted by the flooders and in the proxy's
log, during the verified client's requests too), nobody from it may reach the
backend, and stalled handshakes must be ended by the proxy's
C{--handshake-timeout} without leaving file descriptors behind.
"""

from __future__ import annotations

import json
import re
import select
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from . import floodclient
from .harness import Proxy, wait_for

pytestmark = pytest.mark.e2e

FLOODCLIENT = Path(__file__).with_name("floodclient.py")
FLOODERS = 2
FLOOD_MODES = ("nocert", "rogue", "garbage", "stall")
#: stalled connections each flooder holds open at once
STALL_BATCH = 25
#: how many times the flood's stalled connections must time out
STALL_ROUNDS = 3
HANDSHAKE_TIMEOUT = 2.0
#: refusals in the proxy's log before the verified client starts
FLOOD_RAMP = 200
VERIFIED_REQUESTS = 20
#: for all the verified client's requests together (each also has its own socket timeout)
VERIFIED_DEADLINE = 30.0
#: held stalled connections the test opens itself after the flood
HELD = 20
#: a flooder stops by itself after this, whatever happens to the test
FLOOD_MAX_SECONDS = 40.0

REFUSAL = re.compile(r"refused 127\.0\.0\.1:\d+: ([^\n(]*)")


def refusals(proxy: Proxy) -> Counter[str]:
    """Refused handshakes in the proxy's log, by reason (without details in parentheses)."""
    return Counter(m.strip() for m in REFUSAL.findall(proxy.log_text()))


def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def client_sockets(pid: int, port: int) -> int:
    """
    How many client connections (TCP sockets on the listening port, not the
    listener itself) the process holds open as file descriptors.
    """
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    held = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            state, inode = fields[3], fields[9]
            if local_port == port and state != "0A" and inode in inodes:  # 0A: LISTEN
                held += 1
    return held


class Flooder:
    """One C{floodclient.py} process aimed at the proxy."""

    def __init__(self, proxy: Proxy, workdir: Path, index: int) -> None:
        rogue = proxy.pki.get("rogue")
        command = [
            sys.executable, str(FLOODCLIENT), "--port", str(proxy.port),
            "--rogue-cert", str(rogue.cert), "--rogue-key", str(rogue.key),
            "--stall-batch", str(STALL_BATCH), "--duration", str(FLOOD_MAX_SECONDS),
        ]
        for mode in FLOOD_MODES:
            command += ["--mode", mode]
        self.stderr_path = workdir / f"flooder-{index}.stderr"
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
            )
        self.result: dict[str, Any] | None = None

    def wait_started(self, timeout: float = 10.0) -> None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        assert line == "started\n", f"flooder said {line!r}; stderr:\n{self.stderr()}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def finish(self, timeout: float = 30.0) -> dict[str, Any]:
        """Tell it to stop; its result."""
        out, _ = self.proc.communicate("stop\n", timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith("result ")]
        assert self.proc.returncode == 0 and lines, (
            f"flooder exited {self.proc.returncode}; stdout:\n{out}\nstderr:\n{self.stderr()}"
        )
        self.result = json.loads(lines[-1][len("result ") :])
        return self.result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


class VerifiedClient(threading.Thread):
    """C{count} requests, each on a new TLS connection with a full handshake."""

    def __init__(self, proxy: Proxy, count: int) -> None:
        super().__init__(daemon=True)
        self.proxy = proxy
        self.count = count
        self.latencies: list[float] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            context = self.proxy.context("client")
            for i in range(self.count):
                target = f"/echo/verified-{i}"
                started = time.monotonic()
                with self.proxy.tls(context=context, timeout=VERIFIED_DEADLINE) as conn:
                    assert not conn.session_reused
                    response = conn.request("GET", target, headers=[("Connection", "close")])
                self.latencies.append(time.monotonic() - started)
                assert response.echo().target == target
        except BaseException as e:  # reported by the test's thread
            self.error = e
        finally:
            self.done.set()


def stalled_connection(port: int, hello: bytes) -> socket.socket:
    """A TCP connection that sent a ClientHello and will send nothing more."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(hello)
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the peer has closed C{sock} (reading and dropping what it sent before)."""
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_handshake_flood_does_not_starve_verified_clients(start_proxy, backend, tmp_path):
    """
    With --handshake-timeout 2, two flooders (no certificate, unknown CA,
    junk after a ClientHello, plain HTTP, stalled ClientHellos) run while a
    verified client makes 20 requests on fresh connections; then the flood's
    connections, and 20 stalled ones the test keeps open itself, are closed
    by the proxy and their descriptors given back.  Run with -s to see the
    refusal rate and the verified client's latencies.
    """
    proxy = start_proxy("--handshake-timeout", f"{HANDSHAKE_TIMEOUT:g}")
    pid = proxy.proc.pid
    with proxy.tls() as conn:
        assert conn.request("GET", "/echo/warm-up").status == 200
    wait_for(lambda: client_sockets(pid, proxy.port) == 0, 5, "the warm-up connection to close")
    fds_before = fd_count(pid)

    flooders = [Flooder(proxy, tmp_path, i) for i in range(FLOODERS)]
    try:
        for flooder in flooders:
            flooder.wait_started()
        flood_start = time.monotonic()
        wait_for(
            lambda: sum(refusals(proxy).values()) >= FLOOD_RAMP,
            20,
            f"{FLOOD_RAMP} refusals in the proxy log (the flood)",
            interval=0.2,
        )

        # -- a verified client, during the flood --------------------------------
        before = sum(refusals(proxy).values())
        client_start = time.monotonic()
        client = VerifiedClient(proxy, VERIFIED_REQUESTS)
        client.start()
        wait_for(client.done.is_set, VERIFIED_DEADLINE, "the verified client's requests")
        client_seconds = time.monotonic() - client_start
        during = sum(refusals(proxy).values()) - before
        if client.error is not None:
            raise client.error
        for flooder in flooders:
            assert flooder.proc.poll() is None, (
                f"a flooder ended before the verified client did:\n{flooder.stderr()}"
            )

        # Stalled handshakes end by the timeout while the flood goes on: let
        # each flooder's batch of them go round a few times.
        wait_for(
            lambda: refusals(proxy)["handshake timeout"] >= STALL_ROUNDS * FLOODERS * STALL_BATCH,
            STALL_ROUNDS * HANDSHAKE_TIMEOUT + 10,
            f"{STALL_ROUNDS} rounds of stalled handshakes to time out",
            interval=0.2,
        )
        results = [flooder.finish() for flooder in flooders]
        flood_seconds = time.monotonic() - flood_start
    finally:
        for flooder in flooders:
            flooder.kill()

    # -- the flood was real, and refused ---------------------------------------
    flood_refused = sum(r["refused"] for r in results)
    left_open = sum(r["stall_open_at_stop"] for r in results)
    attempts = sum(sum(counts.values()) for r in results for counts in r["counts"].values())
    # Every connection a flooder saw refused is logged, once, and so are the
    # stalled ones it still held when told to stop (it closed them then).
    wait_for(
        lambda: sum(refusals(proxy).values()) >= flood_refused + left_open,
        5,
        f"{flood_refused + left_open} refusals in the proxy log",
        interval=0.2,
    )
    logged = refusals(proxy)
    logged_total = sum(logged.values())
    summary = (
        f"flood {flood_seconds:.1f} s: flooders counted {flood_refused} refused "
        f"({flood_refused / flood_seconds:.0f}/s), proxy logged {logged_total} "
        f"({dict(logged)}); {during} refusals logged in the verified client's "
        f"{client_seconds:.2f} s ({during / client_seconds:.0f}/s); verified request latency "
        f"min {min(client.latencies) * 1000:.0f} ms, median "
        f"{statistics.median(client.latencies) * 1000:.0f} ms, "
        f"max {max(client.latencies) * 1000:.0f} ms; flooders: {results}"
    )
    print(summary)
    assert logged_total <= attempts + left_open, summary
    assert all(r["accepted"] == 0 for r in results), summary
    assert not [r for r in backend.requests() if "flood-leak" in r], backend.requests()
    assert flood_refused >= 500, summary
    for result in results:
        for mode in FLOOD_MODES:
            assert result["counts"].get(mode, {}).get("refused", 0) >= 10, (mode, summary)
    for reason in ("certificate required", "unknown CA", "handshake timeout"):
        assert logged[reason] >= 10, (reason, summary)
    # the flood went on while the verified client made its requests
    assert during >= 50, summary

    # -- stalled handshakes were closed by the proxy's handshake timeout -------
    for result in results:
        assert result["stall_closed"] >= STALL_BATCH, summary
        assert result["stall_delay_min"] >= HANDSHAKE_TIMEOUT * 0.9, summary
        assert result["stall_delay_max"] <= HANDSHAKE_TIMEOUT + 5, summary
        assert result["stall_open_max_age"] <= HANDSHAKE_TIMEOUT + 5, summary

    # -- no file descriptors left behind ------------------------------------
    wait_for(
        lambda: client_sockets(pid, proxy.port) == 0,
        HANDSHAKE_TIMEOUT + 5,
        "the proxy to close every flood connection",
        interval=0.1,
    )
    wait_for(
        lambda: fd_count(pid) <= fds_before,
        5,
        f"the proxy's file descriptors to return to {fds_before}",
        interval=0.1,
    )

    # Stalled connections this test holds open itself: the proxy, not the
    # client, must end them, and give back their descriptors.
    hello = floodclient.client_hello(floodclient.client_context(ssl.TLSVersion.TLSv1_3))
    held = [stalled_connection(proxy.port, hello) for _ in range(HELD)]
    try:
        opened = time.monotonic()
        wait_for(
            lambda: client_sockets(pid, proxy.port) >= HELD, 5, "the proxy to hold them"
        )
        assert fd_count(pid) >= fds_before + HELD
        wait_for(
            lambda: client_sockets(pid, proxy.port) == 0,
            HANDSHAKE_TIMEOUT + 5,
            "the proxy to close the stalled connections the test holds",
            interval=0.05,
        )
        closed_after = time.monotonic() - opened
        assert closed_after >= HANDSHAKE_TIMEOUT * 0.9, closed_after
        assert fd_count(pid) <= fds_before
        wait_for(
            lambda: all(closed_by_peer(s) for s in held), 5, "the client ends to see the close"
        )
    finally:
        for sock in held:
            sock.close()
    assert proxy.running
