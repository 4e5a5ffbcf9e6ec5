#!/usr/bin/env python3
"""
mtlsproxy against nginx, HAProxy, a hand-written twisted.web proxy and no proxy at all.

    .venv/bin/python bench/run.py [--rounds 3] [--quick] [--output docs/performance.md]

Installs nothing: nginx, haproxy, ab (apache2-utils), openssl, taskset (util-linux) and curl
must be on PATH (`bash bench/setup.sh` installs them). Run with the virtualenv's Python, in
which mtlsproxy is installed. Not part of CI.

What it does, all on 127.0.0.1, in a temporary directory removed at the end:

- certificates with `mtlsproxy pki init` (EC P-256), and an RSA-4096 server key from
  `mtlsproxy pki init --key-type rsa4096` for the handshake figure;
- bench/backend.py (the application) pinned to CPU 1;
- every round, fresh instances, each an mTLS proxy in front of that backend, pinned to CPU 0:
  mtlsproxy (`twistd -n mtlsproxy`), nginx, HAProxy, "twisted-naive" (bench/naive_proxy.py),
  plus "direct" (the backend itself, plain HTTP: the ceiling); each with its generated
  configuration in the temporary directory;
- the load (ab, bench/loadgen.py, curl, openssl s_time) pinned to CPU 1;
- for each figure, every proxy in turn (A B C D E), and all that `--rounds` times; reports the
  median and min-max per figure, the proxy's CPU use during each run (utime+stime of its
  process tree per wall second, /proc/PID/stat), each figure per proxy CPU-second, and each
  figure as a ratio to nginx in the same round;
- then `--workers 2` against one worker (and nginx with 2 workers), everything on both CPUs;
- records, for every measurement, the CPU that processes it did not start used meanwhile
  (a shared machine), waits for them (--wait-quiet, and a few seconds per measurement) and
  runs a disturbed measurement once more;
- writes the report to --output (docs/performance.md unless --quick) and prints it.

mtlsproxy runs from a copy of mtlsproxy/ taken at start (or from `git archive REF` with
--ref), so edits made to the tree during the run do not mix two versions into one report.
`--serve` only starts the backend and the proxies as the benchmark does, for poking at them.
Everything it starts is stopped at the end, also on Ctrl-C, SIGTERM or an error; every load
run is bounded in time and in count.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import hashlib
import json
import os
import platform
import re
import selectors
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BIN = Path(sys.executable).parent
HZ = os.sysconf("SC_CLK_TCK")
PROXY_CPU = "0"
LOAD_CPU = "1"
MIB = 1 << 20
NPROC = "?"
# Other users of the machine (tests, profilers) distort a measurement: wait until they use
# less than QUIET_FOREIGN cores before one, and run it again if they took RETRY_FOREIGN.
QUIET_FOREIGN = 0.2
RETRY_FOREIGN = 0.3

TOOLS = {  # command: Debian package
    "nginx": "nginx",
    "haproxy": "haproxy",
    "ab": "apache2-utils",
    "openssl": "openssl",
    "taskset": "util-linux",
    "curl": "curl",
}

# The proxies of the main comparison, in the order each figure runs them.
PROXIES = ["direct", "nginx", "haproxy", "mtlsproxy", "twisted-naive"]
TLS_PROXIES = [p for p in PROXIES if p != "direct"]
# The workers comparison: every process on both cores.
WORKER_SET = ["nginx-2w", "mtlsproxy-1w", "mtlsproxy-2w"]


@dataclass
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool = True
    per_cpu: bool = True  # meaningful divided by the proxy's CPU use
    who: tuple[str, ...] = tuple(PROXIES)
    digits: int = 0


FIGURES = [
    Figure("ka_rps", "keep-alive, small responses (`ab -k -c 32`, HTTP/1.0)", "req/s"),
    Figure("ka_p99", "  p99 latency of the same run", "ms", False, False, digits=1),
    Figure("h11_rps", "keep-alive, small responses (bench/loadgen.py, HTTP/1.1, 32 conn.)",
           "req/s"),
    Figure("h11_p99", "  p99 latency of the same run", "ms", False, False, digits=1),
    Figure("new_rps", "new TLS connection per request (`ab -c 32`)", "req/s"),
    Figure("big_mibps", "64 KiB responses (`ab -k -c 32 ?bytes=65536`)", "MiB/s"),
    Figure("down_mibps", "1 GiB download (curl, one connection)", "MiB/s"),
    Figure("down_rss", "  proxy peak RSS during the download", "MiB", False, False),
    Figure("up_mibps", "1 GiB upload (curl -T, one connection)", "MiB/s"),
    Figure("up_rss", "  proxy peak RSS during the upload", "MiB", False, False),
    Figure("hs_ec", "full handshakes, P-256 server key (`s_time -new`, one client)", "conn/s",
           who=tuple(TLS_PROXIES)),
    Figure("hs_rsa", "full handshakes, RSA-4096 server key (`s_time -new`, one client)", "conn/s",
           who=tuple(TLS_PROXIES)),
    Figure("hs_ec_www", "full handshake + one HTTP/1.0 request, P-256 "
           "(`s_time -new -www /`)", "conn/s", who=tuple(TLS_PROXIES)),
    Figure("hs_reuse_www", "resumed handshake + one HTTP/1.0 request, P-256 "
           "(`s_time -reuse -www /`)", "conn/s", who=tuple(TLS_PROXIES)),
    Figure("idle_mib", "RSS per 1,000 idle mTLS keep-alive connections", "MiB", False, False,
           who=tuple(TLS_PROXIES), digits=1),
]
WORKER_FIGURES = [
    Figure("w_ka_rps", "keep-alive, small responses (`ab -k -c 32`), both cores", "req/s",
           who=tuple(WORKER_SET)),
    Figure("w_new_rps", "new TLS connection per request (`ab -c 32`), both cores", "req/s",
           who=tuple(WORKER_SET)),
]
MACHINE_FIGURES = [
    Figure("speed_ec", "P-256 signatures per CPU-second, system OpenSSL (`openssl speed "
           "ecdsap256`: nginx, HAProxy)", "/s", who=()),
    Figure("speed_py_ec", "P-256 signatures per CPU-second, pyOpenSSL's OpenSSL (through "
           "`cryptography`, with Python's call overhead: mtlsproxy, twisted-naive)", "/s",
           who=()),
    Figure("speed_rsa", "RSA-4096 signatures per CPU-second, system OpenSSL (`openssl speed "
           "rsa4096`)", "/s", who=()),
    Figure("speed_py_rsa", "RSA-4096 signatures per CPU-second, pyOpenSSL's OpenSSL", "/s",
           who=()),
]
ALL_FIGURES = {f.key: f for f in FIGURES + WORKER_FIGURES + MACHINE_FIGURES}


@dataclass
class Settings:
    rounds: int
    quick: bool
    duration: float  # seconds per load run
    s_time: int  # seconds per s_time run
    transfer: int  # bytes per upload/download
    idle: int  # idle connections
    ab_max: int  # requests at most per ab run
    retries: int  # measurements run again because of foreign load, at most, per run


# --------------------------------------------------------------------------- processes


class Processes:
    """Everything started, so that everything is stopped (also on Ctrl-C and errors)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
        """SIGTERM to the process group it leads (its workers too), SIGKILL if it lingers."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # Children that outlived a leader which exited on its own.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def run_tool(argv: list[str], timeout: float, cwd: Path | None = None,
             stdin: Any = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    """A bounded load tool: killed (with its process group) after `timeout` seconds."""
    proc = subprocess.Popen(argv, cwd=cwd, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited with {proc.returncode}:\n{tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"port {port} not listening after {timeout}s:\n{tail(log)}")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------- /proc


Snapshot = dict[int, tuple[int, int, int]]  # pid -> (ppid, own ticks, waited children's ticks)


def snapshot() -> Snapshot:
    """Every process's parent and CPU ticks (utime+stime of all its threads; and
    cutime+cstime, its children that ended and were waited for), from /proc/PID/stat."""
    out: Snapshot = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2 :].split()
        out[int(entry.name)] = (int(f[1]), int(f[11]) + int(f[12]), int(f[13]) + int(f[14]))
    return out


def descendants(snap: Snapshot, pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for p, (ppid, _, _) in snap.items():
        kids.setdefault(ppid, []).append(p)
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(kids.get(p, []))
    return out


def tree(pid: int) -> list[int]:
    return sorted(descendants(snapshot(), pid))


def status_kib(pid: int, name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_kib(pid: int, name: str = "VmRSS") -> int:
    return sum(status_kib(p, name) for p in tree(pid))


def reset_peak(pid: int) -> None:
    for p in tree(pid):
        with contextlib.suppress(OSError):
            Path(f"/proc/{p}/clear_refs").write_text("5")  # VmHWM := VmRSS


def machine_busy() -> int:
    """Busy ticks of all CPUs (user, nice, system, irq, softirq), from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return v[0] + v[1] + v[2] + v[5] + v[6]


def waited_ticks() -> float:
    t = os.times()
    return (t.children_user + t.children_system) * HZ


class Meter:
    """
    The CPU a proxy's process tree uses between start and stop, in cores (1.0: one CPU busy
    the whole time), and the CPU that processes this run did not start used meanwhile
    ("foreign": other users of the machine), from /proc.

    Foreign use is what those processes used themselves, plus what their children that
    ended meanwhile used (cutime+cstime, which also holds what such a child used before the
    measurement began, so that part is capped by the machine's busy time not spent by this
    run, from /proc/stat).
    """

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.snap = snapshot()
        self.busy = machine_busy()
        self.waited = waited_ticks()
        self.t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        end = snapshot()
        busy = machine_busy() - self.busy
        used = 0
        if self.pid:
            for p in descendants(self.snap, self.pid) | descendants(end, self.pid):
                if p in end:
                    used += end[p][1] - self.snap.get(p, (0, 0, 0))[1]
        ours_pids = descendants(self.snap, os.getpid()) | descendants(end, os.getpid())
        ours = waited_ticks() - self.waited
        own = kids = 0
        for p, (_, o, k) in end.items():
            _, o0, k0 = self.snap.get(p, (0, 0, 0))
            if p in ours_pids:
                ours += o - o0
            else:
                own += o - o0
                kids += k - k0
        foreign = max(own, min(own + kids, busy - ours))
        return {"wall": wall, "cores": used / HZ / wall if wall else 0.0,
                "foreign": foreign / HZ / wall if wall else 0.0}


def foreign_top(window: float = 2.0, n: int = 5) -> tuple[float, list[str]]:
    """Cores used by processes this run did not start over `window` seconds, and the
    busiest of them."""
    a = snapshot()
    time.sleep(window)
    b = snapshot()
    ours = descendants(a, os.getpid()) | descendants(b, os.getpid())
    use = []
    for p, (_, own, kids) in b.items():
        if p in ours:
            continue
        _, own0, kids0 = a.get(p, (0, 0, 0))
        use.append(((own - own0 + kids - kids0) / HZ / window, p))
    use.sort(reverse=True)
    total = sum(u for u, _ in use)
    top = []
    for u, p in use[:n]:
        if u < 0.02:
            break
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:110]
        except OSError:
            cmd = "?"
        top.append(f"{u:.2f} cores: pid {p} {cmd}")
    return total, top


def wait_for_quiet(limit: float, window: float = 0.4,
                   max_wait: float = 2.0) -> tuple[float, bool]:
    """
    Wait (at most max_wait seconds) until other users of the machine use less than `limit`
    cores over `window` seconds; return how long we waited, and whether it got quiet.
    """
    t0 = time.monotonic()
    while True:
        m = Meter(None)
        time.sleep(window)
        if m.stop()["foreign"] < limit:
            return time.monotonic() - t0, True
        if time.monotonic() - t0 >= max_wait:
            return time.monotonic() - t0, False


# --------------------------------------------------------------------------- set-up


def check_tools() -> None:
    missing = {tool: pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None}
    if missing:
        pkgs = " ".join(sorted(set(missing.values())))
        sys.exit(f"bench/run.py: missing {', '.join(missing)}; install them with\n"
                 f"    apt-get install -y {pkgs}\n(or: bash bench/setup.sh)")
    if os.cpu_count() is None or len(os.sched_getaffinity(0)) < 2:
        sys.exit("bench/run.py: needs two CPUs (0 for the proxy, 1 for the load)")
    if not (BIN / "twistd").exists() or not (BIN / "mtlsproxy").exists():
        sys.exit(f"bench/run.py: no twistd/mtlsproxy next to {sys.executable}; "
                 "run it with .venv/bin/python")


@dataclass
class Pki:
    dir: Path
    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    client_pem: Path  # cert + key, for ab -E
    haproxy_pem: Path  # server cert + key, for haproxy's crt


def make_pki(work: Path, name: str, key_type: str) -> Pki:
    d = work / name
    subprocess.run([str(BIN / "mtlsproxy"), "pki", "init", str(d), "--key-type", key_type],
                   check=True, stdout=subprocess.DEVNULL)
    pki = Pki(d, d / "ca-cert.pem", d / "server-cert.pem", d / "server-key.pem",
              d / "client-cert.pem", d / "client-key.pem", d / "client.pem", d / "haproxy.pem")
    pki.client_pem.write_text(pki.client_cert.read_text() + pki.client_key.read_text())
    pki.haproxy_pem.write_text(pki.cert.read_text() + pki.key.read_text())
    return pki


def snapshot_mtlsproxy(work: Path, ref: str | None) -> tuple[Path, str]:
    """
    Copy mtlsproxy/ (the working tree's, or `ref`'s through `git archive`) so that a run uses
    one version of it, whatever is edited meanwhile; return (PYTHONPATH, description).
    """
    snap = work / "snapshot"
    snap.mkdir()
    if ref:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "mtlsproxy"],
                                 capture_output=True, check=False)
        if archive.returncode:
            raise BenchError(f"git archive {ref}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(snap)], input=archive.stdout, check=True)
    else:
        shutil.copytree(ROOT / "mtlsproxy", snap / "mtlsproxy",
                        ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for path in sorted((snap / "mtlsproxy").rglob("*.py")):
        digest.update(path.relative_to(snap).as_posix().encode() + b"\0" + path.read_bytes())
    out = subprocess.run([sys.executable, "-c", "import mtlsproxy; print(mtlsproxy.__file__)"],
                         env={**os.environ, "PYTHONPATH": str(snap)}, cwd=work,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not out.startswith(str(snap)):
        raise BenchError(f"the snapshot of mtlsproxy/ is not what gets imported ({out})")
    if ref:
        desc = f"`git archive {ref}`, commit {git('rev-parse', '--short', ref + '^{commit}')}"
    else:
        dirty = git("status", "--porcelain", "--", "mtlsproxy")
        desc = f"working tree at commit {git('rev-parse', '--short', 'HEAD')}" + (
            f" plus uncommitted changes to mtlsproxy/ ({len(dirty.splitlines())} files)"
            if dirty else "")
    return snap, desc + f"; sha256 of mtlsproxy/**.py as run: {digest.hexdigest()[:16]}"


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


@dataclass
class Instance:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    tls: bool = True
    tls_desc: str = ""

    def url(self, path: str = "/") -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"


class Lab:
    """The certificates, the backend and the proxies of one run."""

    def __init__(self, work: Path, procs: Processes, settings: Settings,
                 ref: str | None) -> None:
        self.work = work
        self.procs = procs
        self.settings = settings
        self.ec = make_pki(work, "pki-ec", "ec")
        self.rsa = make_pki(work, "pki-rsa", "rsa4096")
        self.snapshot, self.code = snapshot_mtlsproxy(work, ref)
        self.backend_port = free_port()
        self.backend = self._start_backend(self.backend_port, LOAD_CPU, "backend")
        self.backend_both_port = 0  # the backend of the workers comparison
        self.tls_desc: dict[str, str] = {}  # proxy -> negotiated protocol and cipher
        self.busy_starts: list[tuple[str, float, list[str]]] = []
        self.waited = 0.0  # seconds spent waiting for other processes (--wait-quiet)
        self.upload_file = work / "upload.bin"
        with open(self.upload_file, "wb") as f:  # sparse: reads as zeros, costs no disk
            f.truncate(settings.transfer)
        self.counter = 0

    def _start_backend(self, port: int, cpus: str, name: str) -> subprocess.Popen[bytes]:
        log = self.work / f"{name}.log"
        proc = self.procs.start(["taskset", "-c", cpus, sys.executable,
                                 str(BENCH / "backend.py"), "--port", str(port)], log)
        wait_port(port, proc, log)
        return proc

    def start_backend_both_cores(self) -> int:
        port = free_port()
        self._start_backend(port, "0,1", "backend-both")
        return port

    def _dir(self, name: str) -> Path:
        self.counter += 1
        d = self.work / f"{self.counter:03d}-{name}"
        d.mkdir()
        return d

    def start(self, name: str, pki: Pki | None = None, cpus: str = PROXY_CPU,
              backend_port: int | None = None, workers: int = 1) -> Instance:
        """One instance of a proxy; `pki` gives the server key (the client CA is always EC's)."""
        pki = pki or self.ec
        backend_port = backend_port or self.backend_port
        if name == "direct":
            return Instance(name, backend_port, self.backend, self.work / "backend.log", False)
        d = self._dir(name)
        port = free_port()
        log = d / "out.log"
        pin = ["taskset", "-c", cpus]
        env = None
        if name == "mtlsproxy":
            argv = pin + [str(BIN / "twistd"), "-n", "--pidfile=", "mtlsproxy",
                          "--listen", f"tcp:{port}:interface=127.0.0.1",
                          "--backend", f"http://127.0.0.1:{backend_port}",
                          "--cert", str(pki.cert), "--key", str(pki.key),
                          "--ca", str(self.ec.ca), "--workers", str(workers)]
            env = {**os.environ, "PYTHONPATH": str(self.snapshot)}
        elif name == "nginx":
            conf = d / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=d, port=port, backend=backend_port,
                                              cert=pki.cert, key=pki.key, ca=self.ec.ca,
                                              workers=workers))
            argv = pin + ["nginx", "-p", str(d), "-c", str(conf)]
        elif name == "haproxy":
            conf = d / "haproxy.cfg"
            conf.write_text(HAPROXY_CONF.format(port=port, backend=backend_port,
                                                pem=pki.haproxy_pem, ca=self.ec.ca,
                                                threads=workers))
            argv = pin + ["haproxy", "-db", "-f", str(conf)]
        elif name == "twisted-naive":
            argv = pin + [sys.executable, str(BENCH / "naive_proxy.py"), "--port", str(port),
                          "--backend-port", str(backend_port), "--cert", str(pki.cert),
                          "--key", str(pki.key), "--ca", str(self.ec.ca)]
        else:
            raise ValueError(name)
        proc = self.procs.start(argv, log, cwd=d, env=env)
        wait_port(port, proc, log)
        inst = Instance(name, port, proc, log)
        self.check(inst)
        return inst

    def check(self, inst: Instance) -> None:
        """One request with the client certificate must reach the backend."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(self.ec.ca))
        ctx.load_verify_locations(str(self.rsa.ca))
        ctx.load_cert_chain(str(self.ec.client_cert), str(self.ec.client_key))
        last: Exception | None = None
        for _ in range(50):
            try:
                with socket.create_connection(("127.0.0.1", inst.port), 5) as raw, \
                        ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    data = b""
                    while chunk := s.recv(65536):
                        data += chunk
                    if data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok\n"):
                        cipher = s.cipher()
                        inst.tls_desc = f"{s.version()} {cipher[0] if cipher else '?'}"
                        return
                    last = BenchError(f"unexpected answer {data[:200]!r}")
            except OSError as e:
                last = e
            time.sleep(0.1)
        raise BenchError(f"{inst.name} does not forward a request: {last}\n{tail(inst.log)}")


NGINX_CONF = """\
# generated by bench/run.py
daemon off;
master_process on;
user root;
worker_processes {workers};
worker_rlimit_nofile 16384;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
    keepalive_timeout 60s;
    keepalive_requests 1000000;
    client_max_body_size 0;
    map $ssl_client_s_dn $ssl_client_s_dn_cn {{
        default "";
        ~(^|,)CN=(?<cn>[^,]+) $cn;
    }}
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Client-Cert-CN $ssl_client_s_dn_cn;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            # stream both ways, as mtlsproxy does: no request spooling, no temp files
            proxy_request_buffering off;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""

HAPROXY_CONF = """\
# generated by bench/run.py
global
    maxconn 8000
    nbthread {threads}
    log stdout format raw local0
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode http
    log global
    option httplog
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 60s
    timeout http-keep-alive 60s
frontend fe
    bind 127.0.0.1:{port} ssl crt {pem} ca-file {ca} verify required
    http-request del-header X-Client-Cert-CN
    http-request set-header X-Client-Cert-CN %[ssl_c_s_dn(cn)]
    http-request set-header X-Forwarded-Proto https
    option forwardfor
    default_backend be
backend be
    http-reuse always
    server app 127.0.0.1:{backend}
"""


# --------------------------------------------------------------------------- measurements


@dataclass
class Result:
    value: float | None
    cores: float | None = None  # the proxy's CPU use, cores (1.0 = one core busy)
    foreign: float | None = None  # cores used meanwhile by processes this run did not start
    note: str = ""
    problem: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def parse_ab(out: str) -> dict[str, float]:
    def num(pattern: str, default: float = 0.0) -> float:
        m = re.search(pattern, out, re.M)
        return float(m.group(1)) if m else default

    return {
        "time": num(r"^Time taken for tests:\s+([\d.]+)"),
        "complete": num(r"^Complete requests:\s+(\d+)"),
        "failed": num(r"^Failed requests:\s+(\d+)"),
        "non2xx": num(r"^Non-2xx responses:\s+(\d+)"),
        "keepalive": num(r"^Keep-Alive requests:\s+(\d+)"),
        "rps": num(r"^Requests per second:\s+([\d.]+)"),
        "html": num(r"^HTML transferred:\s+(\d+)"),
    }


class Runner:
    def __init__(self, lab: Lab, s: Settings) -> None:
        self.lab = lab
        self.s = s
        self.ec = lab.ec
        self.retries = s.retries

    def measured(self, inst: Instance, fn: Callable[[], Result], retry: bool = True) -> Result:
        """
        Run fn with the proxy's CPU metered, after waiting for the machine to be quiet; once
        more if other users of the machine took more than RETRY_FOREIGN cores meanwhile
        (then the run with less foreign load counts).
        """
        best: Result | None = None
        while True:
            waited, _ = wait_for_quiet(QUIET_FOREIGN)
            meter = Meter(inst.proc.pid)
            res = fn()
            m = meter.stop()
            res.cores, res.foreign = m["cores"], m["foreign"]
            res.extra["quiet_wait"] = round(waited, 1)
            if inst.proc.poll() is not None:
                res.problem += f" {inst.name} exited with {inst.proc.returncode}"
            if best is not None:
                note = (f"run twice: {best.foreign:.2f} then {res.foreign:.2f} "
                        f"foreign cores")
                if res.foreign < (best.foreign or 0):
                    best = res
                best.extra["retried"] = note
                return best
            best = res
            if not retry or res.foreign < RETRY_FOREIGN or self.retries <= 0:
                return best
            # A burst (a test run) is over in seconds; a fuzzer or a build is not, and
            # running again beside it would only double the time: then keep this run.
            if not wait_for_quiet(QUIET_FOREIGN, max_wait=10)[1]:
                best.extra["retried"] = "not run again: the other load went on"
                return best
            self.retries -= 1

    def ab(self, inst: Instance, keepalive: bool, path: str = "/", pin: bool = True,
           n: int | None = None) -> tuple[dict[str, float], str, Result]:
        csv_path = self.lab.work / "ab-percentiles.csv"
        argv = (["taskset", "-c", LOAD_CPU] if pin else []) + [
            "ab", "-r", "-c", "32", "-t", f"{self.s.duration:g}", "-n", str(n or self.s.ab_max),
            "-e", str(csv_path)]
        if keepalive:
            argv.append("-k")
        if inst.tls:
            argv += ["-E", str(self.ec.client_pem)]
        argv.append(inst.url(path))
        p = run_tool(argv, self.s.duration + 60)
        r = parse_ab(p.stdout)
        res = Result(None)
        problems = []
        if p.returncode != 0:
            problems.append(f"ab exit status {p.returncode}: {p.stderr.strip()[-300:]}")
        if r["complete"] == 0:
            problems.append("no request completed")
        if r["failed"]:
            m = re.search(r"^Failed requests:.*\n\s*\((.*)\)", p.stdout, re.M)
            problems.append(f"{r['failed']:.0f} failed requests of {r['complete']:.0f}"
                            + (f" ({m.group(1)})" if m else ""))
        if r["non2xx"]:
            problems.append(f"{r['non2xx']:.0f} non-2xx responses of {r['complete']:.0f}")
        errs = [ln for ln in p.stderr.splitlines() if ln.strip() and "Completed" not in ln
                and "Finished" not in ln and "Benchmarking" not in ln]
        if errs and p.returncode == 0:
            problems.append("ab stderr: " + " | ".join(errs[-3:])[:300])
        res.problem = "; ".join(problems)
        if keepalive and r["complete"]:
            res.extra["keepalive_share"] = round(r["keepalive"] / r["complete"], 3)
            if r["keepalive"] < 0.9 * r["complete"]:
                res.note = f"only {r['keepalive']:.0f} of {r['complete']:.0f} kept alive"
        res.extra["complete"] = r["complete"]
        p99 = float("nan")
        with contextlib.suppress(OSError, ValueError, IndexError):
            rows = list(csv.reader(open(csv_path)))
            p99 = float(next(row[1] for row in rows[1:] if row[0] == "99"))
        res.extra["p99"] = p99
        return r, p.stdout, res

    # one function per figure; each returns a Result for `inst`

    def ka(self, inst: Instance) -> dict[str, Result]:
        def go() -> Result:
            r, _, res = self.ab(inst, True)
            res.value = r["rps"] or None
            return res

        res = self.measured(inst, go)
        return {"ka_rps": res, "ka_p99": Result(res.extra.get("p99"), note=res.note)}

    def h11(self, inst: Instance) -> dict[str, Result]:
        def go() -> Result:
            argv = ["taskset", "-c", LOAD_CPU, sys.executable, str(BENCH / "loadgen.py"),
                    inst.url(), "-c", "32", "-t", f"{self.s.duration:g}",
                    "-n", str(self.s.ab_max)]
            if inst.tls:
                argv += ["--cert", str(self.ec.client_cert), "--key", str(self.ec.client_key)]
            p = run_tool(argv, self.s.duration + 120)
            try:
                out = json.loads(p.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                return Result(None, problem=f"loadgen failed ({p.returncode}): "
                              f"{p.stderr.strip()[-300:]}")
            res = Result(out["rps"] or None, extra=out)
            res.extra["p99"] = out["p99_ms"]
            problems = []
            if out["non2xx"]:
                problems.append(f"{out['non2xx']} non-2xx of {out['requests']}")
            if out["errors"]:
                problems.append(f"{out['errors']} connection errors")
            res.problem = "; ".join(problems)
            if out["reconnects"] > out["requests"] * 0.1:
                res.note = f"{out['reconnects']} reconnects for {out['requests']} requests"
            return res

        res = self.measured(inst, go)
        return {"h11_rps": res, "h11_p99": Result(res.extra.get("p99"), note=res.note)}

    def new(self, inst: Instance) -> dict[str, Result]:
        def go() -> Result:
            r, _, res = self.ab(inst, False)
            res.value = r["rps"] or None
            return res
        return {"new_rps": self.measured(inst, go)}

    def big(self, inst: Instance) -> dict[str, Result]:
        def go() -> Result:
            r, _, res = self.ab(inst, True, "/?bytes=65536")
            # ab's "HTML transferred" also counts the responses in flight at the time limit
            res.value = r["complete"] * 65536 / r["time"] / MIB if r["time"] else None
            extra = r["html"] - r["complete"] * 65536
            if r["complete"] and not 0 <= extra <= 32 * 65536:
                res.problem += f" {r['html']:.0f} body bytes for {r['complete']:.0f} responses"
            return res
        return {"big_mibps": self.measured(inst, go)}

    def curl(self, inst: Instance, upload: bool) -> dict[str, Result]:
        size = self.s.transfer
        key = "up" if upload else "down"

        def go() -> Result:
            argv = ["taskset", "-c", LOAD_CPU, "curl", "-sS", "-o", "/dev/null",
                    "--max-time", "120", "-w", "%{http_code} %{size_upload} "
                    "%{size_download} %{time_total}"]
            if inst.tls:
                argv += ["--cacert", str(self.ec.ca), "--cert", str(self.ec.client_cert),
                         "--key", str(self.ec.client_key)]
            if upload:
                argv += ["-T", str(self.lab.upload_file), "-H", "Expect:", inst.url("/upload")]
            else:
                argv.append(inst.url(f"/download?bytes={size}"))
            p = run_tool(argv, 150)
            parts = p.stdout.split()
            if p.returncode != 0 or len(parts) != 4:
                return Result(None, problem=f"curl exit {p.returncode}: {p.stderr.strip()[-300:]}")
            code, up, down, total = int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3])
            moved = up if upload else down
            res = Result(moved / total / MIB if total else None)
            if code != 200:
                res.problem = f"HTTP status {code}"
            if moved != size:
                res.problem += f" moved {moved:.0f} of {size} bytes"
            return res

        pid = inst.proc.pid
        reset_peak(pid)
        before = tree_kib(pid)
        res = self.measured(inst, go)
        peak = tree_kib(pid, "VmHWM")
        res.extra["rss_before_mib"] = before / 1024
        if inst.name == "direct":
            return {f"{key}_mibps": res}
        return {f"{key}_mibps": res,
                f"{key}_rss": Result(peak / 1024, note=f"before {before / 1024:.0f} MiB")}

    def s_time(self, inst: Instance, mode: str, www: bool) -> Result:
        """
        Connections per second of one `openssl s_time` client. With `www`, each connection
        also sends `GET / HTTP/1.0` and reads the answer to the end: needed for resumption,
        as a TLS 1.3 session ticket only arrives after the handshake.
        """
        def go() -> Result:
            argv = ["taskset", "-c", LOAD_CPU, "openssl", "s_time", "-connect",
                    f"127.0.0.1:{inst.port}", mode, "-time", str(self.s.s_time),
                    "-cert", str(self.ec.client_cert), "-key", str(self.ec.client_key)]
            if www:
                argv += ["-www", "/"]
            t0 = time.monotonic()
            p = run_tool(argv, self.s.s_time + 60)
            wall = time.monotonic() - t0  # s_time's own "real seconds" are whole seconds
            m = re.search(r"^(\d+) connections in (\d+) real seconds", p.stdout, re.M)
            if not m:
                return Result(None, problem=f"s_time {mode} ({p.returncode}): "
                              f"{(p.stdout + p.stderr).strip()[-300:]}")
            res = Result(int(m.group(1)) / wall)
            # one character per connection: 'r' when the session was resumed
            marks = "".join(re.findall(r"^[r*t3]+$", p.stdout, re.M))
            reused = marks.count("r")
            res.extra["resumed"] = f"{reused}/{len(marks)}"
            if mode == "-reuse" and reused < 0.9 * len(marks):
                res.note = f"only {reused} of {len(marks)} connections resumed"
            if www:
                per = re.search(r"real seconds, (\d+) bytes read per connection", p.stdout)
                if per and int(per.group(1)) == 0:
                    res.problem = "no response bytes read"
            return res
        return self.measured(inst, go)

    def idle(self, inst: Instance) -> dict[str, Result]:
        """RSS growth while N keep-alive connections (one request each) sit idle."""
        pid = inst.proc.pid
        # Warm up: the first connections and requests allocate what every later one reuses.
        run_tool(["taskset", "-c", LOAD_CPU, sys.executable, str(BENCH / "loadgen.py"),
                  inst.url(), "-c", "8", "-t", "2", "-n", "400",
                  "--cert", str(self.ec.client_cert), "--key", str(self.ec.client_key)], 60)
        time.sleep(1)
        before = tree_kib(pid)
        proc = subprocess.Popen(
            ["taskset", "-c", LOAD_CPU, sys.executable, str(BENCH / "loadgen.py"), inst.url(),
             "--hold", str(self.s.idle), "--hold-seconds", "120",
             "--cert", str(self.ec.client_cert), "--key", str(self.ec.client_key)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        try:
            line = ""
            deadline = time.monotonic() + 120
            assert proc.stdout is not None
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline and not line:
                if sel.select(1):
                    line = proc.stdout.readline()
                    if not line:
                        break
            if not line.startswith("ready"):
                proc.kill()
                _, err = proc.communicate(timeout=10)
                return {"idle_mib": Result(None, problem=f"idle connections: {err[-300:]}")}
            time.sleep(2)
            after = tree_kib(pid)
            bad = int(line.split()[3])
        finally:
            if proc.poll() is None:
                assert proc.stdin is not None
                proc.stdin.close()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        res = Result((after - before) / 1024 / self.s.idle * 1000,
                     note=f"{before / 1024:.0f} -> {after / 1024:.0f} MiB")
        if bad:
            res.problem = f"{bad} non-2xx answers while opening the connections"
        return {"idle_mib": res}

    def speed(self) -> dict[str, Result]:
        """Signatures per CPU-second on CPU 0: the system's OpenSSL (nginx, HAProxy) and the
        one pyOpenSSL uses (cryptography's own, for mtlsproxy and twisted-naive)."""
        out = {}
        secs = "1" if self.s.quick else "2"
        for key, alg in (("speed_ec", "ecdsap256"), ("speed_rsa", "rsa4096")):
            p = run_tool(["taskset", "-c", PROXY_CPU, "openssl", "speed", "-seconds", secs, alg],
                         120)
            m = re.search(r"^\s*\d+ bits ecdsa \(nistp256\)\s+\S+\s+\S+\s+([\d.]+)", p.stdout,
                          re.M) or re.search(r"^rsa\s+4096 bits\s+\S+\s+\S+\s+([\d.]+)",
                                             p.stdout, re.M)
            out[key] = Result(float(m.group(1)) if m else None,
                              problem="" if m else f"openssl speed {alg}: no figure")
        p = run_tool(["taskset", "-c", PROXY_CPU, sys.executable, "-c", SIGN_SPEED, secs,
                      str(self.ec.key), str(self.lab.rsa.key)], 120)
        ec_rate: float | None
        rsa_rate: float | None
        try:
            ec_rate, rsa_rate = (float(x) for x in p.stdout.split())
        except ValueError:
            ec_rate = rsa_rate = None
        problem = "" if ec_rate else f"cryptography signing: {p.stderr.strip()[-300:]}"
        out["speed_py_ec"] = Result(ec_rate, problem=problem)
        out["speed_py_rsa"] = Result(rsa_rate, problem=problem)
        return out


SIGN_SPEED = """
import sys, time
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
secs = float(sys.argv[1])
rates = []
for path in sys.argv[2:]:
    key = serialization.load_pem_private_key(open(path, "rb").read(), None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        sign = lambda: key.sign(b"x" * 32, ec.ECDSA(hashes.SHA256()))
    else:
        pss = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
        sign = lambda: key.sign(b"x" * 32, pss, hashes.SHA256())
    n, t0, end = 0, time.process_time(), time.monotonic() + secs
    while time.monotonic() < end:
        sign()
        n += 1
    rates.append(n / (time.process_time() - t0))
print(*rates)
"""


# --------------------------------------------------------------------------- the run


Data = dict[int, dict[str, dict[str, Result]]]  # round -> who -> figure -> Result


def one_round(lab: Lab, runner: Runner, rnd: int, data: Data, log: Callable[[str], None]) -> None:
    rd: dict[str, dict[str, Result]] = {}
    data[rnd] = rd
    insts: dict[str, Instance] = {}
    rsa: dict[str, Instance] = {}

    def record(who: str, results: dict[str, Result]) -> None:
        rd.setdefault(who, {}).update(results)
        for k, r in results.items():
            f = ALL_FIGURES[k]
            v = "-" if r.value is None else f"{r.value:,.{f.digits}f}"
            cores = f" cpu {r.cores:.2f}" if r.cores is not None else ""
            flag = f"  PROBLEM: {r.problem.strip()}" if r.problem.strip() else ""
            note = f"  ({r.note})" if r.note else ""
            log(f"  r{rnd} {who:14} {k:10} {v:>12} {f.unit}{cores}{note}{flag}")

    try:
        # Idle connections first, on fresh processes, before load has grown their heaps.
        log(f"round {rnd}: memory per idle connection")
        for name in TLS_PROXIES:
            inst = lab.start(name)
            try:
                record(name, runner.idle(inst))
            finally:
                lab.procs.stop(inst.proc)
        for name in PROXIES:
            insts[name] = lab.start(name)
            if name != "direct":
                rsa[name] = lab.start(name, lab.rsa)
                insts[name].tls_desc = getattr(insts[name], "tls_desc", "")
        lab.tls_desc = {n: getattr(i, "tls_desc", "") for n, i in insts.items()}
        # Warm up each once (imports, first allocations), unmeasured.
        for name in PROXIES:
            run_tool(["taskset", "-c", LOAD_CPU, "ab", "-r", "-k", "-c", "4", "-n", "200"]
                     + (["-E", str(runner.ec.client_pem)] if insts[name].tls else [])
                     + [insts[name].url()], 60)
        steps: list[tuple[str, Callable[[Instance], dict[str, Result]], list[str]]] = [
            ("keep-alive, ab", runner.ka, PROXIES),
            ("keep-alive, HTTP/1.1 loadgen", runner.h11, PROXIES),
            ("new connection per request", runner.new, PROXIES),
            ("64 KiB responses", runner.big, PROXIES),
            # download first: a proxy that held a whole upload in memory may keep that
            # memory, which the download's peak would then show
            ("download", lambda i: runner.curl(i, False), PROXIES),
            ("upload", lambda i: runner.curl(i, True), PROXIES),
            ("full handshakes, P-256", lambda i: {"hs_ec": runner.s_time(i, "-new", False)},
             TLS_PROXIES),
            ("full handshakes and one request, P-256",
             lambda i: {"hs_ec_www": runner.s_time(i, "-new", True)}, TLS_PROXIES),
            ("resumed handshakes and one request, P-256",
             lambda i: {"hs_reuse_www": runner.s_time(i, "-reuse", True)}, TLS_PROXIES),
        ]
        for title, fn, who in steps:
            log(f"round {rnd}: {title}")
            for name in who:
                record(name, fn(insts[name]))
        log(f"round {rnd}: full handshakes, RSA-4096")
        for name in TLS_PROXIES:
            record(name, {"hs_rsa": runner.s_time(rsa[name], "-new", False)})
    finally:
        for inst in list(insts.values()) + list(rsa.values()):
            if inst.name != "direct":
                lab.procs.stop(inst.proc)

    log(f"round {rnd}: workers, every process on both cores")
    wk: dict[str, Instance] = {}
    try:
        port = lab.backend_both_port
        wk["nginx-2w"] = lab.start("nginx", cpus="0,1", backend_port=port, workers=2)
        wk["mtlsproxy-1w"] = lab.start("mtlsproxy", cpus="0,1", backend_port=port, workers=1)
        wk["mtlsproxy-2w"] = lab.start("mtlsproxy", cpus="0,1", backend_port=port, workers=2)
        for inst in wk.values():
            run_tool(["ab", "-r", "-k", "-c", "4", "-n", "200", "-E", str(runner.ec.client_pem),
                      inst.url()], 60)
        for key, keepalive in (("w_ka_rps", True), ("w_new_rps", False)):
            for name in WORKER_SET:
                inst = wk[name]

                def go(inst: Instance = inst, keepalive: bool = keepalive) -> Result:
                    r, _, res = runner.ab(inst, keepalive, pin=False)
                    res.value = r["rps"] or None
                    return res

                record(name, {key: runner.measured(inst, go)})
    finally:
        for inst in wk.values():
            lab.procs.stop(inst.proc)
    log(f"round {rnd}: openssl speed")
    record("machine", runner.speed())


# --------------------------------------------------------------------------- the report


def fmt(v: float | None, digits: int = 0) -> str:
    if v is None or v != v:
        return "-"
    if abs(v) < 10 and digits == 0:
        digits = 1
    return f"{v:,.{digits}f}"


def spread(values: list[float], digits: int = 0) -> str:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med, digits)
    return f"{fmt(med, digits)} ({fmt(min(values), digits)}-{fmt(max(values), digits)})"


def values(data: Data, who: str, key: str, per_cpu: bool = False) -> list[float]:
    out = []
    for rd in data.values():
        r = rd.get(who, {}).get(key)
        if r is None or r.value is None:
            continue
        if per_cpu:
            if not r.cores:
                continue
            out.append(r.value / r.cores)
        else:
            out.append(r.value)
    return out


def ratios(data: Data, who: str, key: str, base: str, per_cpu: bool = False) -> list[float]:
    out = []
    for rd in data.values():
        a, b = rd.get(who, {}).get(key), rd.get(base, {}).get(key)
        if a is None or b is None or a.value is None or not b.value:
            continue
        if per_cpu:
            if not a.cores or not b.cores:
                continue
            out.append((a.value / a.cores) / (b.value / b.cores))
        else:
            out.append(a.value / b.value)
    return out


def ratio_cell(rs: list[float]) -> str:
    if not rs:
        return "-"
    med = statistics.median(rs)
    if len(rs) == 1:
        return f"{med:.2f}"
    return f"{med:.2f} ({min(rs):.2f}-{max(rs):.2f})"


def machine() -> list[str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = status_mem()

    def version(argv: list[str], pattern: str = r"(\S+)") -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        m = re.search(pattern, p.stdout + p.stderr)
        return m.group(1) if m else "?"

    import OpenSSL
    from cryptography.hazmat.backends.openssl.backend import backend as crypto_backend

    import twisted

    linked = OpenSSL.SSL.OpenSSL_version(OpenSSL.SSL.OPENSSL_VERSION).decode()
    nginx = version(["nginx", "-v"], r"nginx/(\S+)")
    haproxy = version(["haproxy", "-v"], r"version (\S+)")
    ab = version(["ab", "-V"], r"Version (\S+)")
    curl = version(["curl", "-V"], r"curl (\S+)")
    system = version(["openssl", "version"], r"(OpenSSL \S+)")
    return [
        f"- CPU: {model}, `nproc` {NPROC}, "
        f"{mem}; kernel {platform.release()}",
        f"- Python {platform.python_version()}, Twisted {twisted.__version__}, "
        f"pyOpenSSL {OpenSSL.__version__} (linked: {linked}; cryptography's: "
        f"{crypto_backend.openssl_version_text()})",
        f"- nginx {nginx}, HAProxy {haproxy}, ab {ab}, curl {curl}; system {system} "
        "(nginx, HAProxy, ab, curl and s_time use it)",
    ]


def status_mem() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB RAM"
    return "? RAM"


def report(data: Data, lab: Lab, s: Settings, command: str, elapsed: float,
           anomalies: list[str], started: datetime.datetime) -> str:
    rounds = len(data)
    out: list[str] = []
    w = out.append
    w("# Performance\n")
    w("mtlsproxy against nginx, HAProxy and a hand-written twisted.web proxy, each one an mTLS "
      "reverse proxy in front of the same backend (`bench/backend.py`), on one machine. "
      "Written by `bench/run.py`; do not edit by hand, run it again:\n")
    w("```sh\nbash bench/setup.sh        # nginx, haproxy, ab, openssl, taskset, curl\n"
      f"{command}\n```\n")
    waited = getattr(lab, "waited", 0.0)
    w(f"Run {started:%Y-%m-%d %H:%M} UTC, {rounds} interleaved round(s), {elapsed / 60:.1f} min "
      "of measuring" + (f" (and {waited / 60:.1f} min waiting for other processes to leave "
                        "the CPUs)" if waited >= 1 else "") + ". "
      f"mtlsproxy: {lab.code}.\n")
    w("## Machine\n")
    out.extend(machine())
    w("")
    w("## How\n")
    tls = sorted({v for v in getattr(lab, "tls_desc", {}).values() if v}) or ["?"]
    w(f"- Each proxy is pinned to CPU 0 (`taskset -c 0`), the load generator and the backend "
      f"to CPU 1. With two cores, the client and the backend share one: a proxy that needs "
      f"less than all of CPU 0 is *not* the bottleneck, and its raw figure is then CPU 1's. "
      f"So each throughput figure is also given per proxy CPU-second: the figure divided by "
      f"the proxy's CPU use during the run (utime+stime of its process tree, from "
      f"`/proc/PID/stat`, per wall second), which is listed too. A proxy well below 1.00 "
      f"core while slower than nginx was *waiting*, not working.\n"
      f"- Each round starts fresh instances of every proxy; within a round each figure is "
      f"measured for every proxy in turn ({', '.join(PROXIES)}), so a ratio to nginx compares "
      f"runs a minute apart at most. Cells: median over rounds (min-max).\n"
      f"- Load runs last {s.duration:g} s (at most {s.ab_max:,} requests) with 32 "
      f"connections; `s_time` runs {s.s_time} s with one client; transfers move "
      f"{s.transfer / MIB:,.0f} MiB each way on one connection; idle memory is measured "
      f"with {s.idle:,} connections.\n"
      "- mtlsproxy: `twistd -n mtlsproxy --listen ... --backend ... --cert ... --key ... "
      "--ca ...`, defaults otherwise (so it forwards all 8 identity headers plus "
      "X-Forwarded-*, and logs each request on stdout, here a file). nginx: 1 worker, "
      "`ssl_verify_client on`, upstream keepalive 64, `proxy_http_version 1.1`, the CN from "
      "`$ssl_client_s_dn` into X-Client-Cert-CN, streaming both ways "
      "(`proxy_request_buffering off`, `proxy_max_temp_file_size 0`), access log to a file. "
      "HAProxy: `nbthread 1`, `ssl crt ... ca-file ... verify required`, `http-reuse always`, "
      "`ssl_c_s_dn(cn)` into X-Client-Cert-CN, `option httplog` on stdout (a file). "
      "twisted-naive: `bench/naive_proxy.py`, twisted.web's `ReverseProxyResource` on a "
      "`Site` over `PrivateCertificate.options(ca)`, the CN added, access log on stdout "
      "(a file). direct: the backend itself, plain HTTP, the ceiling. The configurations "
      f"are `NGINX_CONF` and `HAPROXY_CONF` in `bench/run.py`. Negotiated: {', '.join(tls)}, "
      "P-256 certificates on both sides.\n"
      "- TLS libraries differ: nginx, HAProxy and the clients (ab, curl, s_time) use the "
      "system's OpenSSL; mtlsproxy and twisted-naive use the OpenSSL that `cryptography` "
      "bundles (see *Machine* and *Signing ceiling*), which signs RSA much faster here. The "
      "RSA-4096 row changes only the server key (the client keeps its P-256 certificate), so "
      "it mostly compares those two builds' RSA signing.\n"
      "- `s_time -new` alone is a bare handshake (the client closes at once). Resumption "
      "needs `-www /`: a TLS 1.3 session ticket only arrives after the handshake, so s_time "
      "must read an answer; each connection then also sends `GET / HTTP/1.0` and reads the "
      "answer to the connection's close. The full-handshake `-www /` row is there to "
      "compare it with.\n"
      "- Peak RSS: VmHWM summed over the proxy's processes, reset (`clear_refs`) before "
      "each transfer (the download runs first, the upload after it). Idle memory: RSS "
      "growth of the proxy's processes while "
      f"{s.idle:,} connections, each after one keep-alive request, sit idle, on a fresh "
      "instance warmed up with 400 requests, per 1,000 connections.\n"
      "- The machine may be shared: each measurement also records the CPU used by processes "
      "this run did not start (see *Other load on the machine*).\n")

    w("## Ratio to nginx, same round\n")
    w("Each cell: the median over rounds of (figure / nginx's figure in the same round), "
      "then the min-max over rounds. For ms and MiB lower is better; for the rest higher is.\n")
    others = [p for p in PROXIES if p != "nginx"]
    w("| figure | unit | " + " | ".join(others) + " |")
    w("| --- | --- |" + " --- |" * len(others))
    for f in FIGURES:
        cells = [ratio_cell(ratios(data, p, f.key, "nginx")) if p in f.who else ""
                 for p in others]
        w(f"| {f.label.strip()} | {f.unit} | " + " | ".join(cells) + " |")
    w("")
    w("### The same, per proxy CPU-second\n")
    w("The ratio of (figure / CPU cores the proxy used during the run): what each proxy "
      "does with one CPU-second. This is the figure to read when nginx or HAProxy did not "
      "use their whole core (the load generator and the backend on CPU 1 were the "
      "bottleneck); the raw ratio above then flatters nobody but says little.\n")
    per_cpu = [f for f in FIGURES if f.per_cpu]
    tls_others = [p for p in TLS_PROXIES if p != "nginx"]
    w("| figure | unit | " + " | ".join(tls_others) + " |")
    w("| --- | --- |" + " --- |" * len(tls_others))
    for f in per_cpu:
        cells = [ratio_cell(ratios(data, p, f.key, "nginx", True)) if p in f.who else ""
                 for p in tls_others]
        w(f"| {f.label.strip()} | {f.unit} per CPU-s | " + " | ".join(cells) + " |")
    w("")

    w("### mtlsproxy at a glance (computed from the tables)\n")
    out.extend(glance(data))
    w("")

    w("## Figures\n")
    w("Median over rounds (min-max). Below each throughput, `per CPU`: the figure per second "
      "of the proxy's CPU time, and `cpu`: the proxy's CPU use during the run in cores "
      "(1.00: CPU 0 fully busy).\n")
    w("| figure | unit | " + " | ".join(PROXIES) + " |")
    w("| --- | --- |" + " --- |" * len(PROXIES))
    for f in FIGURES:
        cells = [spread(values(data, p, f.key), f.digits) if p in f.who else ""
                 for p in PROXIES]
        w(f"| {f.label.strip()} | {f.unit} | " + " | ".join(cells) + " |")
        if f.per_cpu:
            cells = [spread(values(data, p, f.key, True)) if p in f.who and p != "direct" else ""
                     for p in PROXIES]
            w(f"| &nbsp;&nbsp;per proxy CPU-second | {f.unit.replace('/s', '')} per CPU-s | "
              + " | ".join(cells) + " |")
            cells = [spread([r.cores for rd in data.values()
                             if (r := rd.get(p, {}).get(f.key)) and r.cores is not None], 2)
                     if p in f.who else "" for p in PROXIES]
            w("| &nbsp;&nbsp;cpu of the proxy (direct: the backend) | cores | "
              + " | ".join(cells) + " |")
    w("")

    w("## Workers\n")
    w("`twistd mtlsproxy --workers 2` against one worker, and nginx with `worker_processes 2`, "
      "with every process (proxy, ab, a second backend) free to use both cores: the load "
      "generator and the backend compete with the proxy, so this understates what a second "
      "core gives.\n")
    w("| figure | unit | " + " | ".join(WORKER_SET) + " | mtlsproxy 2w / 1w | "
      "mtlsproxy-2w / nginx-2w |")
    w("| --- | --- |" + " --- |" * (len(WORKER_SET) + 2))
    for f in WORKER_FIGURES:
        cells = [spread(values(data, p, f.key)) for p in WORKER_SET]
        cells.append(ratio_cell(ratios(data, "mtlsproxy-2w", f.key, "mtlsproxy-1w")))
        cells.append(ratio_cell(ratios(data, "mtlsproxy-2w", f.key, "nginx-2w")))
        w(f"| {f.label} | {f.unit} | " + " | ".join(cells) + " |")
        cells = [spread([r.cores for rd in data.values()
                         if (r := rd.get(p, {}).get(f.key)) and r.cores is not None], 2)
                 for p in WORKER_SET]
        w("| &nbsp;&nbsp;cpu of the proxy | cores | " + " | ".join(cells) + " | | |")
    w("")

    w("## Signing ceiling\n")
    w("| figure | median (min-max) |")
    w("| --- | --- |")
    for f in MACHINE_FIGURES:
        w(f"| {f.label} | {spread(values(data, 'machine', f.key))} |")
    w("")

    # The optimisation log is kept by hand (its figures come from other
    # commands, each named there) and travels with every new table.
    optimisations = BENCH / "optimisations.md"
    if optimisations.exists():
        w(optimisations.read_text().rstrip("\n") + "\n")

    w("## Problems seen\n")
    if anomalies:
        w("Errors, non-2xx answers, failed requests, unusual log lines, and anything else "
          "that the figures above would hide:\n")
        out.extend(f"- {a}" for a in anomalies)
    else:
        w("None: no failed or non-2xx request, no error in any proxy's log.")
    w("")
    measured = [(rnd, who, k, r) for rnd, rd in data.items() for who, figs in rd.items()
                for k, r in figs.items() if r.foreign is not None]
    w("### Other load on the machine\n")
    for when, foreign, top in getattr(lab, "busy_starts", []):
        w(f"{when[0].upper() + when[1:]}, other processes used {foreign:.2f} cores "
          f"(and still did after waiting --wait-quiet seconds): "
          + "; ".join(f"`{t}`" for t in top) + ".\n")
    if measured:
        loaded = [m for m in measured if (m[3].foreign or 0) >= RETRY_FOREIGN]
        retried = [m for m in measured if m[3].extra.get("retried", "").startswith("run twice")]
        kept = [m for m in measured if m[3].extra.get("retried", "").startswith("not run")]
        med = statistics.median(m[3].foreign or 0 for m in measured)
        by_round: dict[int, list[float]] = {}
        for m in measured:
            by_round.setdefault(m[0], []).append(m[3].foreign or 0)
        per_round = ", ".join(f"round {rnd} {statistics.median(v):.2f}"
                              for rnd, v in by_round.items())
        w(f"CPU used by processes this run did not start, during each measurement: median "
          f"{med:.2f} cores ({per_round}). Each measurement waited (up to 2 s) for less than "
          f"{QUIET_FOREIGN} cores of it, and was run a second time if it got "
          f"{RETRY_FOREIGN} or more and the machine was quiet again within 10 s "
          f"({len(retried)} were, the run with less counting; {len(kept)} were not, the "
          f"other load going on). "
          + (f"{len(loaded)} of {len(measured)} measurements still had "
             f"{RETRY_FOREIGN} cores or more: "
             + ", ".join(f"round {r} {who} {k} ({m.foreign:.2f})"
                         for r, who, k, m in loaded[:20])
             + (" ..." if len(loaded) > 20 else "") + "."
             if loaded else f"None of the {len(measured)} kept measurements had that much.")
          + "\n")

    w("<details><summary>Every measurement</summary>\n")
    w("| round | who | figure | value | proxy cpu (cores) | foreign (cores) | note |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    for rnd, rd in data.items():
        for who, figs in rd.items():
            for k, r in figs.items():
                f = ALL_FIGURES[k]
                extras = []
                if "resumed" in r.extra and k.startswith("hs_reuse"):
                    extras.append(f"resumed {r.extra['resumed']}")
                if "retried" in r.extra:
                    extras.append(r.extra["retried"])
                note = "; ".join(x for x in (r.note, r.problem.strip(), *extras) if x)
                cores = "" if r.cores is None else f"{r.cores:.2f}"
                foreign = "" if r.foreign is None else f"{r.foreign:.2f}"
                w(f"| {rnd} | {who} | {k} | {fmt(r.value, f.digits)} {f.unit} | {cores} | "
                  f"{foreign} | {note} |")
    w("\n</details>\n")
    return "\n".join(out)


def owner(log: Path, work: Path) -> str:
    """Which proxy wrote this log: the instance directories are NNN-NAME."""
    if log.parent == work:
        return log.stem
    return log.parent.name.split("-", 1)[1]


STATUS_RES = [
    re.compile(r'"[A-Z]+ \S+ HTTP/\d\.\d" (\d{3}) '),  # mtlsproxy, nginx, twisted.web
    re.compile(r"\] \S+ \S+ [-\d]+/[-\d]+/[-\d]+/[-\d]+/[-\d]+ (-?\d+) "),  # haproxy
]


def glance(data: Data, who: str = "mtlsproxy") -> list[str]:
    """The few sentences a reader wants first, computed, for `who` against nginx."""
    rows: list[tuple[float, Figure, float, float | None, float | None]] = []
    for f in FIGURES:
        if who not in f.who:
            continue
        raw = ratios(data, who, f.key, "nginx")
        if not raw:
            continue
        per_cpu = ratios(data, who, f.key, "nginx", True) if f.per_cpu else []
        used = [r.cores for rd in data.values() if (r := rd.get(who, {}).get(f.key))
                and r.cores is not None]
        good = statistics.median(raw) if f.higher_is_better else 1 / statistics.median(raw)
        rows.append((good, f, statistics.median(raw),
                     statistics.median(per_cpu) if per_cpu else None,
                     statistics.median(used) if used else None))
    if not rows:
        return ["(no data)"]
    out = []
    worst = sorted(rows, key=lambda r: r[0])
    _, f, worst_raw, cpu, cores = worst[0]
    out.append(f"- Furthest from nginx: {f.label.strip()}, {worst_raw:.2f}x nginx's figure"
               + (f" ({cpu:.2f}x per CPU-second, {who} using {cores:.2f} cores)"
                  if cpu is not None and cores is not None else "") + ".")
    per = [r for r in rows if r[3] is not None]
    if per:
        _, f, low_raw, low_cpu, _ = min(per, key=lambda r: r[3] or 0.0)
        out.append(f"- Furthest per CPU-second: {f.label.strip()}, {low_cpu or 0:.2f}x nginx's "
                   f"work per CPU-second (raw {low_raw:.2f}x).")
        _, f, high_raw, high_cpu, _ = max(per, key=lambda r: r[3] or 0.0)
        out.append(f"- Closest per CPU-second: {f.label.strip()}, {high_cpu or 0:.2f}x "
                   f"(raw {high_raw:.2f}x).")
    stalls = [r for r in per if r[2] < 0.7 and r[4] is not None and r[4] < 0.6]
    if stalls:
        out.append("- Slower than nginx while its CPU sat mostly idle (waiting, not working: "
                   "look for latency, e.g. Nagle/delayed-ACK or backpressure stalls): "
                   + "; ".join(f"{f.label.strip()} ({raw:.2f}x nginx, {cores:.2f} cores busy)"
                               for _, f, raw, _, cores in stalls) + ".")
    return out


def scan_logs(work: Path) -> list[str]:
    """
    What the proxies' own logs say, summed over every instance of each: exceptions (by
    message), error lines, refusals by reason, and the access logs' statuses other than 200.
    """
    exceptions: dict[str, dict[str, int]] = {}
    errors: dict[str, dict[str, int]] = {}
    refusals: dict[str, dict[str, int]] = {}
    statuses: dict[str, dict[str, int]] = {}
    error_re = re.compile(r"\[(error|crit|alert|emerg)\]|\b(ALERT|EMERG)\b|#(error|critical)\]")

    def bump(table: dict[str, dict[str, int]], who: str, key: str) -> None:
        t = table.setdefault(who, {})
        t[key] = t.get(key, 0) + 1

    for log in sorted(work.glob("*/*.log")) + sorted(work.glob("*.log")):
        who = owner(log, work)
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        in_tb = False
        for line in lines:
            if "Traceback (most recent call last)" in line:
                in_tb = True
                continue
            if in_tb:
                text = line.strip()
                if re.match(r"^[\w.]+(Error|Exception|Exit|Failure|Lost|Done)\b.*", text) or (
                        re.match(r"^[\w.]+: ", text) and not text.startswith("File ")):
                    bump(exceptions, who, re.sub(r"0x[0-9a-f]+|\d{2,}", "N", text)[:160])
                    in_tb = False
                elif not line[:1].isspace() and text:
                    in_tb = False
                continue
            m = re.search(r"refused [^:]+: (.*)$", line)
            if m:
                bump(refusals, who, re.sub(r"\d+", "N", m.group(1).strip())[:100])
                continue
            if error_re.search(line):
                bump(errors, who, re.sub(r"\d+", "N", line.split("]", 2)[-1].strip())[:160])
                continue
            for rx in STATUS_RES:
                m = rx.search(line)
                if m:
                    if m.group(1) != "200":
                        bump(statuses, who, m.group(1))
                    break

    known = {
        "Request.finish called on a request after its connection was lost":
            " (twisted.web.proxy: the client left before the backend's answer was complete, "
            "as at the end of a timed run)",
    }

    def summary(table: dict[str, dict[str, int]], what: str) -> list[str]:
        out = []
        for who, counts in sorted(table.items()):
            top = sorted(counts.items(), key=lambda kv: -kv[1])
            items = "; ".join(f"{n:,} x `{k}`" + "".join(v for m, v in known.items() if m in k)
                              for k, n in top[:5])
            more = f"; and {len(top) - 5} more kinds" if len(top) > 5 else ""
            out.append(f"{who}: {what}: {items}{more}")
        return out

    return (summary(exceptions, "exceptions logged") + summary(errors, "error lines")
            + summary(refusals, "connections refused, by logged reason")
            + summary(statuses, "access-log statuses other than 200 (499, and HAProxy's -1 "
                      "and 400 `<BADREQ>` with `CR--`, are a client that went away: a timed "
                      "run ending with requests in flight, or s_time closing right after the "
                      "handshake)"))


def serve(lab: Lab, log: Callable[[str], None]) -> None:
    for name in PROXIES:
        inst = lab.start(name)
        log(f"{name:14} {inst.url()}  pid {inst.proc.pid}  {inst.log}")
    for name in TLS_PROXIES:
        inst = lab.start(name, lab.rsa)
        log(f"{name + ' rsa':14} {inst.url()}  pid {inst.proc.pid}  {inst.log}")
    e = lab.ec
    log(f"client: curl --cacert {e.ca} --cert {e.client_cert} --key {e.client_key} URL; "
        f"ab -E {e.client_pem}")
    log("Ctrl-C stops everything")
    while True:
        time.sleep(3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds [3]")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test the harness: 1 round, short runs, 64 MiB transfers")
    parser.add_argument("--duration", type=float, help="seconds per load run [4, quick 1]")
    parser.add_argument("--output", help="markdown report [docs/performance.md; "
                        "with --quick only printed]")
    parser.add_argument("--json", help="also write every measurement here")
    parser.add_argument("--ref", help="benchmark mtlsproxy/ as of this git commit (read with "
                        "`git archive`, the working tree is left alone) instead of the "
                        "working tree")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="before each round, wait up to S seconds for other processes "
                        "to leave the CPUs alone [0]")
    parser.add_argument("--serve", action="store_true",
                        help="only start the backend and one instance of each proxy (as the "
                        "benchmark does), print how to reach them, and wait for Ctrl-C")
    args = parser.parse_args()
    check_tools()
    quick = args.quick
    s = Settings(rounds=1 if quick else args.rounds, quick=quick,
                 duration=args.duration or (1.0 if quick else 4.0), s_time=1 if quick else 2,
                 transfer=(64 if quick else 1024) * MIB, idle=200 if quick else 1000,
                 ab_max=200_000, retries=0 if quick else 40)
    if s.rounds < 1:
        sys.exit("--rounds must be at least 1")
    output = Path(args.output) if args.output else (None if quick else ROOT / "docs" /
                                                    "performance.md")
    command = ".venv/bin/python bench/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    global NPROC
    NPROC = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    # The orchestrator is part of the load side.
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    with contextlib.suppress(ValueError, OSError):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Also when started in the background, where SIGINT may arrive ignored.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_term)
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="mtlsproxy-bench-"))
    procs = Processes()
    data: Data = {}

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.0f}s] {msg}", flush=True)

    try:
        log(f"work directory {work}; making certificates (RSA-4096 takes a moment)")
        lab = Lab(work, procs, s, args.ref)
        lab.backend_both_port = lab.start_backend_both_cores()
        log(f"mtlsproxy under test: {lab.code}")
        waited = 0.0

        def await_quiet(when: str) -> None:
            nonlocal waited
            t = time.monotonic()
            deadline = t + args.wait_quiet
            while True:
                foreign, top = foreign_top()
                if foreign < QUIET_FOREIGN:
                    break
                log(f"{when}: other processes use {foreign:.2f} cores:\n    "
                    + "\n    ".join(top))
                if time.monotonic() >= deadline:
                    log("going on anyway; the report records the other load of each "
                        "measurement")
                    lab.busy_starts.append((when, foreign, top))
                    break
                log(f"waiting for them (at most {deadline - time.monotonic():.0f} s more, "
                    "--wait-quiet)")
                time.sleep(10)
            waited += time.monotonic() - t

        lab.busy_starts = []
        runner = Runner(lab, s)
        if args.serve:
            serve(lab, log)
            return
        t_measure = time.monotonic()
        for rnd in range(1, s.rounds + 1):
            await_quiet(f"before round {rnd}")
            one_round(lab, runner, rnd, data, log)
        lab.waited = waited
        anomalies = []
        for rnd, rd in data.items():
            for who, figs in rd.items():
                for k, r in figs.items():
                    if r.problem.strip():
                        anomalies.append(f"round {rnd}, {who}, {k}: {r.problem.strip()}")
        anomalies += scan_logs(work)
        elapsed = time.monotonic() - t_measure - waited
        text = report(data, lab, s, command, elapsed, anomalies, started)
        print("\n" + text)
        if output:
            output.write_text(text + "\n")
            log(f"wrote {output}")
        if args.json:
            Path(args.json).write_text(json.dumps(
                {str(r): {w: {k: vars(v) for k, v in f.items()} for w, f in rd.items()}
                 for r, rd in data.items()}, indent=1, default=str))
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        raise SystemExit(130) from None
    except BenchError as e:
        log(f"error: {e}")
        raise SystemExit(1) from None
    finally:
        procs.stop_all()
        if os.environ.get("BENCH_KEEP"):
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        log("done")


if __name__ == "__main__":
    main()
