"""
--workers N: worker processes sharing the master's listening socket, reloading
on SIGHUP, draining on SIGTERM, and replaced when one dies.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from .harness import Proxy, wait_for

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


def test_metrics_with_workers_is_refused_at_start(run_proxy_expect_exit, proxy_args) -> None:
    """--metrics with more than one worker is a start-up error naming --metrics, for now."""
    code, out, err = run_proxy_expect_exit(
        proxy_args("--workers", "2", "--metrics", "tcp:0", port=1)
    )
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mtlsproxy: --metrics"), err
    assert "Traceback" not in out + err
