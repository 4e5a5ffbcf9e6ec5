"""
Log observers for twistd's C{--logger} option.

C{twistd --logger=mtlsproxy.logformat.json_observer -n mtlsproxy ...} writes
one JSON object per line to stdout, for log shippers (Loki, Elasticsearch,
C{journalctl -o cat | jq}) that would otherwise have to parse free text:

    {"time": "2026-05-11T10:00:00.123Z", "level": "info",
     "namespace": "mtlsproxy.access", "message": "127.0.0.1:50312 alice ...",
     "peer": "127.0.0.1:50312", "cn": "alice", "status": 200, ...}

The event's own fields (C{peer}, C{reason}, C{status}, ...) are kept as
top-level keys so that they can be queried without parsing C{message}; a field
whose name clashes with one of the five fixed keys gets the prefix C{field_}.

C{twistd --logger=mtlsproxy.logformat.journal_observer} is the plain-text
alternative for the journal: no timestamp (the journal has its own) and the
level as a syslog priority, so C{journalctl -p warning -u mtlsproxy} works.

Both add the syslog priority prefix (C{<4>}) only when stdout really is the
journal's stream (systemd's C{JOURNAL_STREAM}), which journald strips; written
to a terminal or a file, each JSON line is plain JSON.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Mapping
from pathlib import PurePath
from typing import IO, Any

from constantly import NamedConstant
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
)
from twisted.python.compat import ioType
from twisted.python.failure import Failure
from zope.interface import implementer

#: The keys every JSON line has; event fields with these names are prefixed.
FIXED_KEYS = ("time", "level", "namespace", "message", "system")
#: The key naming the C{--workers} process in a worker's JSON lines.
WORKER_KEY = "worker"

#: Keys of events from the legacy C{twisted.python.log} API that are not data.
_LEGACY_KEYS = frozenset({"message", "time", "system", "isError", "format", "why", "failure"})

#: LogLevel -> syslog priority (sd-daemon(3) prefixes).
_PRIORITY: dict[NamedConstant, int] = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}


def _level(event: LogEvent) -> NamedConstant:
    level = event.get("log_level")
    # LogLevel's members are NamedConstants, not LogLevel instances.
    if level in _PRIORITY:
        return level
    return LogLevel.error if event.get("isError") else LogLevel.info


def _jsonable(value: Any) -> Any:
    """A JSON-encodable form of an event field; never raises."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, NamedConstant):
        return value.name
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _timestamp(event: LogEvent) -> str:
    seconds = event.get("log_time")
    if not isinstance(seconds, int | float):
        seconds = event.get("time")
    if not isinstance(seconds, int | float):
        return ""
    when = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _failure(event: LogEvent) -> Failure | None:
    failure = event.get("log_failure", event.get("failure"))
    return failure if isinstance(failure, Failure) else None


def event_as_json(event: LogEvent, worker: int | None = None) -> str:
    """
    One event as one line of JSON (no newline); never raises.

    @param worker: the C{--workers} process number, as the key C{worker}.
    """
    record: dict[str, Any] = {
        "time": _timestamp(event),
        "level": _level(event).name,
        "namespace": str(event.get("log_namespace", "")),
        "message": event["line"] if _is_plain_access(event) else formatEvent(event),
    }
    system = event.get("log_system", event.get("system"))
    if system is not None and system != "-":
        record["system"] = _jsonable(system)
    if worker is not None:
        record[WORKER_KEY] = worker
    legacy = "log_legacy" in event or "isError" in event
    for key, value in event.items():
        if not isinstance(key, str) or key.startswith("log_"):
            continue
        if legacy and key in _LEGACY_KEYS:
            continue
        clash = key in FIXED_KEYS or (worker is not None and key == WORKER_KEY)
        name = f"field_{key}" if clash else key
        record[name] = _jsonable(value)
    failure = _failure(event)
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)
    try:
        return json.dumps(record, ensure_ascii=False, default=str)
    except (TypeError, ValueError) as e:
        fallback = {k: record[k] for k in ("time", "level", "namespace")}
        fallback["message"] = f"unencodable log event: {e}"
        return json.dumps(fallback)


def event_as_text(event: LogEvent, worker: int | None = None) -> str:
    """
    C{[namespace] message}, the traceback of a failure on the lines after;
    C{[namespace] [worker N] message} in a C{--workers} process.
    """
    tag = worker_tag(worker)
    if _is_plain_access(event):
        return f"[{ACCESS_NAMESPACE}] {tag}{event['line']}"
    text = f"[{event.get('log_namespace', '-')}] {tag}{formatEvent(event)}"
    failure = _failure(event)
    if failure is not None:
        try:
            text += "\n" + failure.getTraceback().rstrip("\n")
        except Exception:
            text += f"\n{failure!r}"
    return text


def writes_to_journal(out: IO[str], environ: Mapping[str, str] = os.environ) -> bool:
    """
    Whether C{out} is the journal's stream: systemd sets C{JOURNAL_STREAM} to
    the C{device:inode} of the stream it connected stdout or stderr to.
    """
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(out.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(device) and st.st_ino == int(inode)


@implementer(ILogObserver)
class LineObserver:
    """
    Write each event as one line (a JSON object, or text) and flush, so that a
    line reaches the journal when it is logged, not when a buffer fills.
    """

    def __init__(
        self, out: IO[str], as_json: bool, priority_prefix: bool, worker: int | None = None
    ) -> None:
        self.out = out
        self.as_json = as_json
        self.priority_prefix = priority_prefix
        self.worker = worker

    def __call__(self, event: LogEvent) -> None:
        try:
            if self.as_json:
                text = event_as_json(event, self.worker)
            else:
                text = event_as_text(event, self.worker)
            prefix = f"<{_PRIORITY.get(_level(event), 6)}>" if self.priority_prefix else ""
            if prefix and "\n" in text:
                # journald prefixes only apply to one line; continuation
                # lines of a traceback keep the event's priority this way.
                text = "\n".join(prefix + line for line in text.split("\n"))
            else:
                text = prefix + text
            self.out.write(text + "\n")
            self.out.flush()
        except Exception:
            # An observer must never raise: Twisted would drop it and log the
            # error through the remaining observers, i.e. nowhere.
            pass


def json_observer(out: IO[str] | None = None) -> LineObserver:
    """
    The factory for C{twistd --logger=mtlsproxy.logformat.json_observer}:
    one JSON object per line on stdout.
    """
    stream = sys.stdout if out is None else out
    return LineObserver(stream, as_json=True, priority_prefix=writes_to_journal(stream))


def journal_observer(out: IO[str] | None = None) -> LineObserver:
    """
    The factory for C{twistd --logger=mtlsproxy.logformat.journal_observer}:
    C{[namespace] message} lines without a timestamp, at their syslog priority.
    """
    stream = sys.stdout if out is None else out
    return LineObserver(stream, as_json=False, priority_prefix=writes_to_journal(stream))


# -- the access line's fast path ----------------------------------------------

#: The namespace and format of access lines (http/server.py): the whole line
#: is one pre-formatted field, so it can be written without Twisted's
#: generic formatting.
ACCESS_NAMESPACE = "mtlsproxy.access"
ACCESS_FORMAT = "{line}"


def _is_plain_access(event: LogEvent) -> bool:
    """An access event that renders exactly as its C{line} field."""
    line = event.get("line")
    return (
        event.get("log_format") == ACCESS_FORMAT
        and event.get("log_namespace") == ACCESS_NAMESPACE
        and event.get("log_level") is LogLevel.info
        and "log_system" not in event
        and "log_failure" not in event
        and isinstance(line, str)
        and "\n" not in line
        and isinstance(event.get("log_time"), int | float)
    )


class AccessLineFormat:
    """
    A C{FileLogObserver.formatEvent} that renders access lines itself, byte
    for byte as Twisted's classic text format would, and hands every other
    event to the format it replaces.

    twistd's text observer spent about 30 us on each access line (a string
    formatter pass, three timezone conversions and a C{strftime}), a third of
    a keep-alive request's whole cost (docs/performance.md).  The timestamp
    has whole-second resolution, so it is formatted once a second.
    """

    def __init__(self, inner: Any, tag: str = "") -> None:
        """
        @param tag: put before each access line's text, as the worker's
            C{inner} puts it before every other message (L{worker_observer}).
        """
        self.inner = inner
        self.tag = tag
        self._second: int | None = None
        self._prefix = ""

    def __call__(self, event: LogEvent) -> str | None:
        if not _is_plain_access(event):
            return self.inner(event)  # type: ignore[no-any-return]
        when = event["log_time"]
        second = int(when)
        if second != self._second:
            self._prefix = f"{formatTime(when)} [{ACCESS_NAMESPACE}#info] {self.tag}"
            self._second = second
        return f"{self._prefix}{event['line']}\n"


def speed_up_access_lines(publisher: Any = None) -> int:
    """
    Give each classic text L{FileLogObserver} on C{publisher} (twistd's
    default observer, or a worker's) the L{AccessLineFormat} fast path, and
    return how many were changed.

    An observer is changed only if a probe access event renders identically
    both ways, so an observer with another time format or layout (JSON, a
    custom one) keeps its own.
    """
    if publisher is None:
        publisher = globalLogPublisher
    changed = 0
    # LogPublisher has no public way to list its observers.
    for observer in list(getattr(publisher, "_observers", ())):
        if not isinstance(observer, FileLogObserver):
            continue
        inner = observer.formatEvent
        if isinstance(inner, AccessLineFormat):
            continue
        fast = AccessLineFormat(inner)
        probe: dict[str, Any] = {
            "log_format": ACCESS_FORMAT,
            "log_namespace": ACCESS_NAMESPACE,
            "log_level": LogLevel.info,
            "log_time": 1700000000.25,
            "line": '127.0.0.1:1 probe "GET /{x} HTTP/1.1" 200 0 0.000s',
        }
        try:
            same = inner(dict(probe)) == fast(dict(probe))
        except Exception:
            same = False
        if same:
            observer.formatEvent = fast
            changed += 1
    return changed


# -- --workers processes ------------------------------------------------------

#: What L{observer_kind} finds and L{worker_observer} makes.
OBSERVER_KINDS = ("text", "json", "journal")


def worker_tag(worker: int | None) -> str:
    """C{"[worker 2] "}: what a worker's text lines carry before the message."""
    return "" if worker is None else f"[worker {worker}] "


def observer_kind(publisher: Any = None) -> str:
    """
    Which of L{OBSERVER_KINDS} the master logs with: C{json} or C{journal}
    when twistd was started with C{--logger=mtlsproxy.logformat.json_observer}
    (or C{journal_observer}), C{text} otherwise, so that its workers log the
    same way (L{worker_observer}) and one parser reads every line.
    """
    if publisher is None:
        publisher = globalLogPublisher
    for observer in list(getattr(publisher, "_observers", ())):
        if isinstance(observer, LineObserver):
            return "json" if observer.as_json else "journal"
    return "text"


def log_destination(publisher: Any = None) -> Any | None:
    """
    The stream the master's log observer writes to, when that is not the
    standard output or error its workers inherit: twistd's C{--logfile}
    (also the default C{twistd.log} of a daemon, whose fd 1 is /dev/null).
    C{None} when the workers can write to the same place themselves.

    Workers do not open the file themselves: twistd rotates it (every 1 MB
    by default) by renaming, and a worker would go on writing to the old
    file; nor can they share the master's descriptor, which is not opened
    for appending.
    """
    if publisher is None:
        publisher = globalLogPublisher
    for observer in list(getattr(publisher, "_observers", ())):
        if isinstance(observer, FileLogObserver):
            out = getattr(observer, "_outFile", None)
        elif isinstance(observer, LineObserver):
            out = observer.out
        else:
            continue
        if out is None:
            continue
        try:
            fd = out.fileno()
        except (AttributeError, OSError, ValueError):
            return out
        return None if fd in (1, 2) else out
    return None


def relay_lines(out: Any, lines: bytes) -> None:
    """Write complete lines a worker logged to the master's log stream C{out}, as they are."""
    try:
        if ioType(out) is str:
            out.write(lines.decode("utf-8", "replace"))
        else:
            out.write(lines)
        out.flush()
    except Exception:
        pass  # like an observer: logging must never take the master down


def worker_observer(kind: str, worker: int, out: IO[str] | None = None) -> ILogObserver:
    """
    The observer of worker number C{worker}: the master's format (C{kind},
    from L{observer_kind}) with the worker's number in each line, as the key
    C{worker} in JSON and as C{[worker N] } before the message in text.

    The text kind keeps the access lines' fast path (L{AccessLineFormat}),
    since workers exist for throughput.
    """
    stream = sys.stdout if out is None else out
    if kind in ("json", "journal"):
        return LineObserver(stream, kind == "json", writes_to_journal(stream), worker=worker)
    tag = worker_tag(worker)

    def classic(event: LogEvent) -> str | None:
        text = formatEventAsClassicLogText(event)
        if text is None:
            return None
        # "TIME [system] message": the tag goes before the message.
        head, sep, rest = text.partition("] ")
        return f"{head}{sep}{tag}{rest}" if sep else tag + text

    return FileLogObserver(stream, AccessLineFormat(classic, tag))
