"""
The --workers master's bookkeeping, driven by hand with a Clock: readiness,
reloads reported by the workers, restart delays; and the workers' log format.
The processes themselves are exercised in tests/e2e/test_workers.py.
"""

from __future__ import annotations

import io
import json
import types
from typing import Any

import pytest
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import LogLevel, LogPublisher, textFileLogObserver
from twisted.python.failure import Failure

from mtlsproxy import logformat, notify, workers
from mtlsproxy.workers import WorkersService, _Worker, reload_summary, restart_delay


class FakeTransport:
    def __init__(self) -> None:
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class Master:
    """A WorkersService on a Clock with fake workers, recording what it tells systemd."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int = 2) -> None:
        self.clock = Clock()
        self.sent: list[str] = []
        for name in ("ready", "reloading", "status"):
            monkeypatch.setattr(notify, name, self._recorder(name))
        config: Any = types.SimpleNamespace(workers=count, shutdown_timeout=1.0, metrics=None)
        self.service = WorkersService(config, self.clock, {}, None)
        self.transports: dict[int, FakeTransport] = {}
        for index in range(1, count + 1):
            self.add(index)

    def _recorder(self, name: str) -> Any:
        def record(status: str | None = None, environ: Any = None) -> bool:
            self.sent.append(f"{name}: {status}" if status else name)
            return True

        return record

    def add(self, index: int) -> _Worker:
        """A worker as _spawn makes it (port is None here, so _spawn itself does nothing)."""
        worker = _Worker(self.service, index, self.clock.seconds())
        self.transports[index] = worker.transport = FakeTransport()  # type: ignore[assignment]
        self.service.workers[index] = worker
        return worker

    def report(self, index: int, line: str) -> None:
        self.service.workers[index].childDataReceived(workers.CONTROL_FD, line.encode() + b"\n")


def test_ready_only_once_every_worker_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    master = Master(monkeypatch)
    master.report(1, "accepting")
    assert master.sent == []
    # A report split over two reads is still one line.
    master.service.workers[2].childDataReceived(workers.CONTROL_FD, b"accep")
    assert master.sent == []
    master.service.workers[2].childDataReceived(workers.CONTROL_FD, b"ting\n")
    assert master.sent == ["ready: 2 workers accepting"]
    master.report(1, "accepting")  # a replaced worker later: no second READY=1
    assert master.sent == ["ready: 2 workers accepting"]


def test_sighup_waits_for_every_worker_and_spares_starting_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    A worker still starting gets no SIGHUP (it would die of it) until it
    reports accepting; READY=1 follows RELOADING=1 only after both reported.
    """
    master = Master(monkeypatch)
    master.report(1, "accepting")
    master.report(2, "accepting")
    master.sent.clear()
    master.service.workers[2].accepting = False  # as if just replaced
    master.service._forward_hup()
    assert master.sent == ["reloading"]
    assert master.transports[1].signals == ["HUP"]
    assert master.transports[2].signals == []
    master.report(1, "reload ok")
    assert master.sent == ["reloading"]
    master.report(2, "accepting")
    assert master.transports[2].signals == ["HUP"]
    master.report(2, "reload ok")
    assert master.sent == ["reloading", f"ready: {notify.RELOAD_OK}"]


def test_failed_reload_is_in_the_status(monkeypatch: pytest.MonkeyPatch) -> None:
    master = Master(monkeypatch)
    master.report(1, "accepting")
    master.report(2, "accepting")
    master.sent.clear()
    master.service._forward_hup()
    master.report(2, "reload failed crl.pem: not a CRL")
    master.report(1, "reload ok")
    assert master.sent == [
        "reloading",
        "ready: reload failed, keeping the current certificates: worker 2: crl.pem: not a CRL",
    ]


def test_silent_worker_cannot_hold_the_reload_forever(monkeypatch: pytest.MonkeyPatch) -> None:
    master = Master(monkeypatch)
    master.report(1, "accepting")
    master.report(2, "accepting")
    master.sent.clear()
    master.service._forward_hup()
    master.report(1, "reload ok")
    master.clock.advance(master.service.reload_timeout - 0.1)
    assert master.sent == ["reloading"]
    master.clock.advance(0.2)
    assert master.sent[-1] == (
        "ready: reload failed, keeping the current certificates: worker 2: no answer within 30s"
    )
    master.report(2, "reload ok")  # late: nothing more is sent
    assert len(master.sent) == 2


def test_reload_summary() -> None:
    assert reload_summary({}, [], 30) is None
    assert reload_summary({2: "bad", 1: "worse"}, [3], 5) == (
        "worker 1: worse; worker 2: bad; worker 3: no answer within 5s"
    )


def test_restart_delay_doubles_then_starts_over_after_a_stable_run() -> None:
    assert restart_delay(0.5, 1.0, 0.5, 30.0, 10.0) == (0.5, 1.0)
    assert restart_delay(1.0, 1.0, 0.5, 30.0, 10.0) == (1.0, 2.0)
    assert restart_delay(16.0, 1.0, 0.5, 30.0, 10.0) == (16.0, 30.0)
    assert restart_delay(30.0, 1.0, 0.5, 30.0, 10.0) == (30.0, 30.0)
    assert restart_delay(30.0, 10.0, 0.5, 30.0, 10.0) == (0.5, 1.0)


def test_restart_back_off_resets_once_a_worker_ran_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    master = Master(monkeypatch, count=1)
    service, clock = master.service, master.clock
    died = Failure(ProcessTerminated(exitCode=1))

    def crash_after(seconds: float) -> float:
        """The current worker 1 dies after running `seconds`; the delay before its successor."""
        worker = service.workers[1]
        clock.advance(seconds)
        worker.processEnded(died)
        delay = service._restarts[1].getTime() - clock.seconds()
        clock.advance(delay)  # _spawn does nothing without a port: add the successor by hand
        master.add(1)
        return delay

    assert [crash_after(0.1) for _ in range(4)] == pytest.approx([0.5, 1.0, 2.0, 4.0])
    assert crash_after(service.stable_after + 0.1) == pytest.approx(0.5)
    assert crash_after(0.1) == pytest.approx(1.0)


# -- the workers' log format ---------------------------------------------------------


def test_observer_kind_follows_the_master() -> None:
    for observer, kind in [
        (logformat.json_observer(io.StringIO()), "json"),
        (logformat.journal_observer(io.StringIO()), "journal"),
        (textFileLogObserver(io.StringIO()), "text"),
    ]:
        publisher = LogPublisher(observer)
        assert logformat.observer_kind(publisher) == kind


def _event(**fields: Any) -> dict[str, Any]:
    return {
        "log_namespace": "mtlsproxy",
        "log_level": LogLevel.info,
        "log_time": 1700000000.25,
        **fields,
    }


ACCESS = {
    "log_format": logformat.ACCESS_FORMAT,
    "log_namespace": logformat.ACCESS_NAMESPACE,
    "line": '127.0.0.1:1 client "GET / HTTP/1.1" 200 0 0.001s',
}


def test_worker_json_lines_carry_the_worker_number() -> None:
    out = io.StringIO()
    observer = logformat.worker_observer("json", 2, out)
    observer(_event(log_format="refused {peer}", peer="127.0.0.1:9"))
    observer(_event(**ACCESS))
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["worker"] for r in records] == [2, 2]
    assert records[0]["message"] == "refused 127.0.0.1:9"
    assert records[1]["message"] == ACCESS["line"]


@pytest.mark.parametrize("kind", ["text", "journal"])
def test_worker_text_lines_carry_the_worker_number(kind: str) -> None:
    out = io.StringIO()
    observer = logformat.worker_observer(kind, 3, out)
    observer(_event(log_format="refused {peer}", peer="127.0.0.1:9"))
    observer(_event(**ACCESS))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "[mtlsproxy" in lines[0] and "] [worker 3] refused 127.0.0.1:9" in lines[0]
    assert lines[1].endswith(f"] [worker 3] {ACCESS['line']}")
    if kind == "text":
        # the access line's fast path renders what the classic format would
        assert isinstance(observer.formatEvent, logformat.AccessLineFormat)  # type: ignore[attr-defined]
        slow = observer.formatEvent.inner(_event(**ACCESS))  # type: ignore[attr-defined]
        assert slow == lines[1] + "\n"
