"""
--workers N: worker processes sharing the master's listening socket, reloading
on SIGHUP, draining on SIGTERM, and replaced when one dies.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtlsproxy import notify

from .harness import TWISTD, Proxy, ProxyLauncher, free_port, wait_for
from .ops_helpers import (
    RELOADED,
    NotifySocket,
    Scrape,
    http_get,
    replace_file,
    wait_for_log_count,
    wait_for_metric,
    write_crl,
)

pytestmark = pytest.mark.e2e


def workers_of(proxy: Proxy) -> list[int]:
    """The worker processes: every descendant of the master."""
    return [pid for pid in proxy.pids() if pid != proxy.proc.pid]


def worker_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.fixture
def two_workers(start_proxy) -> Proxy:
    proxy = start_proxy("--workers", "2")
    wait_for(lambda: len(workers_of(proxy)) == 2, 15, "two workers to start")
    wait_for(lambda: proxy.log_text().count("accepting") == 2, 15, "both workers to accept")
    return proxy


def test_workers_share_the_socket_and_serve(two_workers: Proxy, backend) -> None:
    """
    With --workers 2 the master starts two `python -m mtlsproxy.workers`
    processes, and requests on fresh connections are answered with the
    client's identity, whichever worker accepts them.
    """
    for pid in workers_of(two_workers):
        assert "mtlsproxy.workers" in worker_cmdline(pid)
    for i in range(6):
        with two_workers.tls() as conn:
            response = conn.request("GET", f"/echo/{i}")
        assert response.status == 200
        assert response.echo().values("X-Client-Cert-CN") == ["client"]
    assert len(backend.requests()) == 6
    assert two_workers.attempt(None).refused
    # text logs: every worker line says which worker wrote it
    wait_for_log_count(two_workers, r"/echo/5", 1)
    access = [line for line in two_workers.log_text().splitlines() if "/echo/" in line]
    assert len(access) == 6, access
    assert all(re.search(r"\] \[worker [12]\] ", line) for line in access), access


def test_dead_worker_is_replaced(two_workers: Proxy) -> None:
    """A worker killed with SIGKILL is logged and replaced; service goes on."""
    victim = workers_of(two_workers)[0]
    os.kill(victim, signal.SIGKILL)
    two_workers.wait_for_log(r"worker \d exited \(signal 9\); starting another", 10)
    wait_for(
        lambda: len(workers_of(two_workers)) == 2 and victim not in workers_of(two_workers),
        15,
        "a new worker to replace the killed one",
    )
    wait_for(lambda: two_workers.log_text().count("accepting") == 3, 15, "the new worker")
    for _ in range(4):
        with two_workers.tls() as conn:
            assert conn.request("GET", "/echo/after").status == 200


def test_sighup_reloads_every_worker(two_workers: Proxy) -> None:
    """SIGHUP to the master makes each worker reload (here: find its material unchanged)."""
    two_workers.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: two_workers.log_text().count("CA and CRLs unchanged") == 2,
        15,
        "both workers to reload",
    )
    assert two_workers.running
    with two_workers.tls() as conn:
        assert conn.request("GET", "/echo/reloaded").status == 200


def test_sigterm_drains_workers_and_exits_zero(two_workers: Proxy, backend) -> None:
    """
    SIGTERM to the master: a request in flight still gets its whole response,
    every worker exits, and the master exits 0.
    """
    workers = workers_of(two_workers)
    outcome: dict[str, object] = {}

    def client() -> None:
        try:
            with two_workers.tls() as conn:
                outcome["response"] = conn.request("GET", "/slow?delay=1.5")
        except Exception as e:  # reported by the assertion below
            outcome["error"] = repr(e)

    thread = threading.Thread(target=client)
    thread.start()
    wait_for(lambda: backend.requests(), 10, "the request to reach the backend")
    two_workers.proc.send_signal(signal.SIGTERM)
    thread.join(20)
    assert "error" not in outcome, outcome
    assert outcome["response"].status == 200  # type: ignore[attr-defined]
    assert two_workers.proc.wait(20) == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status"
        ).read_text().lower()


def _served_by(proxy: Proxy, prefix: str) -> dict[str, int]:
    """How many access-log lines for paths under C{prefix} each worker wrote."""
    counts: dict[str, int] = {}
    for match in re.finditer(rf"\] \[worker (\d+)\] .*{re.escape(prefix)}", proxy.log_text()):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def test_metrics_with_workers_add_up(start_proxy, tmp_path: Path) -> None:
    """
    --workers 2 --metrics: the master serves one /metrics for both workers,
    from files in a private directory under $RUNTIME_DIRECTORY.  Counters are
    the sum over the workers, and stay counted when a worker is killed and
    replaced; open connections are summed over running workers; each expiry
    series appears once, not once per worker.  SIGTERM removes the directory.
    """
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    metrics_port = free_port()
    proxy = start_proxy(
        "--workers", "2", "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1",
        env={"RUNTIME_DIRECTORY": str(runtime)},
    )
    wait_for(lambda: proxy.log_text().count("accepting") == 2, 15, "both workers to accept")
    (files,) = list(runtime.iterdir())
    assert files.is_dir() and files.stat().st_mode & 0o777 == 0o700
    assert http_get(metrics_port, "/healthz")[0] == 200
    status, _, body = wait_for(
        lambda: (r := http_get(metrics_port, "/readyz"))[0] == 200 and r, 10, "/readyz 200"
    )
    assert body == "ready\n"

    # Fresh connections until the kernel has given some to each worker.
    sent = 0
    deadline = time.monotonic() + 60
    while len(_served_by(proxy, "/echo/m")) < 2 or sent < 10:
        assert time.monotonic() < deadline, f"{sent} requests: {_served_by(proxy, '/echo/m')}"
        with proxy.tls() as conn:
            assert conn.request("GET", f"/echo/m{sent}").status == 200
        sent += 1
    wait_for_log_count(proxy, r"\] \[worker \d\] .*/echo/m", sent)
    served = _served_by(proxy, "/echo/m")
    assert set(served) == {"1", "2"} and sum(served.values()) == sent, served

    scrape = wait_for_metric(
        metrics_port,
        lambda s: s.total("mtlsproxy_requests_total") == sent,
        f"the workers' requests to add up to {sent}",
    )
    assert scrape.value("mtlsproxy_requests_total", status_class="2xx") == sent
    assert scrape.value("mtlsproxy_request_duration_seconds_count") == sent
    assert scrape.value("mtlsproxy_handshakes_total", result="ok") == sent
    assert scrape.value("mtlsproxy_info") == 1
    assert "process_" not in scrape.text  # one process's numbers would mislead
    expiries = scrape.families["mtlsproxy_expiry_timestamp_seconds"].samples
    keys = [(s.labels["kind"], s.labels["subject"], s.labels["fingerprint"]) for s in expiries]
    assert len(keys) == len(set(keys)), keys  # once per certificate, not per worker
    assert {"server", "ca"} <= {kind for kind, _, _ in keys}, keys
    assert all(s.labels.keys() == {"kind", "subject", "fingerprint"} for s in expiries)
    assert all(s.value > time.time() for s in expiries), expiries

    # The open-connection gauge: the sum over the workers, refreshed each second.
    with proxy.tls() as held:
        assert held.request("GET", "/echo/held").status == 200
        wait_for_metric(
            metrics_port,
            lambda s: s.value("mtlsproxy_client_connections") == 1,
            "one open client connection",
        )
    sent += 1
    wait_for_metric(
        metrics_port,
        lambda s: s.value("mtlsproxy_client_connections") == 0
        and s.total("mtlsproxy_requests_total") == sent,
        "no open client connection",
    )

    # A worker killed: what it counted stays counted; its replacement adds on.
    victim = workers_of(proxy)[0]
    os.kill(victim, signal.SIGKILL)
    proxy.wait_for_log(r"worker \d exited \(signal 9\); starting another", 10)
    wait_for(lambda: proxy.log_text().count("accepting") == 3, 15, "the replacement to accept")
    assert Scrape.get(metrics_port).total("mtlsproxy_requests_total") == sent
    assert wait_for(lambda: http_get(metrics_port, "/readyz")[0] == 200, 10, "/readyz again")
    for i in range(4):
        with proxy.tls() as conn:
            assert conn.request("GET", f"/echo/after{i}").status == 200
    sent += 4
    scrape = wait_for_metric(
        metrics_port,
        lambda s: s.total("mtlsproxy_requests_total") == sent
        and s.value("mtlsproxy_client_connections") == 0,
        f"{sent} requests counted after the replacement",
    )
    assert scrape.value("mtlsproxy_info") == 1
    again = [
        (s.labels["kind"], s.labels["subject"], s.labels["fingerprint"])
        for s in scrape.families["mtlsproxy_expiry_timestamp_seconds"].samples
    ]
    assert sorted(again) == sorted(keys)

    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(30) == 0
    assert list(runtime.iterdir()) == []


# -- readiness and reloads, as systemd sees them ---------------------------------------


def _logs(launcher: ProxyLauncher) -> str:
    """Every proxy log of the test so far (one proxy per test here)."""
    return "".join(p.read_text(errors="replace") for p in sorted(launcher.workdir.glob("*.log")))


@pytest.fixture
def notify_socket(launcher: ProxyLauncher) -> Iterator[NotifySocket]:
    """A Type=notify socket that notes the proxy's log as each message arrives."""
    sock = NotifySocket(snapshot=lambda: _logs(launcher))
    yield sock
    sock.close()


def _notify_env(sock: NotifySocket) -> dict[str, str | None]:
    return {"NOTIFY_SOCKET": str(sock.path)}


def test_ready_only_once_every_worker_accepts(start_proxy, notify_socket) -> None:
    """
    READY=1 comes from the master only once both workers accept (both had
    logged "accepting" when it arrived), with a STATUS saying so, and a
    connection made right after it is served.
    """
    proxy = start_proxy("--workers", "2", env=_notify_env(notify_socket))
    notify_socket.wait_for_states(["READY=1"], 20)
    with proxy.tls() as conn:
        assert conn.request("GET", "/echo/ready").status == 200
    ready = notify_socket.messages[0]
    assert str(ready.seen).count("accepting") == 2, ready.seen
    assert ready.fields.get("STATUS") == "2 workers accepting", ready


def test_sighup_while_workers_start_and_right_after_ready(start_proxy, notify_socket) -> None:
    """
    A SIGHUP sent as soon as the worker processes exist (before they have a
    handler), and another the moment READY=1 arrives, kill no worker: each
    worker reloads for each, and every READY=1 after RELOADING=1 comes only
    once every worker has logged its reload.
    """
    proxy = start_proxy("--workers", "2", env=_notify_env(notify_socket))
    wait_for(lambda: len(workers_of(proxy)) == 2, 15, "two worker processes")
    workers = sorted(workers_of(proxy))
    proxy.proc.send_signal(signal.SIGHUP)
    notify_socket.wait_for_states(["RELOADING=1", "READY=1"], 20)
    proxy.proc.send_signal(signal.SIGHUP)
    notify_socket.wait_for_states(["RELOADING=1", "READY=1", "RELOADING=1", "READY=1"], 20)
    for index, count in ((1, 2), (3, 4)):
        message = notify_socket.messages[index]
        assert len(re.findall(RELOADED, str(message.seen))) == count, message.seen
        assert message.fields.get("STATUS") == notify.RELOAD_OK, message
    log = proxy.log_text()
    assert "exited" not in log, log
    assert sorted(workers_of(proxy)) == workers
    with proxy.tls() as conn:
        assert conn.request("GET", "/echo/after-hup").status == 200


@pytest.mark.parametrize("count", [1, 2])
def test_crl_reload_reaches_every_worker_and_failure_is_reported(
    start_proxy, notify_socket, pki, tmp_path: Path, count: int
) -> None:
    """
    A new CRL revoking the client, then SIGHUP: once READY=1 follows
    RELOADING=1 every new connection is refused, whichever worker takes it.
    Then an unreadable CRL and SIGHUP: READY=1 again (the old material goes
    on serving) but with a STATUS saying the reload failed, in one process
    as with workers (naming each worker).
    """
    client = pki.get("workers-crl-client")
    crl = write_crl(tmp_path / "crl.pem", pki.ca, [])
    proxy = start_proxy(
        "--workers", str(count), "--crl", str(crl), env=_notify_env(notify_socket)
    )
    notify_socket.wait_for_states(["READY=1"], 20)
    for _ in range(4):
        assert not proxy.attempt(client).refused

    write_crl(crl, pki.ca, [client.issued.cert])
    proxy.proc.send_signal(signal.SIGHUP)
    notify_socket.wait_for_states(["READY=1", "RELOADING=1", "READY=1"], 20)
    reloaded = notify_socket.messages[2]
    assert str(reloaded.seen).count("reloaded certificates, CA and CRLs") == count
    assert reloaded.fields.get("STATUS") == notify.RELOAD_OK, reloaded
    for _ in range(4 * count):
        attempt = proxy.attempt(client)
        assert attempt.refused, attempt

    replace_file(crl, b"not a CRL\n")
    proxy.proc.send_signal(signal.SIGHUP)
    notify_socket.wait_for_states(
        ["READY=1", "RELOADING=1", "READY=1", "RELOADING=1", "READY=1"], 20
    )
    failed = notify_socket.messages[4]
    status = failed.fields.get("STATUS", "")
    assert status.startswith("reload failed, keeping the current certificates"), failed
    assert "crl.pem" in status, failed
    if count > 1:
        assert "worker 1:" in status and "worker 2:" in status, failed
    assert proxy.running
    assert proxy.attempt(client).refused  # the revoking CRL still applies
    assert proxy.attempt("client").refused is False


# -- logging -----------------------------------------------------------------------------


def test_workers_log_in_the_masters_json_format(launcher: ProxyLauncher, pki) -> None:
    """
    twistd --logger=mtlsproxy.logformat.json_observer: the workers' lines
    (access lines, refusals) are JSON too, each with its worker's number.
    """
    launcher.command = lambda args: [  # type: ignore[method-assign]
        str(TWISTD), "--logger=mtlsproxy.logformat.json_observer", "-n", "--pidfile=",
        "mtlsproxy", *args,
    ]
    proxy = launcher.start("--workers", "2")
    wait_for(lambda: proxy.log_text().count("accepting") == 2, 15, "both workers to accept")
    for i in range(4):
        with proxy.tls() as conn:
            assert conn.request("GET", f"/echo/json-{i}").status == 200
    assert proxy.attempt(None).refused
    wait_for_log_count(proxy, r"certificate required", 1)
    wait_for_log_count(proxy, r"/echo/json-3", 1)

    records = []
    for line in proxy.log_text().splitlines():
        if line.strip():
            records.append(json.loads(line))  # every line, master's and workers', is JSON
    access = [r for r in records if r.get("namespace") == "mtlsproxy.access"]
    assert len(access) == 4 and all(r.get("worker") in (1, 2) for r in access), access
    refusals = [r for r in records if "certificate required" in r.get("message", "")]
    assert refusals and all(r.get("worker") in (1, 2) for r in refusals), refusals
    accepting = {r["worker"] for r in records if "accepting" in r.get("message", "")}
    assert accepting == {1, 2}


def test_workers_log_into_the_masters_log_file(launcher: ProxyLauncher, tmp_path) -> None:
    """
    twistd --logfile=FILE: the workers' lines (their start, access lines)
    are in FILE with the master's, whole, though the workers' standard
    output is not that file (a daemon's is /dev/null).
    """
    log_file = tmp_path / "proxy.log"
    launcher.command = lambda args: [  # type: ignore[method-assign]
        str(TWISTD), f"--logfile={log_file}", "-n", "--pidfile=", "mtlsproxy", *args,
    ]
    proxy = launcher.start("--workers", "2")

    def text() -> str:
        return log_file.read_text() if log_file.exists() else ""

    wait_for(lambda: text().count("accepting") == 2, 15, "both workers to log 'accepting'")
    for i in range(6):
        with proxy.tls() as conn:
            assert conn.request("GET", f"/echo/file-{i}").status == 200
    wait_for(lambda: "/echo/file-5" in text(), 10, "the last access line in the log file")
    access = [line for line in text().splitlines() if "/echo/file-" in line]
    assert len(access) == 6, access
    assert all(re.search(r"\[worker [12]\] ", line) for line in access), access
    assert "accepting" not in proxy.log_text(), "the workers wrote to stdout, not the file"
