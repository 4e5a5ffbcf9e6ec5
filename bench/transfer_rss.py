#!/usr/bin/env python3
"""
Peak memory of the proxy while a large body streams through it.

Starts the example legacy app and ``twistd -n mtlsproxy`` in front of it (with a throw-away
CA from ``mtlsproxy pki init``), then with curl: uploads SIZE bytes to a backend that reads
at RATE bytes/s (``/upload?rate=``), and downloads SIZE bytes to a client capped at RATE
(``--limit-rate``). Prints the proxy's RSS before and its peak (VmHWM) after each transfer,
and the throughput.

    .venv/bin/python bench/transfer_rss.py --size-mib 1024 --rate-mib 64

Run it from a checkout with mtlsproxy installed in the interpreter's environment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} not listening after {timeout}s")


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rate-mib", type=float, default=64, help="slow side's rate, MiB/s")
    args = parser.parse_args()
    size = args.size_mib << 20
    rate = int(args.rate_mib * (1 << 20))
    work = Path(tempfile.mkdtemp(prefix="mtlsproxy-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run([BIN / "mtlsproxy", "pki", "init", work / "pki"], check=True,
                       stdout=subprocess.DEVNULL)
        app_port, proxy_port = free_port(), free_port()
        app = subprocess.Popen([sys.executable, ROOT / "examples" / "legacy_app.py",
                                "--listen", f"127.0.0.1:{app_port}"], stdout=subprocess.DEVNULL)
        procs.append(app)
        wait_port(app_port, app)
        proxy = subprocess.Popen(
            [BIN / "twistd", "-n", "--pidfile=", "mtlsproxy",
             "--listen", f"tcp:{proxy_port}:interface=127.0.0.1",
             "--backend", f"http://127.0.0.1:{app_port}",
             "--cert", "pki/server-cert.pem", "--key", "pki/server-key.pem",
             "--ca", "pki/ca-cert.pem"],
            cwd=work, stdout=open(work / "proxy.log", "wb"), stderr=subprocess.STDOUT,
        )
        procs.append(proxy)
        wait_port(proxy_port, proxy)
        curl = ["curl", "-sS", "--fail", "--cacert", "pki/ca-cert.pem",
                "--cert", "pki/client-cert.pem", "--key", "pki/client-key.pem"]
        base = f"https://localhost:{proxy_port}"
        print(f"proxy RSS at start: {status_kib(proxy.pid, 'VmRSS') / 1024:.1f} MiB")

        for name, upload, cmd in [
            ("upload to a backend reading at", True, curl + [
                "-T", "-", "-H", "Content-Type: application/octet-stream",
                f"{base}/upload?rate={rate}", "-o", "/dev/null"]),
            ("download to a client reading at", False, curl + [
                "--limit-rate", str(rate), f"{base}/download?bytes={size}", "-o", "/dev/null"]),
        ]:
            reset_peak(proxy.pid)
            before = status_kib(proxy.pid, "VmRSS")
            started = time.monotonic()
            if upload:
                source = subprocess.Popen(["head", "-c", str(size), "/dev/zero"],
                                          stdout=subprocess.PIPE)
                subprocess.run(cmd, stdin=source.stdout, cwd=work, check=True)
                source.wait()
            else:
                subprocess.run(cmd, cwd=work, check=True)
            elapsed = time.monotonic() - started
            peak = status_kib(proxy.pid, "VmHWM")
            print(f"{args.size_mib} MiB {name} {args.rate_mib:g} MiB/s: "
                  f"{args.size_mib / elapsed:.1f} MiB/s, proxy RSS before {before / 1024:.1f} MiB, "
                  f"peak {peak / 1024:.1f} MiB (growth {(peak - before) / 1024:.1f} MiB)")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
