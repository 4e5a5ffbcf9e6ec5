"""The JSON and journal log observers for `twistd --logger=...`."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.application.app import AppLogger
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.reflect import namedAny

from mtlsproxy.logformat import (
    event_as_json,
    journal_observer,
    json_observer,
    writes_to_journal,
)

from . import certfactory as cf

TWISTD = Path(sys.executable).parent / "twistd"


def emit(observer: Any, level: str, fmt: str, **fields: Any) -> None:
    getattr(Logger(namespace="mtlsproxy", observer=observer), level)(fmt, **fields)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_one_json_object_per_event() -> None:
    """Each event is one line: time, level, namespace, message and the event's own fields."""
    out = io.StringIO()
    observer = json_observer(out)
    emit(observer, "info", "refused {peer}: {reason}", peer="10.0.0.1:4433", reason="unknown CA")
    emit(observer, "warn", "reload failed: {error}", error="bad\nkey")
    first, second = lines(out)
    assert first["level"] == "info"
    assert first["namespace"] == "mtlsproxy"
    assert first["message"] == "refused 10.0.0.1:4433: unknown CA"
    assert first["peer"] == "10.0.0.1:4433" and first["reason"] == "unknown CA"
    assert first["time"].endswith("Z") and first["time"][10] == "T"
    assert second["level"] == "warn"
    assert second["message"] == "reload failed: bad\nkey"  # escaped, still one line
    assert len(out.getvalue().splitlines()) == 2


def test_numbers_stay_numbers_and_odd_values_are_encoded() -> None:
    """Numeric fields keep their type; bytes, paths and objects become strings, never an error."""
    out = io.StringIO()
    emit(
        json_observer(out),
        "info",
        "access",
        status=200,
        duration=0.25,
        target=b"/p\xffath",
        path=Path("/etc/x"),
        thing=object(),
    )
    (record,) = lines(out)
    assert record["status"] == 200 and record["duration"] == 0.25
    assert record["target"] == "/p\\xffath"
    assert record["path"] == "/etc/x"
    assert record["thing"].startswith("<object object")


def test_clashing_field_names_are_prefixed() -> None:
    """A field called like a fixed key cannot overwrite it."""
    out = io.StringIO()
    Logger(namespace="mtlsproxy", observer=json_observer(out)).info(
        "hello {time}", time="noon", namespace="mine", message="m"
    )
    (record,) = lines(out)
    assert record["field_time"] == "noon" and record["field_namespace"] == "mine"
    assert record["field_message"] == "m"
    assert record["namespace"] == "mtlsproxy" and record["message"] == "hello noon"
    assert record["time"].endswith("Z")


def test_failures_carry_the_traceback() -> None:
    """log.failure() gives level critical and the traceback in its own field."""
    out = io.StringIO()
    log = Logger(namespace="mtlsproxy", observer=json_observer(out))
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("request handling failed")
    (record,) = lines(out)
    assert record["level"] == "critical"
    assert record["message"] == "request handling failed"
    assert "ZeroDivisionError" in record["traceback"]


def test_legacy_events() -> None:
    """Events from twisted.python.log (Twisted's own) are rendered without their internals."""
    event = {
        "log_format": "{log_text}",
        "log_text": "(TCP Port 8443 Closed)",
        "log_level": LogLevel.info,
        "log_namespace": "log_legacy",
        "log_time": 0.0,
        "log_legacy": object(),
        "message": ("(TCP Port 8443 Closed)",),
        "isError": 0,
        "system": "-",
        "time": 0.0,
    }
    record = json.loads(event_as_json(event))
    assert record == {
        "time": "1970-01-01T00:00:00.000Z",
        "level": "info",
        "namespace": "log_legacy",
        "message": "(TCP Port 8443 Closed)",
    }


def test_stderr_lines_keep_their_error_level() -> None:
    """What twistd captures from stderr keeps level error (LogLevel members are not instances)."""
    event = {"log_format": "{log_io}", "log_io": "Traceback", "log_level": LogLevel.error,
             "log_namespace": "stderr", "log_time": 0.0}
    assert json.loads(event_as_json(event))["level"] == "error"


def test_journal_priority_prefix_only_on_the_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the JOURNAL_STREAM, lines get a <N> syslog priority; anywhere else they do not."""
    with open(tmp_path / "log", "w+") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert writes_to_journal(f)
        emit(json_observer(f), "warn", "expires soon")
        emit(journal_observer(f), "error", "boom")
        f.seek(0)
        first, second = f.read().splitlines()
    assert first.startswith('<4>{"time"') and json.loads(first[3:])["level"] == "warn"
    assert second == "<3>[mtlsproxy] boom"
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    out = io.StringIO()
    assert not writes_to_journal(out)
    emit(json_observer(out), "info", "plain")
    assert out.getvalue().startswith('{"time"')


def test_journal_observer_multiline_tracebacks() -> None:
    """The text observer puts a failure's traceback on the following lines."""
    out = io.StringIO()
    log = Logger(namespace="mtlsproxy", observer=journal_observer(out))
    try:
        raise ValueError("x")
    except ValueError:
        log.failure("oops")
    text = out.getvalue()
    assert text.startswith("[mtlsproxy] oops\nTraceback")
    assert "ValueError: x" in text


def test_observer_never_raises() -> None:
    """A broken output stream does not make the observer raise into Twisted's logging."""

    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise OSError("disk full")

    emit(json_observer(Broken()), "info", "hello")


def test_twistd_logger_option_finds_the_factory() -> None:
    """`--logger=mtlsproxy.logformat.json_observer` is a factory twistd calls with no arguments."""
    factory = namedAny("mtlsproxy.logformat.json_observer")
    logger = AppLogger({"logger": factory})
    observer = factory()
    assert ILogObserver.providedBy(observer)
    assert logger._observerFactory is factory
    assert ILogObserver.providedBy(namedAny("mtlsproxy.logformat.journal_observer")())


@pytest.mark.e2e
def test_daemon_logs_json(tmp_path: Path) -> None:
    """The daemon under `twistd --logger=...json_observer` writes only JSON lines, start to stop."""
    ca = cf.make_ca()
    cert, key = cf.make_server(ca).write(tmp_path, "server")
    (tmp_path / "ca.pem").write_bytes(cf.pem(ca.cert))
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
    proc = subprocess.Popen(
        [str(TWISTD), "--logger=mtlsproxy.logformat.json_observer", "--nodaemon", "--pidfile=",
         "mtlsproxy", "--listen", "tcp:0:interface=127.0.0.1", "--backend", "http://127.0.0.1:9",
         "--cert", str(cert), "--key", str(key), "--ca", str(tmp_path / "ca.pem")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env=env,
    )
    assert proc.stdout is not None
    seen: list[bytes] = []
    buffer = b""
    deadline = time.monotonic() + 20
    try:
        while not any(b"listening on" in line for line in seen):
            remaining = deadline - time.monotonic()
            assert remaining > 0 and proc.poll() is None, b"".join(seen + [buffer]).decode()
            ready, _, _ = select.select([proc.stdout], [], [], remaining)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                seen += complete
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = [line for line in (b"\n".join(seen) + b"\n" + buffer + rest).splitlines() if line]
    records = [json.loads(line) for line in output]  # every line is JSON
    assert proc.returncode == 0
    listening = [r for r in records if r["namespace"] == "mtlsproxy" and "address" in r]
    assert listening and listening[0]["backend"] == "http://127.0.0.1:9"
    assert all({"time", "level", "namespace", "message"} <= r.keys() for r in records)


# -- the access line's fast path ---------------------------------------------


def _access_event(line: str, when: float) -> dict[str, Any]:
    return {
        "log_format": "{line}",
        "log_namespace": "mtlsproxy.access",
        "log_level": LogLevel.info,
        "log_time": when,
        "line": line,
        "status": 200,
    }


def test_fast_access_lines_are_byte_for_byte_twisteds() -> None:
    """
    speed_up_access_lines changes twistd's text observer, and what it writes
    is exactly what Twisted's own formatting would have written, across
    second boundaries, for braces and non-ASCII, and for other events.
    """
    from twisted.logger import LogPublisher, textFileLogObserver

    from mtlsproxy.logformat import AccessLineFormat, speed_up_access_lines

    fast_out, slow_out = io.StringIO(), io.StringIO()
    publisher = LogPublisher()
    fast, slow = textFileLogObserver(fast_out), textFileLogObserver(slow_out)
    publisher.addObserver(fast)
    assert speed_up_access_lines(publisher) == 1
    assert isinstance(fast.formatEvent, AccessLineFormat)
    assert speed_up_access_lines(publisher) == 0  # never wrapped twice
    events = [
        _access_event('10.0.0.1:5 alice "GET /{a}?b=%7B HTTP/1.1" 200 3 0.001s', t)
        for t in (1700000000.0, 1700000000.999, 1700000001.0, 1700003600.5, 1800000000.1)
    ]
    events.append(_access_event('::1 J%C3%BCrgen "POST /é HTTP/1.0" 502 0 1.250s', 1700000002.0))
    events.append({"log_format": "refused {peer}: {reason}", "log_namespace": "mtlsproxy",
                   "log_level": LogLevel.info, "log_time": 1700000002.5, "peer": "x",
                   "reason": "unknown CA"})
    events.append({**_access_event("with system", 1700000003.0), "log_system": "worker-1"})
    events.append({**_access_event("warned", 1700000003.0), "log_level": LogLevel.warn})
    for event in events:
        publisher(dict(event))
        slow(dict(event))
    assert fast_out.getvalue() == slow_out.getvalue()
    assert fast_out.getvalue().count("\n") == len(events)


def test_other_file_observers_keep_their_format() -> None:
    """A JSON FileLogObserver, or text with another time format, is left alone."""
    from twisted.logger import LogPublisher, jsonFileLogObserver, textFileLogObserver

    from mtlsproxy.logformat import speed_up_access_lines

    publisher = LogPublisher()
    json_observer_ = jsonFileLogObserver(io.StringIO())
    odd_time = textFileLogObserver(io.StringIO(), timeFormat="%H:%M:%S.%f")
    publisher.addObserver(json_observer_)
    publisher.addObserver(odd_time)
    before = (json_observer_.formatEvent, odd_time.formatEvent)
    assert speed_up_access_lines(publisher) == 0
    assert (json_observer_.formatEvent, odd_time.formatEvent) == before


@pytest.mark.parametrize("as_json", [True, False])
def test_line_observers_render_access_lines_as_formatEvent_would(as_json: bool) -> None:
    """The JSON and journal observers' shortcut for access lines changes nothing."""
    from twisted.logger import formatEvent

    from mtlsproxy.logformat import event_as_json, event_as_text

    event = _access_event('10.0.0.1:5 alice "GET /{x} HTTP/1.1" 200 3 0.001s', 1700000000.5)
    if as_json:
        record = json.loads(event_as_json(event))
        assert record["message"] == formatEvent(event) and record["status"] == 200
    else:
        assert event_as_text(event) == f"[mtlsproxy.access] {formatEvent(event)}"
