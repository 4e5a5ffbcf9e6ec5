"""
Load and faults: 1,000 concurrent mTLS clients, 50,000 requests, the backend
killed and restarted during the run, clients resetting mid-body.

Outside CI (marker C{load}, deselected by default); run it with::

    .venv/bin/pytest -m load tests/e2e/test_load.py

Set C{MTLSPROXY_LOAD_SUMMARY=/some/file.json} to keep the figures of the run
(they are also printed; C{-s} shows them).  The issue asks for its last
result to be kept in docs/security.md.

What runs, all as real processes on loopback:

  - the backend, C{tests/e2e/loadbackend.py}: records each request id it
    receives (head, complete body, truncated body) in a log that survives its
    SIGKILL, and answers with the id and the X-Client-Cert-CN it received;
  - C{twistd -n mtlsproxy} in front of it, with C{--max-connections 2000} and
    a C{--metrics} listener (to count the client connections it holds);
  - two load generators, C{tests/e2e/loadclient.py}, 500 connections each,
    each with two client certificates of its own (four distinct CNs).

Two phases: a warm-up of 20,000 requests, then the main phase
of 50,000.  Each phase opens 1,000 connections, each sends one GET and holds
it open; the test checks that the proxy holds all 1,000 at once (its
C{mtlsproxy_client_connections} gauge), then the load goes (about 68% GET,
30% POST with a 1-16 KiB body, 2% POST reset with a TCP RST half-way through
a 32 KiB body).  When a third of the phase's requests are sent the backend is
SIGKILLed; OUTAGE_SECONDS later it is started again on the same port.

After the warm-up, once every client has exited, the backend closes its idle
connections (SIGUSR1: the proxy keeps idle pooled backend connections until
the backend closes them), and the proxy's open descriptors and RSS are the
baseline.  The warm-up goes through the same phases as the main run so that
the allocators have reached the working set of 1,000 connections, an outage
and a restart: what the main run adds to RSS is then what it kept, not
first-time allocation (CPython and glibc do not give freed memory back to the
system, so RSS never returns to its pre-load level; see RSS_GROWTH_KIB).

Asserted afterwards:

  - no cross-talk: every 200 carries its own request's id (header and body)
    and its own connection's certificate CN, and the body length sent;
  - every request ended as its own correct response, an intentional reset,
    or an honest failure (502/503/504, or the connection ending) by a
    request that was in flight during the outage, nothing else;
  - no POST reached the backend twice; a GET only if its first copy reached
    the killed backend and the proxy retried it on the new one (which the
    proxy does once for an idempotent request on a reused backend
    connection, see C{Exchange._replayable}); such GETs are counted apart;
  - no reset POST's body reached the backend complete; every response
    counted ok was answered by the backend exactly once;
  - every error came promptly (within ERROR_GRACE of the restart);
  - once the clients have exited, the proxy holds no client connection, its
    open descriptors return to the baseline (+FD_SLACK) and its RSS to within
    RSS_GROWTH_KIB of it; its log has no traceback.

Each phase is checked in full; every problem found is reported at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import re
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    REPO,
    Pki,
    Proxy,
    ProxyLauncher,
    WaitTimeout,
    free_port,
    terminate,
    wait_for,
)

pytestmark = [pytest.mark.load, pytest.mark.e2e]

LOADBACKEND = REPO / "tests" / "e2e" / "loadbackend.py"
LOADCLIENT = REPO / "tests" / "e2e" / "loadclient.py"

PROCESSES = 2
CONNECTIONS = 1_000
TOTAL_REQUESTS = 50_000
WARMUP_REQUESTS = 20_000
#: the backend is killed once this share of the requests has been sent
KILL_AT = 1 / 3
OUTAGE_SECONDS = 3.0
RESET_FRACTION = 0.02
POST_FRACTION = 0.30
#: descriptors the proxy may hold above its baseline once everything is closed
FD_SLACK = 2
#: RSS the proxy may keep above its baseline after the main run.  Measured
#: on 2 cores (with the proxy's leak of closing connections, found here, fixed
#: locally): 10-17 MiB, while the proxy's live Python allocations grow by under
#: 1 MiB (tracemalloc) and further 50,000-request rounds add 1-3 MiB each:
#: allocator high-water, not a leak.  24 MiB is about 500 bytes per request
#: of the run, or 12 KiB per connection opened (about 1,950 with the
#: reconnections), a fifth of what one open connection costs (about 63 KiB,
#: docs/performance.md): a leak of either kind would fail it.
RSS_GROWTH_KIB = 24 * 1024
#: an error answer (or a failed connection) must reach its client at most this
#: long after the backend is back: outage errors are prompt, not hangs
ERROR_GRACE = 10.0
DEADLINE_READY = 120.0
DEADLINE_RUN = 240.0
#: how long the proxy may take to notice that closed connections are closed
CLOSE_DEADLINE = 20.0


def _metric(port: int, name: str) -> float:
    """One unlabelled sample from the proxy's /metrics (http.client: no proxy settings)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _source_digest() -> str:
    """sha256 of mtlsproxy/**/*.py in the checkout: which code a run measured."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "mtlsproxy").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss(pid: int) -> tuple[int, int]:
    """VmRSS and VmHWM of one process, KiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


class LoadBackend:
    """loadbackend.py instances, one after the other, on one port, sharing one log."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log = workdir / "backend-requests.log"
        self.port = 0
        self.instance = 0
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> float:
        """Start the next instance; return the monotonic time it was listening."""
        self.instance += 1
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.Popen(
                [sys.executable, str(LOADBACKEND), "--listen", f"127.0.0.1:{self.port}",
                 "--log", str(self.log), "--instance", str(self.instance)],
                stdout=subprocess.PIPE,
                stderr=open(self.workdir / f"backend-{self.instance}.err", "ab"),  # noqa: SIM115
                stdin=subprocess.DEVNULL,
                text=True,
            )
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], max(deadline - time.monotonic(), 0))
            line = proc.stdout.readline() if ready else ""
            match = re.fullmatch(r"load backend listening on http://127\.0\.0\.1:(\d+)\n", line)
            if match:
                self.port = int(match.group(1))
                self.proc = proc
                return time.monotonic()
            proc.kill()
            proc.wait()
            # the port may still be held for a moment by the killed instance
            if time.monotonic() > deadline:
                err = (self.workdir / f"backend-{self.instance}.err").read_text()
                raise AssertionError(f"load backend did not start: {line!r}\n{err}")

    def kill(self) -> float:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        return time.monotonic()

    def close_idle(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)

    def events(self) -> list[tuple[int, str, str, list[str]]]:
        """(instance, event, id, rest) for every line of the shared log."""
        found = []
        for line in self.log.read_text(encoding="ascii").splitlines():
            instance, event, rid, *rest = line.split(" ")
            found.append((int(instance), event, rid, rest))
        return found


class LoadClient:
    """One loadclient.py process and what it printed."""

    def __init__(self, name: str, args: list[str], workdir: Path) -> None:
        self.name = name
        self.records = workdir / f"records-{name}.txt"
        self.stderr_path = workdir / f"client-{name}.err"
        self.proc = subprocess.Popen(
            [sys.executable, str(LOADCLIENT), *args, "--client", name,
             "--records", str(self.records)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.stderr_path, "wb"),  # noqa: SIM115
            text=True,
        )
        self.ready: int | None = None
        self.progress: dict[str, Any] = {}
        self.result: dict[str, Any] | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            word, _, rest = line.partition(" ")
            if word == "ready":
                self.ready = int(rest)
            elif word == "progress":
                self.progress = json.loads(rest)
            elif word == "result":
                self.result = json.loads(rest)

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    @property
    def sent(self) -> int:
        return int(self.progress.get("sent", 0))

    def finished(self) -> bool:
        if self.result is not None:
            return True
        if self.proc.poll() is not None:
            self._reader.join(5)
            if self.result is None:
                raise AssertionError(
                    f"load client {self.name} exited with {self.proc.returncode} "
                    f"without a result:\n{self.stderr_path.read_text()[-5000:]}"
                )
        return self.result is not None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def read_records(self) -> list[tuple[str, str, str, int, float, float]]:
        found = []
        for line in self.records.read_text(encoding="ascii").splitlines():
            rid, kind, outcome, status, start, end = line.split(" ")
            found.append((rid, kind, outcome, int(status), float(start), float(end)))
        return found


class Sampler:
    """The proxy's descriptors and RSS, sampled every 0.1 s in a thread (peaks only)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.max_fds = 0
        self.max_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            with contextlib.suppress(OSError):
                self.max_fds = max(self.max_fds, _fds(self.pid))
                self.max_rss = max(self.max_rss, _rss(self.pid)[0])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _client_args(pki: Pki, port: int, index: int, connections: int, requests: int) -> list[str]:
    args = ["--port", str(port), "--ca", str(pki.ca_cert),
            "--connections", str(connections), "--requests", str(requests),
            "--post-fraction", str(POST_FRACTION), "--reset-fraction", str(RESET_FRACTION),
            "--seed", str(1000 + index)]
    for k in range(2):
        cert = pki.get(f"load-{index}-{k}")
        args += ["--cert", str(cert.cert), "--key", str(cert.key), "--cn", str(cert.cn)]
    return args


def _run_clients(
    pki: Pki, port: int, workdir: Path, tag: str, requests: int, hold: bool
) -> list[LoadClient]:
    per = CONNECTIONS // PROCESSES
    clients = []
    for i in range(PROCESSES):
        args = _client_args(pki, port, i, per, requests // PROCESSES)
        if hold:
            args.append("--hold")
        clients.append(LoadClient(f"{tag}{i}", args, workdir))
    return clients


def _poll(predicate: Any, timeout: float, what: str) -> bool:
    """L{wait_for}, but False at the deadline instead of raising."""
    try:
        wait_for(predicate, timeout, what, interval=0.2)
    except WaitTimeout:
        return False
    return True


def _wait_quiet(proxy_pid: int, metrics_port: int, backend: LoadBackend,
                fd_target: int | None = None) -> dict[str, Any]:
    """
    Once every client has exited: wait (with deadlines) until the proxy has
    no client connection left, then until it has closed the idle backend
    connections the backend closes on SIGUSR1 and (C{fd_target}) its open
    descriptors are down to C{fd_target}; return what it holds then.
    """
    clients_closed = _poll(
        lambda: _metric(metrics_port, "mtlsproxy_client_connections") == 0, CLOSE_DEADLINE,
        "the proxy to see every client connection closed")
    fds_with_pool = _fds(proxy_pid)
    pooled = int(_metric(metrics_port, "mtlsproxy_backend_connections"))
    backend.close_idle()
    backend_closed = _poll(
        lambda: _metric(metrics_port, "mtlsproxy_backend_connections") == 0, CLOSE_DEADLINE,
        "the proxy to see the backend's idle connections closed")
    if fd_target is not None:
        _poll(lambda: _fds(proxy_pid) <= fd_target, CLOSE_DEADLINE,
              "the proxy's descriptors back to the baseline")
    rss, hwm = _rss(proxy_pid)
    return {
        "client_connections_left": int(_metric(metrics_port, "mtlsproxy_client_connections")),
        "backend_connections_left": int(_metric(metrics_port, "mtlsproxy_backend_connections")),
        "clients_closed_in_time": clients_closed, "backend_closed_in_time": backend_closed,
        "fds_with_pool": fds_with_pool, "pooled_backend_connections": pooled,
        "fds": _fds(proxy_pid), "rss_kib": rss, "hwm_kib": hwm,
    }


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"p50_ms": round(pick(0.5) * 1000, 1), "p99_ms": round(pick(0.99) * 1000, 1),
            "max_ms": round(values[-1] * 1000, 1)}


@dataclasses.dataclass
class Stack:
    pki: Pki
    workdir: Path
    backend: LoadBackend
    proxy: Proxy
    metrics_port: int

    @property
    def pid(self) -> int:
        return self.proxy.proc.pid


def _phase(stack: Stack, tag: str, total: int) -> tuple[dict[str, Any], list[str]]:
    """
    One run: 1,000 connections opened and held, then C{total} requests (the
    first 1,000 included), the backend killed after a third of them and
    restarted OUTAGE_SECONDS later.  Return its figures and what went wrong.
    """
    backend, pid, metrics_port = stack.backend, stack.pid, stack.metrics_port
    failures: list[str] = []

    def check(ok: bool, message: str, detail: object = "") -> None:
        if not ok:
            failures.append(f"{tag}: {message}: {detail}"[:3000])

    sampler = Sampler(pid)
    started = time.monotonic()
    clients = _run_clients(stack.pki, stack.proxy.port, stack.workdir, tag, total, hold=True)
    try:
        # -- 1,000 connections held at once ---------------------------------------
        wait_for(lambda: all(c.ready is not None or c.finished() for c in clients),
                 DEADLINE_READY, "every load client to hold its connections", interval=0.1)
        held = {
            "seconds_to_open": round(time.monotonic() - started, 1),
            "client_side_open": sum(c.ready or 0 for c in clients),
            "proxy_client_connections": int(
                _metric(metrics_port, "mtlsproxy_client_connections")),
            "proxy_fds": _fds(pid),
        }
        for c in clients:
            c.go()
        go_time = time.monotonic()

        # -- the backend killed, then restarted on its port -------------------------
        wait_for(lambda: sum(c.sent for c in clients) >= total * KILL_AT,
                 DEADLINE_RUN, "a third of the requests", interval=0.02)
        sent_at_kill = sum(c.sent for c in clients)
        kill_time = backend.kill()
        wait_for(lambda: time.monotonic() >= kill_time + OUTAGE_SECONDS, OUTAGE_SECONDS + 5,
                 "the end of the outage")
        restart_time = backend.start()
        wait_for(lambda: all(c.finished() for c in clients), DEADLINE_RUN,
                 "the load clients to finish", interval=0.2)
        run_seconds = time.monotonic() - go_time
    finally:
        sampler.stop()
        for c in clients:
            c.stop()
    results = [c.result for c in clients]

    # -- what the clients saw --------------------------------------------------------
    records = [r for c in clients for r in c.read_records()]
    outcomes = Counter(r[2] for r in records)
    errors = [r for r in records if r[2] in ("status", "conn_error", "timeout")]
    outside = [r for r in errors if not (r[4] <= restart_time and r[5] >= kill_time)]
    slow_errors = [r for r in errors if r[5] > restart_time + ERROR_GRACE]
    last_ok = max((r[5] for r in records if r[2] == "ok"), default=go_time)
    summary: dict[str, Any] = {"held": held, "outage": {
        "sent_at_kill": sent_at_kill,
        "seconds": round(restart_time - kill_time, 2),
        "kill_after_go_s": round(kill_time - go_time, 2),
    }}
    summary["run"] = {
        "seconds": round(run_seconds, 1),
        "requests_per_second": round(len(records) / run_seconds, 1),
        "seconds_to_last_ok": round(last_ok - go_time, 1),
        "requests_sent": len(records),
        "kinds": dict(Counter(r[1] for r in records)),
        "outcomes": dict(outcomes),
        "error_statuses": dict(Counter(r[3] for r in records if r[2] == "status")),
        "conn_errors": dict(sum((Counter(r["conn_errors"]) for r in results if r), Counter())),
        "connect_errors": dict(sum((Counter(r["connect_errors"]) for r in results if r),
                                   Counter())),
        "handshakes": sum(r["handshakes"] for r in results if r),
        "max_open_per_client": [r["max_open"] for r in results if r],
        "open_at_go": sum(r["open_at_go"] for r in results if r),
        "errors_outside_outage": len(outside),
        "errors_later_than_grace": len(slow_errors),
        "error_seconds": _percentiles([r[5] - r[4] for r in errors]),
        "ok_latency": _percentiles([r[5] - r[4] for r in records if r[2] == "ok"]),
        "proxy_peak_fds": sampler.max_fds,
        "proxy_peak_rss_kib": sampler.max_rss,
    }

    # -- what the backend saw -----------------------------------------------------------
    sent = {r[0]: r for r in records}
    heads: dict[str, list[int]] = defaultdict(list)
    complete: Counter[str] = Counter()
    truncated: set[str] = set()
    for instance, event, rid, _ in backend.events():
        if not rid.startswith(tag):
            continue  # another phase
        if event == "H":
            heads[rid].append(instance)
        elif event == "C":
            complete[rid] += 1
        elif event == "T":
            truncated.add(rid)
    phantom = [rid for rid in heads if rid not in sent]
    post_twice = [rid for rid, seen in heads.items()
                  if len(seen) > 1 and sent.get(rid, ("", "post"))[1] != "get"]
    get_twice = {rid: seen for rid, seen in heads.items()
                 if len(seen) > 1 and rid in sent and sent[rid][1] == "get"}
    # the killed instance got it, the proxy retried it on the next one
    restart_pair = [backend.instance - 1, backend.instance]
    get_twice_unexplained = [rid for rid, seen in get_twice.items() if seen != restart_pair]
    ok_not_once = [r[0] for r in records if r[2] == "ok" and complete[r[0]] != 1]
    reset_completed = [r[0] for r in records if r[2] == "reset" and complete[r[0]]]
    summary["backend"] = {
        "heads": sum(len(v) for v in heads.values()),
        "complete": sum(complete.values()),
        "truncated": len(truncated),
        "resets_whose_head_reached_backend": sum(
            1 for r in records if r[2] == "reset" and r[0] in heads),
        "post_forwarded_twice": len(post_twice),
        "get_forwarded_twice": len(get_twice),
        "get_forwarded_twice_across_restart": len(get_twice) - len(get_twice_unexplained),
        "phantom_ids": len(phantom),
        "answered_by_backend_but_not_ok": sum(
            1 for rid, n in complete.items() if n and rid in sent and sent[rid][2] != "ok"),
    }

    # -- the verdict on this phase ------------------------------------------------------
    check(held["client_side_open"] == CONNECTIONS, "clients did not hold 1,000", held)
    check(held["proxy_client_connections"] >= CONNECTIONS,
          "the proxy did not hold 1,000 at once", held)
    check(len(records) == total, "requests sent", len(records))
    for r in results:
        check(r is not None and not r["slot_failures"], "client slots failed", r)
    check(outcomes["mismatch"] == 0, "CROSS-TALK: responses to other requests",
          [r["mismatch_samples"] for r in results if r])
    check(outcomes["unexpected"] == 0, "unexpected answers",
          [r["unexpected_samples"] for r in results if r])
    check(outcomes["timeout"] == 0, "requests timed out", outcomes["timeout"])
    check(not outside, "errors outside the outage", f"{len(outside)}, e.g. {outside[:5]}")
    check(not slow_errors, f"errors that came more than {ERROR_GRACE:g} s after the restart",
          f"{len(slow_errors)}, e.g. {slow_errors[:5]}")
    check(set(summary["run"]["error_statuses"]) <= {502, 503, 504}, "error statuses",
          summary["run"]["error_statuses"])
    check(outcomes["reset"] > 0 and outcomes["status"] > 0, "no resets or no outage errors",
          outcomes)
    check(not summary["run"]["connect_errors"], "connections failed",
          summary["run"]["connect_errors"])
    check(not phantom, "the backend got ids nobody sent", phantom[:20])
    check(not post_twice, "a POST reached the backend twice",
          {rid: heads[rid] for rid in post_twice[:20]})
    check(not get_twice_unexplained, "a GET reached the backend twice, not across the restart",
          {rid: get_twice[rid] for rid in get_twice_unexplained[:20]})
    check(not ok_not_once, "ok responses not answered by the backend exactly once",
          {rid: complete[rid] for rid in ok_not_once[:20]})
    check(not reset_completed, "a reset POST's body reached the backend whole",
          reset_completed[:20])
    return summary, failures


def test_load_and_faults(pki: Pki, tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 3 * CONNECTIONS + 1024  # the proxy: clients and backend connections
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"ulimit -n: {needed} descriptors needed, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))  # children inherit it

    source = _source_digest()
    backend = LoadBackend(tmp_path)
    launcher = ProxyLauncher(pki, tmp_path / "proxy", lambda: backend.url)
    try:
        backend.start()
        metrics_port = free_port()
        proxy = launcher.start(
            "--max-connections", "2000",
            "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1",
        )
        stack = Stack(pki, tmp_path, backend, proxy, metrics_port)
        pid = stack.pid
        summary: dict[str, Any] = {
            "nproc": os.cpu_count(),
            "python": sys.version.split()[0],
            "ulimit_n": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "mtlsproxy_sha256": source,
            "proxy_start": {"fds": _fds(pid), "rss_kib": _rss(pid)[0]},
        }
        failures: list[str] = []

        # -- warm-up, then the baseline -----------------------------------------------
        started = time.monotonic()
        summary["warmup"], warm_failures = _phase(stack, "W", WARMUP_REQUESTS)
        summary["warmup"]["seconds_in_all"] = round(time.monotonic() - started, 1)
        failures += warm_failures
        baseline = _wait_quiet(pid, metrics_port, backend)
        summary["baseline"] = baseline
        if baseline["client_connections_left"]:
            failures.append(
                "W: LEAK: client connections the proxy never released, though every client "
                f"exited: {baseline['client_connections_left']}")

        # -- the run ------------------------------------------------------------------------
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM from now on
        started = time.monotonic()
        summary["main"], main_failures = _phase(stack, "L", TOTAL_REQUESTS)
        summary["main"]["seconds_in_all"] = round(time.monotonic() - started, 1)
        failures += main_failures
        after = _wait_quiet(pid, metrics_port, backend, baseline["fds"] + FD_SLACK)
        summary["after"] = after
        summary["rss_growth_kib"] = after["rss_kib"] - baseline["rss_kib"]
        summary["fd_growth"] = after["fds"] - baseline["fds"]
        log_text = proxy.log_text()
        summary["proxy_log"] = {
            "tracebacks": log_text.count("Traceback"),
            "unhandled": log_text.count("Unhandled"),
            "502_lines": len(re.findall(r'" 502 ', log_text)),
        }
        summary["proxy_running"] = proxy.running
        if _source_digest() != source:
            summary["mtlsproxy_changed_during_the_run"] = True
        print("\nload summary: " + json.dumps(summary, indent=1))
        target = os.environ.get("MTLSPROXY_LOAD_SUMMARY")
        if target:
            Path(target).write_text(json.dumps(summary, indent=1) + "\n")

        # -- the verdict -----------------------------------------------------------------------
        if not proxy.running:
            failures.append(f"the proxy exited: {log_text[-3000:]}")
        if "Traceback" in log_text or "Unhandled" in log_text:
            at = max(log_text.find("Traceback"), log_text.find("Unhandled"))
            failures.append(f"traceback in the proxy log: {log_text[max(0, at - 500):][:3000]}")
        if after["client_connections_left"]:
            failures.append(
                "L: LEAK: client connections the proxy never released, though every client "
                f"exited: {after['client_connections_left']} ({after})")
        if after["fds"] > baseline["fds"] + FD_SLACK:
            failures.append(f"LEAK: descriptors {baseline['fds']} at the baseline, "
                            f"{after['fds']} after the run")
        if summary["rss_growth_kib"] > RSS_GROWTH_KIB:
            failures.append(f"RSS {baseline['rss_kib']} KiB at the baseline, "
                            f"{after['rss_kib']} KiB after the run: more than "
                            f"{RSS_GROWTH_KIB} KiB of growth")
        assert not failures, "\n".join(failures)
    finally:
        backend.stop()
        problems = launcher.stop_all()
        if problems:
            pytest.fail("traceback in the proxy log:\n" + "\n\n".join(problems), pytrace=False)
