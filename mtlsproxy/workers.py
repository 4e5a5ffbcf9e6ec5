"""
C{--workers N}: N processes accepting on one listening socket.

A Python process uses one core; TLS handshakes and per-request work scale
with processes.  The master (the process twistd runs) opens the listening
socket -- before privileges are dropped, and through any endpoint, socket
activation included -- but never accepts on it.  Each worker is
C{python -m mtlsproxy.workers}, inherits the socket as file descriptor 3,
adopts it (C{reactor.adoptStreamPort}) and runs the ordinary proxy service on
it, so the kernel spreads new connections over the workers.

The master forwards SIGHUP (every worker reloads), turns SIGTERM into a
graceful stop of every worker (each drains for C{--shutdown-timeout}), and
replaces a worker that dies, with a growing delay if it keeps dying.
"""

from __future__ import annotations

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
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import notify
from .config import Config

log = Logger("mtlsproxy")

#: the environment variable that carries a worker's configuration
SPEC_ENV = "MTLSPROXY_WORKER_SPEC"
#: where a worker finds the listening socket
WORKER_FD = 3
_FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}


def worker_spec(given: dict[str, Any], config_file: Path | None, family: str, index: int) -> str:
    """
    What a worker needs to build the same configuration the master validated:
    the options as given (not the resolved Config, which holds passwords
    read from files that the worker reads itself) and the TOML file.
    """
    return json.dumps(
        {
            "given": given,
            "config": str(config_file) if config_file is not None else None,
            "family": family,
            "index": index,
        }
    )


class _Worker(ProcessProtocol):
    def __init__(self, master: WorkersService, index: int) -> None:
        self.master = master
        self.index = index
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.master._ended(self, reason)
        self.ended.callback(None)


class WorkersService(MultiService):
    """The master: holds the listening socket, starts and watches the workers."""

    #: seconds before restarting a worker that died; doubled while they keep dying
    first_delay = 0.5
    max_delay = 30.0

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
        self._delay = self.first_delay
        self._restarts: dict[int, IDelayedCall] = {}

    def privilegedStartService(self) -> None:
        from .service import _listen_now, install_signals, listen_failed, with_backlog

        # Before "listening on" is logged: see ProxyService.privilegedStartService.
        install_signals(self.reactor, self._forward_hup, self._stop_requested)
        try:
            # The factory is never used: the master does not accept.
            unused = Factory()
            unused.noisy = False
            self.port = _listen_now(
                self.reactor, "--listen", with_backlog(self.config.listen), unused
            )
        except Exception as e:  # ListenError: one line, exit 1
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
        super().privilegedStartService()

    def startService(self) -> None:
        from .service import install_signals

        super().startService()
        for index in range(1, self.config.workers + 1):
            self._spawn(index)
        self.reactor.addSystemEventTrigger(
            "after",
            "startup",
            lambda: install_signals(self.reactor, self._forward_hup, self._stop_requested),
        )
        self.reactor.callWhenRunning(notify.ready)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        if self.stopping or self.port is None:
            return
        worker = _Worker(self, index)
        env = dict(os.environ)
        env[SPEC_ENV] = worker_spec(self.given, self.config_file, self.family, index)
        env.pop("NOTIFY_SOCKET", None)  # only the master speaks to systemd
        env.pop("LISTEN_FDS", None)
        env.pop("LISTEN_PID", None)
        env.pop("LISTEN_FDNAMES", None)
        self.reactor.spawnProcess(
            worker,
            sys.executable,
            [sys.executable, "-m", "mtlsproxy.workers"],
            env=env,
            childFDs={0: "w", 1: 1, 2: 2, WORKER_FD: self.port.fileno()},
        )
        self.workers[index] = worker

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.stopping:
            return
        status = reason.value
        code = getattr(status, "exitCode", None)
        sig = getattr(status, "signal", None)
        how = f"signal {sig}" if sig else f"status {code}"
        log.error(
            "worker {index} exited ({how}); starting another in {delay:g}s",
            index=worker.index,
            how=how,
            delay=self._delay,
        )
        self._restarts[worker.index] = self.reactor.callLater(
            self._delay, self._spawn, worker.index
        )
        self._delay = min(self._delay * 2, self.max_delay)

    def _forward_hup(self) -> None:
        log.info("SIGHUP: asking {n} workers to reload", n=len(self.workers))
        notify.reloading()
        self._signal_all("HUP")
        notify.ready()

    def _signal_all(self, name: str) -> None:
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess(name)  # type: ignore[union-attr]
            except error.ProcessExitedAlready:
                pass

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

        d.addCallback(done)
        return d


def main() -> None:
    """A worker: the proxy service on the inherited socket, until SIGTERM."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from .config import build_config
    from .errors import MtlsProxyError
    from .service import make_service

    spec = json.loads(os.environ.pop(SPEC_ENV))
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stdout)], redirectStandardIO=False, discardBuffer=True
    )
    try:
        config_file = Path(spec["config"]) if spec["config"] else None
        config = build_config(spec["given"], config_file)
        service = make_service(config, reactor)
    except MtlsProxyError as e:
        os.write(2, f"mtlsproxy worker {spec['index']}: {e}\n".encode())
        raise SystemExit(1) from None
    service.adopt = (WORKER_FD, _FAMILIES[spec["family"]])
    service.worker_index = spec["index"]
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master decides when workers stop
    main()
