"""
Service wiring: Config -> a Twisted service that listens, proxies, reloads and drains.

The TLS layer is put over whatever server endpoint the operator described
(C{tcp:}, C{tcp6:}, C{systemd:}), so socket activation needs no code of its own.
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Callable
from typing import Any, NoReturn

from OpenSSL import SSL
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import check, logformat, notify, shutdown, tls, watch
from .config import Config, refresh_passwords
from .errors import ListenError, MtlsProxyError
from .http.backend import BackendPool
from .http.server import ProxyFactory, ProxySettings
from .http.transport import CorkedTLSFactory
from .metrics import Metrics, backend_probe, metrics_site

log = Logger("mtlsproxy")

#: Seconds between two looks at what expires soon.  Start-up and reloads
#: warn too, but a daemon that runs for months without either must still say,
#: days ahead, that its certificate or a CRL is about to end.
EXPIRY_CHECK_INTERVAL = 12 * 3600


class ShuttingDown(Exception):
    """Why C{/readyz} answers 503 while draining: C{not ready: shutting down}."""

    def __str__(self) -> str:
        return "shutting down"


def _wall_clock() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def settings_from_config(config: Config) -> ProxySettings:
    return ProxySettings(
        handshake_timeout=config.handshake_timeout,
        idle_timeout=config.idle_timeout,
        backend_timeout=config.backend_timeout,
        max_header_bytes=config.max_header_bytes,
        client_auth_required=config.client_auth == "required",
        policy=config.policy(),
        header_settings=config.header_settings(),
        max_connections=config.max_connections,
    )


class ProxyService(MultiService):
    """
    The listening proxy, its metrics listener, reloads and graceful stop.

    The listeners are opened in C{privilegedStartService}, before twistd drops
    privileges (port 443), and synchronously, so that a port already in use
    ends start-up with one line instead of a logged traceback.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        creator: tls.ReloadableServerCreator,
        material: tls.Material,
        now: Callable[[], datetime.datetime] = _wall_clock,
    ) -> None:
        """
        @param now: the time expiry is judged against (tests tie it to the
            clock they give as C{reactor}).
        """
        super().__init__()
        self.config = config
        self.now = now
        self.reactor = reactor
        self.creator = creator
        self.metrics = Metrics()
        self.pool = BackendPool(reactor, config.backend, config.backend_connect_timeout)
        self.factory = ProxyFactory(
            settings_from_config(config), self.pool, reactor, metrics=self.metrics
        )
        self.metrics.watch_connections(
            lambda: len(self.factory.connections), lambda: self.pool.open_connections
        )
        self.port: IListeningPort | None = None
        self.metrics_port: IListeningPort | None = None
        self._watch: LoopingCall | None = None
        self._rotation: LoopingCall | None = None
        self._expiry: LoopingCall | None = None
        self._watched = watch.signature(watch.material_files(config))
        #: the error of the last reload, while it has not been followed by one that worked
        self._reload_error: str | None = None
        self._material = material
        self._material_digest = material.digest()
        self._record(material)

    # -- start -------------------------------------------------------------

    def privilegedStartService(self) -> None:
        # Before the socket opens and "listening on" is logged: a SIGTERM sent
        # the moment a supervisor sees that line must mean a clean stop, not
        # the default disposition (killed, exit -15).
        install_signals(self.reactor, self.reload, self._stop_requested)
        try:
            self.port = self.listen()
            self.factory.port = self.port
            if self.config.metrics is not None:
                self.metrics_port = self._listen_metrics(self.config.metrics)
        except ListenError as e:
            if self.port is not None:
                self.port.stopListening()
            listen_failed(e)
        super().privilegedStartService()

    #: (fd, address family) of an inherited listening socket to accept on
    #: instead of --listen: how a --workers process gets the master's socket
    adopt: tuple[int, int] | None = None
    worker_index: int | None = None

    def listen(self) -> IListeningPort:
        """Open the TLS listener now, or raise L{ListenError}."""
        wrapped = CorkedTLSFactory(self.creator, self.factory, self.reactor)
        if self.adopt is not None:
            fd, family = self.adopt
            port: IListeningPort = self.reactor.adoptStreamPort(fd, family, wrapped)
            os.close(fd)  # the reactor holds its own duplicate
            log.info("worker {index} accepting", index=self.worker_index)
            return port
        port = _listen_now(
            self.reactor, "--listen", with_backlog(self.config.listen), wrapped,
            written=self.config.listen,
        )
        log.info(
            "mtlsproxy listening on {address}, forwarding to {backend}",
            address=_format_address(port.getHost()),
            backend=self.config.backend.url,
        )
        return port

    def _listen_metrics(self, description: str) -> IListeningPort:
        probe = backend_probe(
            self.reactor, self.config.backend, self.config.backend_connect_timeout
        )

        def ready() -> defer.Deferred[bool]:
            # Draining: tell the load balancer to stop sending new clients,
            # and the operator why (not "backend unavailable").
            return defer.fail(ShuttingDown()) if self.factory.draining else probe()

        site = metrics_site(self.metrics, ready, self.reactor)
        port = _listen_now(self.reactor, "--metrics", description, site)
        log.info("metrics on http://{address}/metrics", address=_format_address(port.getHost()))
        return port

    def startService(self) -> None:
        super().startService()
        # twistd's log observer exists by now (it is made before the services start).
        logformat.speed_up_access_lines()
        # The reactor's start-up installs Twisted's own handlers: ours again after it.
        self.reactor.addSystemEventTrigger(
            "after",
            "startup",
            lambda: install_signals(self.reactor, self.reload, self._stop_requested),
        )
        if self.adopt is None:
            self.reactor.callWhenRunning(notify.ready)
        self._rotation = LoopingCall(self.rotate_session_keys)
        self._rotation.clock = self.reactor
        self._rotation.start(tls.TICKET_KEY_LIFETIME, now=False)
        self._expiry = LoopingCall(self.check_expiry)
        self._expiry.clock = self.reactor
        self._expiry.start(EXPIRY_CHECK_INTERVAL, now=False)
        if self.config.reload_interval is not None:
            self._watch = LoopingCall(self._check_files)
            self._watch.clock = self.reactor
            self._watch.start(self.config.reload_interval, now=False)

    def _check_files(self) -> None:
        """
        --reload-interval: reload when any material file was rewritten,
        replaced, or had its mode or owner changed.

        After a reload that failed, try again at every interval until one
        works, even when nothing shows in the files' signature: a fix can be
        invisible there (a directory's permissions, a group membership, a
        file rewritten within one timestamp tick).  The same failure is not
        logged again until the files or the error change.
        """
        current = watch.signature(watch.material_files(self.config))
        if current != self._watched:
            self._watched = current
            log.info("certificate files changed on disk, reloading")
            self.reload()
        elif self._reload_error is not None:
            self.reload(retry=True)

    def check_expiry(self) -> None:
        """Every EXPIRY_CHECK_INTERVAL: warn about what ends soon, refresh the expiry gauges."""
        self._record(self._material)

    def rotate_session_keys(self) -> None:
        """
        A fresh context from the material in memory, for its fresh session
        ticket key: OpenSSL keeps one random key per context and never
        rotates it, and whoever reads that key decrypts every session it
        sealed.  Sessions sealed under the old key make one full handshake.
        """
        self.creator.swap(tls.context_from_material(self.config, self._material))
        log.debug("new TLS session ticket key")

    _stop_asked = False

    def _stop_requested(self) -> None:
        if self._stop_asked:
            return  # a second SIGTERM while draining changes nothing
        self._stop_asked = True
        log.info("received SIGTERM, stopping")
        self.reactor.stop()

    # -- reload ------------------------------------------------------------

    def reload(self, retry: bool = False) -> bool:
        """
        Build a new TLS context from the files on disk, then swap it in.

        New handshakes use the new material; open connections keep theirs.
        Invalid material is logged and the old context stays in use.

        @param retry: a --reload-interval retry after a failed reload, files
            unchanged since: failing again with the same error is not logged,
            counted or told to systemd (it would be, every few seconds, for
            as long as the problem lasts); a new error or success is.
        """
        if self.adopt is None and not retry:
            notify.reloading()
        try:
            config = refresh_passwords(self.config)
            material = tls.load_material(config)
            if material.digest() == self._material_digest:
                log.info("reload: certificates, key, CA and CRLs unchanged, nothing to do")
                self.metrics.reload(True)
                return self._reloaded(None)
            context = tls.context_from_material(config, material)
        except MtlsProxyError as e:
            if retry and str(e) == self._reload_error:
                return False
            self._reload_error = str(e)
            log.error("reload failed, keeping the current certificates: {error}", error=str(e))
            self.metrics.reload(False)
            return self._reloaded(str(e))
        self.creator.swap(context)
        self.config = config
        self._material = material
        self._material_digest = material.digest()
        self.metrics.reload(True)
        self._record(material)
        log.info("reloaded certificates, CA and CRLs")
        return self._reloaded(None)

    #: called with C{None} (it worked) or the error after every reload: how a
    #: --workers process tells its master, which alone speaks to systemd
    reload_listener: Callable[[str | None], None] | None = None

    def _reloaded(self, error: str | None) -> bool:
        """End a reload: READY=1 and a status (one process), or word to the master (a worker)."""
        if error is None:
            self._reload_error = None
        if self.reload_listener is not None:
            self.reload_listener(error)
        if self.adopt is None:
            notify.ready(notify.reload_status(error))
        return error is None

    def _record(self, material: tls.Material) -> None:
        """Expiry gauges, and a warning for anything that ends within 14 days."""
        entries = check.expiries(material)
        for line in check.warnings_for(entries, self.now()):
            log.warn("{warning}", warning=line)
        self.metrics.set_expiries(e.as_metric() for e in entries)

    # -- stop --------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        """
        Stop accepting, let in-flight requests finish for up to
        C{--shutdown-timeout} seconds, then close what is left.  twistd waits
        for the returned Deferred before the reactor stops.
        """
        if self.adopt is None:
            notify.stopping()
        super().stopService()
        for loop in (self._watch, self._rotation, self._expiry):
            if loop is not None and loop.running:
                loop.stop()
        port, self.port = self.port, None
        d: defer.Deferred[Any] = defer.maybeDeferred(port.stopListening) if port else (
            defer.succeed(None)
        )
        d.addCallback(
            lambda _: shutdown.drain(self.factory, self.reactor, self.config.shutdown_timeout)
        )

        def finish(result: object) -> None:
            self.pool.close_idle()
            if self.metrics_port is not None:
                metrics_port, self.metrics_port = self.metrics_port, None
                metrics_port.stopListening()
            if isinstance(result, Failure):
                log.failure("stopping failed", result)

        d.addBoth(finish)
        return d


def install_signals(reactor: Any, on_hup: Any, on_term: Any) -> None:
    """
    SIGHUP and SIGTERM handlers that run C{on_hup} / C{on_term} in the reactor.

    Unlike Twisted's own SIGTERM handler, this one does not record the
    signal, so twistd exits 0 after a clean stop instead of re-raising it.
    """
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(on_hup))
    signal.signal(signal.SIGTERM, lambda signum, frame: reactor.callFromThread(on_term))


class ListenFailed(SystemExit):
    """
    Start-up ends: a listener could not be opened.  A C{SystemExit} (status
    1) so that twistd exits without a traceback; C{line} is what was written
    on standard error, for whoever must also put it in the log file.
    """

    def __init__(self, line: str) -> None:
        super().__init__(1)
        self.line = line


def listen_failed(e: Exception) -> NoReturn:
    """
    End start-up with one line on the real standard error (twistd has
    already pointed sys.stderr at its log) and exit status 1.
    """
    line = f"mtlsproxy: {e}"
    os.write(2, f"{line}\n".encode())
    raise ListenFailed(line) from None


#: the listen backlog when --listen names none: nginx's default (Twisted's is 50)
LISTEN_BACKLOG = 511


def with_backlog(description: str) -> str:
    """
    C{description} with C{backlog=LISTEN_BACKLOG} when it is a TCP or UNIX
    endpoint that sets none.  Twisted's default of 50 overflows under a burst
    of connections, and the kernel then drops SYNs: the clients retry after
    a second.  Socket activation takes systemd's Backlog= instead.
    """
    kind = description.split(":", 1)[0].strip().lower()
    if kind in ("tcp", "tcp6", "unix") and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


def _listen_now(
    reactor: Any,
    option: str,
    description: str,
    factory: IProtocolFactory,
    written: str | None = None,
) -> IListeningPort:
    """
    Listen on an endpoint description at once, or raise L{ListenError} naming C{option}.

    @param written: the description as the operator wrote it, for the error
        (C{description} may carry what L{with_backlog} added).
    """
    shown = description if written is None else written
    try:
        endpoint = serverFromString(reactor, description)
    except IndexError:
        raise ListenError(
            shown,
            "no inherited socket at that index (socket activation needs LISTEN_FDS, "
            "LISTEN_FDNAMES and LISTEN_PID, as systemd sets them)",
            option,
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise ListenError(shown, f"not a valid endpoint description ({e})", option) from None
    outcome: list[Any] = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:
        raise ListenError(shown, "the endpoint did not start listening at once", option)
    result = outcome[0]
    if isinstance(result, Failure):
        raise ListenError(shown, _listen_problem(result), option) from None
    return result  # type: ignore[no-any-return]


def _listen_problem(failure: Failure) -> str:
    value = failure.value
    message = failure.getErrorMessage()
    if "in use" in message.lower():
        return "address already in use"
    if "Permission denied" in message:
        return "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
    return f"cannot listen: {getattr(value, 'socketError', None) or message}"


def _format_address(address: Any) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    return str(address)


def make_service(
    config: Config, reactor: Any, now: Callable[[], datetime.datetime] = _wall_clock
) -> ProxyService:
    """
    Build the proxy service (one process); certificate problems raise before anything listens.

    @param now: see L{ProxyService.__init__}.
    """
    material = tls.load_material(config)
    context: SSL.Context = tls.context_from_material(config, material)
    creator = tls.ReloadableServerCreator(context)
    return ProxyService(config, reactor, creator, material, now=now)
