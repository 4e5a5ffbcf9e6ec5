"""
C{--workers N}: N processes accepting on one listening socket.

A Python process uses one core; TLS handshakes and per-request work scale
with processes.  The master (the process twistd runs) opens the listening
socket -- before privileges are dropped, and through any endpoint, socket
activation included -- but never accepts on it.  Each worker is
C{python -m mtlsproxy.workers}, inherits the socket as file descriptor 3,
adopts it (C{reactor.adoptStreamPort}) and runs the ordinary proxy service on
it, so the kernel spreads new connections over the workers.

Each worker also gets a pipe to the master (its file descriptor 4) on which
it reports, one line each, C{accepting} once it accepts with its signal
handlers in place, and C{reload ok} or C{reload failed REASON} after each
reload.  The master speaks to systemd for all of them: C{READY=1} only once
every worker accepts, so a unit ordered after the proxy never meets a socket
that nobody accepts on; on SIGHUP C{RELOADING=1}, then C{READY=1} only once
every worker has reported its reload (or L{WorkersService.reload_timeout}
passed), with a C{STATUS=} naming any worker whose reload failed.  SIGHUP is
forwarded only to workers that reported C{accepting}: before its handler is
installed, a SIGHUP would kill a worker (the default action), so one that is
still starting gets it as soon as it reports.

The master turns SIGTERM into a graceful stop of every worker (each drains for
C{--shutdown-timeout}), and replaces a worker that dies, with a delay that
doubles while that worker keeps dying soon after starting and starts over
once one has run for L{WorkersService.stable_after} seconds (systemd's
restart-burst idea).

With C{--metrics}, the master alone listens there and serves the sum of the
workers' numbers (L{metrics.WorkersMetrics}): it makes a private directory
for them at start, names it to each worker in C{PROMETHEUS_MULTIPROC_DIR},
forgets a dead worker's connection gauges, and removes the directory once
every worker has stopped.  Its C{/readyz} also wants every worker accepting.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import logformat, notify
from .config import Config
from .metrics import (
    MULTIPROC_ENV,
    WorkersMetrics,
    backend_probe,
    make_multiprocess_dir,
    metrics_site,
    remove_multiprocess_dir,
)

log = Logger("mtlsproxy")

#: the environment variable that carries a worker's configuration
SPEC_ENV = "MTLSPROXY_WORKER_SPEC"
#: where a worker finds the listening socket
WORKER_FD = 3
#: where a worker writes its reports to the master (L{Reporter})
CONTROL_FD = 4

#: seconds between two writes of a worker's open-connection gauges (--metrics)
METRICS_REFRESH = 1.0

#: the reports, one line each
ACCEPTING = "accepting"
RELOAD_OK = "reload ok"
RELOAD_FAILED = "reload failed"
_FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}


def worker_spec(
    given: dict[str, Any], config_file: Path | None, family: str, index: int, log: str = "text"
) -> str:
    """
    What a worker needs to build the same configuration the master validated:
    the options as given (not the resolved Config, which holds passwords
    read from files that the worker reads itself) and the TOML file; and
    the master's log format (L{logformat.OBSERVER_KINDS}).
    """
    return json.dumps(
        {
            "given": given,
            "config": str(config_file) if config_file is not None else None,
            "family": family,
            "index": index,
            "log": log,
        }
    )


class Reporter:
    """
    A worker's side of the pipe to the master.  Best effort: a master gone
    (the pipe closed) must not take the worker down while it drains.
    """

    def __init__(self, fd: int = CONTROL_FD) -> None:
        self.fd = fd

    def send(self, line: str) -> None:
        try:
            os.write(self.fd, (" ".join(line.splitlines()) + "\n").encode("utf-8"))
        except OSError:
            pass

    def reloaded(self, error: str | None) -> None:
        """A L{ProxyService.reload_listener}."""
        self.send(RELOAD_OK if error is None else f"{RELOAD_FAILED} {error}")


def restart_delay(
    previous: float, uptime: float, first: float, most: float, stable_after: float
) -> tuple[float, float]:
    """
    How long to wait before replacing a worker that ran C{uptime} seconds,
    and the wait after that if its replacement dies too: C{(now, next)}.

    A worker that ran for C{stable_after} seconds or more was not crashing
    in a loop, so its replacement starts after C{first}, as after a first
    death; otherwise C{previous} applies and the next wait doubles, up to
    C{most}.
    """
    now = first if uptime >= stable_after else previous
    return now, min(now * 2, most)


def reload_summary(failed: dict[int, str], silent: list[int], timeout: float) -> str | None:
    """
    What a reload's C{READY=1} says in C{STATUS=} about workers that did not
    reload: C{None} when every worker did (L{notify.reload_status} applies).
    """
    problems = [f"worker {index}: {failed[index]}" for index in sorted(failed)]
    problems += [f"worker {index}: no answer within {timeout:g}s" for index in sorted(silent)]
    return "; ".join(problems) or None


class _Reload:
    """A SIGHUP being carried out: the workers that still owe their report."""

    def __init__(self, deadline: IDelayedCall) -> None:
        self.deadline = deadline
        #: worker number -> reports still owed (a second SIGHUP owes another)
        self.waiting: dict[int, int] = {}
        self.failed: dict[int, str] = {}


class _Worker(ProcessProtocol):
    def __init__(self, master: WorkersService, index: int, started: float) -> None:
        self.master = master
        self.index = index
        self.started = started
        #: reported C{accepting}: its SIGHUP handler is installed
        self.accepting = False
        #: a SIGHUP came before it was accepting: send it when it is
        self.hup_pending = False
        self._buffer = b""
        #: the unfinished last line of what it wrote on fd 1 and 2, when relayed
        self._output: dict[int, bytes] = {1: b"", 2: b""}
        self.ended: defer.Deferred[None] = defer.Deferred()
        #: its process id, kept for after it ended (its metric files are named by it)
        self.pid: int | None = None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD in self._output:
            # Its log, when the master's goes to a file (see _spawn): whole
            # lines only, so that two workers' lines never interleave.
            pending = self._output[childFD] + data
            end = pending.rfind(b"\n") + 1
            self._output[childFD] = pending[end:]
            if end and self.master.log_destination is not None:
                logformat.relay_lines(self.master.log_destination, pending[:end])
            return
        if childFD != CONTROL_FD:
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self.master._report(self, line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._output.items():
            if rest and self.master.log_destination is not None:
                logformat.relay_lines(self.master.log_destination, rest + b"\n")
            self._output[fd] = b""
        self.master._ended(self, reason)
        self.ended.callback(None)


class WorkersNotReady(Exception):
    """Why the master's C{/readyz} answers 503 while a worker does not accept."""

    def __init__(self, accepting: int, wanted: int) -> None:
        super().__init__(f"{accepting} of {wanted} workers accepting")


class WorkersService(MultiService):
    """The master: holds the listening socket, starts and watches the workers."""

    #: seconds before restarting a worker that died; doubled while it keeps dying
    first_delay = 0.5
    max_delay = 30.0
    #: a worker that ran this long before dying starts the delays over
    stable_after = 10.0
    #: the longest a reload waits for a worker's report before READY=1 goes out anyway
    reload_timeout = 30.0

    def __init__(
        self, config: Config, reactor: Any, given: dict[str, Any], config_file: Path | None
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.given = given
        self.config_file = config_file
        #: the listening port: a tcp/unix Port, with fileno() and stopReading()
        self.port: Any = None
        self.family = "INET"
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        #: per worker number: the wait before its next replacement
        self._delays: dict[int, float] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._ready_sent = False
        self._reload: _Reload | None = None
        #: the master's log format, which the workers use too (logformat.observer_kind)
        self.log_kind = "text"
        #: the master's log stream when the workers cannot write there themselves
        #: (logformat.log_destination): they write to a pipe, the master relays
        self.log_destination: Any = None
        #: with --metrics: the sum of the workers' files, served by the master
        self.metrics: WorkersMetrics | None = (
            WorkersMetrics() if config.metrics is not None else None
        )
        self.metrics_port: Any = None

    def privilegedStartService(self) -> None:
        from .service import (
            _format_address,
            _listen_now,
            install_signals,
            listen_failed,
            with_backlog,
        )

        # Before "listening on" is logged: see ProxyService.privilegedStartService.
        install_signals(self.reactor, self._forward_hup, self._stop_requested)
        try:
            # The factory is never used: the master does not accept.
            unused = Factory()
            unused.noisy = False
            self.port = _listen_now(
                self.reactor, "--listen", with_backlog(self.config.listen), unused,
                written=self.config.listen,
            )
            if self.metrics is not None and self.config.metrics is not None:
                self.metrics_port = _listen_now(
                    self.reactor, "--metrics", self.config.metrics,
                    metrics_site(self.metrics, self._ready, self.reactor),
                )
        except Exception as e:  # ListenError: one line, exit 1
            if self.port is not None:
                self.port.stopListening()
            listen_failed(e)
        assert self.port is not None
        self.port.stopReading()
        host = self.port.getHost()
        self.family = (
            "INET6" if isinstance(host, IPv6Address)
            else "UNIX" if isinstance(host, UNIXAddress)
            else "INET" if isinstance(host, IPv4Address)
            else "INET"
        )
        log.info(
            "mtlsproxy listening on {address} with {workers} workers, forwarding to {backend}",
            address=f"{getattr(host, 'host', host)}:{getattr(host, 'port', '')}",
            workers=self.config.workers,
            backend=self.config.backend.url,
        )
        if self.metrics_port is not None:
            log.info(
                "metrics on http://{address}/metrics",
                address=_format_address(self.metrics_port.getHost()),
            )
        super().privilegedStartService()

    def _ready(self) -> defer.Deferred[bool]:
        """C{/readyz}: not while stopping, nor until every worker accepts; then the backend."""
        from .service import ShuttingDown

        if self.stopping:
            return defer.fail(ShuttingDown())
        accepting = sum(1 for w in self.workers.values() if w.accepting)
        if accepting < self.config.workers:
            return defer.fail(WorkersNotReady(accepting, self.config.workers))
        if self._probe is None:
            self._probe = backend_probe(
                self.reactor, self.config.backend, self.config.backend_connect_timeout
            )
        return self._probe()

    _probe: Any = None

    def startService(self) -> None:
        from .service import install_signals

        super().startService()
        # twistd began logging before the services start.
        self.log_kind = logformat.observer_kind()
        self.log_destination = logformat.log_destination()
        if self.metrics is not None:
            # Now, not in privilegedStartService: made by the user the workers
            # run as, after twistd has dropped privileges.
            self.metrics.path = make_multiprocess_dir()
            log.debug("worker metrics in {path}", path=self.metrics.path)
        for index in range(1, self.config.workers + 1):
            self._spawn(index)
        self.reactor.addSystemEventTrigger(
            "after",
            "startup",
            lambda: install_signals(self.reactor, self._forward_hup, self._stop_requested),
        )
        # READY=1 waits for the workers: see _report.

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        if self.stopping or self.port is None:
            return
        worker = _Worker(self, index, self.reactor.seconds())
        env = dict(os.environ)
        env[SPEC_ENV] = worker_spec(
            self.given, self.config_file, self.family, index, self.log_kind
        )
        env.pop("NOTIFY_SOCKET", None)  # only the master speaks to systemd
        env.pop("LISTEN_FDS", None)
        env.pop("LISTEN_PID", None)
        env.pop("LISTEN_FDNAMES", None)
        env.pop(MULTIPROC_ENV, None)
        if self.metrics is not None and self.metrics.path is not None:
            # In the environment at spawn: prometheus_client reads it at import.
            env[MULTIPROC_ENV] = self.metrics.path
        process = self.reactor.spawnProcess(
            worker,
            sys.executable,
            [sys.executable, "-m", "mtlsproxy.workers"],
            env=env,
            childFDs={
                0: "w",
                # Workers write their log where the master's goes: its own
                # stdout/stderr, or through the master into its log file.
                **({1: "r", 2: "r"} if self.log_destination is not None else {1: 1, 2: 2}),
                WORKER_FD: self.port.fileno(),
                CONTROL_FD: "r",
            },
        )
        worker.pid = getattr(process, "pid", None)
        self.workers[index] = worker

    # -- what the workers report ----------------------------------------------

    def _report(self, worker: _Worker, line: str) -> None:
        if self.workers.get(worker.index) is not worker:
            return  # a worker already replaced
        if line == ACCEPTING:
            worker.accepting = True
            if worker.hup_pending:
                worker.hup_pending = False
                self._signal(worker, "HUP")
            self._check_ready()
        elif line == RELOAD_OK:
            self._reloaded(worker.index, None)
        elif line.startswith(RELOAD_FAILED):
            self._reloaded(worker.index, line[len(RELOAD_FAILED):].strip() or "failed")
        else:
            log.warn("worker {index}: unknown report {line!r}", index=worker.index, line=line)

    def _check_ready(self) -> None:
        """READY=1, once, when every worker accepts."""
        if self._ready_sent or self.stopping:
            return
        accepting = sum(1 for w in self.workers.values() if w.accepting)
        if accepting < self.config.workers:
            return
        self._ready_sent = True
        log.info("all {n} workers ready", n=accepting)
        if self._reload is None:
            notify.ready(f"{accepting} workers accepting")

    # -- reload ----------------------------------------------------------------

    def _forward_hup(self) -> None:
        """
        SIGHUP: have every worker reload; RELOADING=1 now, READY=1 when all
        have reported (L{_reloaded}) or L{reload_timeout} has passed.
        """
        if self.stopping:
            return
        log.info("SIGHUP: asking {n} workers to reload", n=len(self.workers))
        if self._reload is None:
            notify.reloading()
            deadline = self.reactor.callLater(self.reload_timeout, self._reload_done)
            self._reload = _Reload(deadline)
        for worker in list(self.workers.values()):
            waiting = self._reload.waiting
            waiting[worker.index] = waiting.get(worker.index, 0) + 1
            if worker.accepting:
                self._signal(worker, "HUP")
            else:
                worker.hup_pending = True  # a SIGHUP now would kill it: see _report
        if not self._reload.waiting:
            self._reload_done()

    def _reloaded(self, index: int, error: str | None) -> None:
        reload = self._reload
        if reload is None or index not in reload.waiting:
            return  # a worker's own --reload-interval reload: nothing to report
        if error is not None:
            reload.failed[index] = error
        reload.waiting[index] -= 1
        if reload.waiting[index] <= 0:
            del reload.waiting[index]
        if not reload.waiting:
            self._reload_done()

    def _reload_done(self) -> None:
        """Every worker reported, or the deadline passed: READY=1 and how it went."""
        reload, self._reload = self._reload, None
        if reload is None:
            return
        if reload.deadline.active():
            reload.deadline.cancel()
        problems = reload_summary(reload.failed, list(reload.waiting), self.reload_timeout)
        if problems is None:
            log.info("every worker reloaded")
        else:
            log.error("reload incomplete: {problems}", problems=problems)
        status = notify.reload_status(problems)
        if self._ready_sent:
            notify.ready(status)
        else:
            notify.status(status)
            self._check_ready()

    def _signal(self, worker: _Worker, name: str) -> None:
        try:
            worker.transport.signalProcess(name)  # type: ignore[union-attr]
        except error.ProcessExitedAlready:
            pass

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.metrics is not None and worker.pid is not None:
            self.metrics.mark_dead(worker.pid)
        if self.stopping:
            return
        status = reason.value
        code = getattr(status, "exitCode", None)
        sig = getattr(status, "signal", None)
        how = f"signal {sig}" if sig else f"status {code}"
        delay, self._delays[worker.index] = restart_delay(
            self._delays.get(worker.index, self.first_delay),
            self.reactor.seconds() - worker.started,
            self.first_delay,
            self.max_delay,
            self.stable_after,
        )
        log.error(
            "worker {index} exited ({how}); starting another in {delay:g}s",
            index=worker.index,
            how=how,
            delay=delay,
        )
        self._restarts[worker.index] = self.reactor.callLater(delay, self._spawn, worker.index)
        if self._reload is not None and worker.index in self._reload.waiting:
            # Its replacement reads the files afresh; record that it went.
            del self._reload.waiting[worker.index]
            self._reload.failed.setdefault(worker.index, f"exited during the reload ({how})")
            if not self._reload.waiting:
                self._reload_done()

    def _signal_all(self, name: str) -> None:
        for worker in list(self.workers.values()):
            self._signal(worker, name)

    _stop_asked = False

    def _stop_requested(self) -> None:
        if self._stop_asked:
            return  # a second SIGTERM while the workers drain changes nothing
        self._stop_asked = True
        log.info("received SIGTERM, stopping the workers")
        self.reactor.stop()

    def stopService(self) -> defer.Deferred[None]:
        """Ask every worker to drain and stop; wait for them (killing stragglers)."""
        notify.stopping()
        self.stopping = True
        super().stopService()
        if self._reload is not None and self._reload.deadline.active():
            self._reload.deadline.cancel()
        self._reload = None
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        waiting = [w.ended for w in self.workers.values()]
        self._signal_all("TERM")
        kill = self.reactor.callLater(self.config.shutdown_timeout + 5, self._signal_all, "KILL")
        if self.port is not None:
            port, self.port = self.port, None
            port.stopListening()

        d: defer.Deferred[Any] = defer.DeferredList(waiting)

        def done(_: object) -> None:
            if kill.active():
                kill.cancel()
            # Every worker has stopped writing: the metrics go with the master.
            if self.metrics_port is not None:
                metrics_port, self.metrics_port = self.metrics_port, None
                metrics_port.stopListening()
            if self.metrics is not None and self.metrics.path is not None:
                path, self.metrics.path = self.metrics.path, None
                remove_multiprocess_dir(path)

        d.addCallback(done)
        return d


def main() -> None:
    """A worker: the proxy service on the inherited socket, until SIGTERM."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from .config import build_config
    from .errors import MtlsProxyError
    from .service import make_service

    spec = json.loads(os.environ.pop(SPEC_ENV))
    observer = logformat.worker_observer(spec.get("log", "text"), spec["index"], sys.stdout)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False, discardBuffer=True)
    reporter = Reporter()
    try:
        config_file = Path(spec["config"]) if spec["config"] else None
        # The master alone listens on --metrics: a worker's numbers reach it
        # through the files in PROMETHEUS_MULTIPROC_DIR.
        config = dataclasses.replace(build_config(spec["given"], config_file), metrics=None)
        service = make_service(config, reactor)
    except MtlsProxyError as e:
        os.write(2, f"mtlsproxy worker {spec['index']}: {e}\n".encode())
        raise SystemExit(1) from None
    service.adopt = (WORKER_FD, _FAMILIES[spec["family"]])
    service.worker_index = spec["index"]
    service.reload_listener = reporter.reloaded
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    # After startService's own "after startup" trigger, which installs the
    # SIGHUP handler: only then may the master forward SIGHUP here.
    reactor.callWhenRunning(reporter.send, ACCEPTING)
    if service.metrics.multiprocess:
        # The master reads the files, not this process: keep the
        # open-connection gauges written down (Metrics.refresh).
        refresh = LoopingCall(service.metrics.refresh)
        refresh.clock = reactor
        refresh.start(METRICS_REFRESH, now=False)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master decides when workers stop
    # Until the reload handler is installed, a SIGHUP (say, to the whole
    # process group) must not kill the worker; the master sends none before
    # the worker reports "accepting", and a new worker reads the files anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    main()
