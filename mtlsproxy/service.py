"""
Service wiring: Config -> a Twisted service that listens, proxies and reloads.

The TLS layer is put over whatever server endpoint the operator described
(C{tcp:}, C{tcp6:}, C{systemd:}), so socket activation needs no code of its own.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorCore, IReactorTime
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from . import tls
from .config import Config
from .errors import ListenError, MtlsProxyError
from .http.backend import BackendPool
from .http.server import ProxyFactory, ProxySettings

log = Logger("mtlsproxy")


def settings_from_config(config: Config) -> ProxySettings:
    return ProxySettings(
        handshake_timeout=config.handshake_timeout,
        idle_timeout=config.idle_timeout,
        backend_timeout=config.backend_timeout,
        max_header_bytes=config.max_header_bytes,
        client_auth_required=config.client_auth == "required",
        policy=config.policy(),
        header_settings=config.header_settings(),
    )


class ProxyService(MultiService):
    """
    The listening proxy.

    The listener is opened in C{privilegedStartService}, before twistd drops
    privileges (port 443), and synchronously, so that a port already in use
    ends start-up with one line instead of a logged traceback.
    """

    def __init__(self, config: Config, reactor: Any, creator: tls.ReloadableServerCreator) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.creator = creator
        self.pool = BackendPool(reactor, config.backend, config.backend_connect_timeout)
        self.factory = ProxyFactory(settings_from_config(config), self.pool, reactor)
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        try:
            self.port = self.listen()
        except ListenError as e:
            # twistd has already pointed sys.stderr at its log: write to the
            # real standard error, where the operator (or systemd) looks.
            os.write(2, f"mtlsproxy: {e}\n".encode())
            raise SystemExit(1) from None
        # From the moment the socket is open, SIGTERM means a clean stop.
        self._install_signals()
        super().privilegedStartService()

    def listen(self) -> IListeningPort:
        """Open the listening socket now, or raise L{ListenError}."""
        description = self.config.listen
        try:
            endpoint = serverFromString(self.reactor, description)
        except IndexError:
            raise ListenError(
                description,
                "no inherited socket at that index (socket activation needs LISTEN_FDS, "
                "LISTEN_FDNAMES and LISTEN_PID, as systemd sets them)",
            ) from None
        except (ValueError, KeyError, TypeError) as e:
            raise ListenError(description, f"not a valid endpoint description ({e})") from None
        wrapped = TLSMemoryBIOFactory(self.creator, False, self.factory)
        outcome: list[Any] = []
        endpoint.listen(wrapped).addBoth(outcome.append)
        if not outcome:
            raise ListenError(description, "the endpoint did not start listening at once")
        result = outcome[0]
        if isinstance(result, Failure):
            raise ListenError(description, _listen_problem(result)) from None
        address = result.getHost()
        log.info(
            "mtlsproxy listening on {address}, forwarding to {backend}",
            address=_format_address(address),
            backend=self.config.backend.url,
        )
        return result  # type: ignore[no-any-return]

    def startService(self) -> None:
        super().startService()
        # The reactor's start-up installs Twisted's own handlers: ours again after it.
        self.reactor.addSystemEventTrigger("after", "startup", self._install_signals)

    def _install_signals(self) -> None:
        def on_sighup(signum: int, frame: object) -> None:
            self.reactor.callFromThread(self.reload)

        def on_sigterm(signum: int, frame: object) -> None:
            # Unlike Twisted's own handler, this does not record the signal,
            # so twistd exits 0 after a clean stop instead of re-raising it.
            self.reactor.callFromThread(self._stop_requested)

        signal.signal(signal.SIGHUP, on_sighup)
        signal.signal(signal.SIGTERM, on_sigterm)

    def _stop_requested(self) -> None:
        log.info("received SIGTERM, stopping")
        self.reactor.stop()

    def reload(self) -> bool:
        """
        Build a new TLS context from the files on disk, then swap it in.

        New handshakes use the new material; open connections keep theirs.
        Invalid material is logged and the old context stays in use.
        """
        try:
            context = tls.context_from_config(self.config)
        except MtlsProxyError as e:
            log.error("reload failed, keeping the current certificates: {error}", error=str(e))
            return False
        self.creator.swap(context)
        log.info("reloaded certificates, CA and CRLs")
        return True

    def stopService(self) -> Any:
        super().stopService()
        self.pool.close_idle()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def _listen_problem(failure: Failure) -> str:
    value = failure.value
    message = failure.getErrorMessage()
    if "Address already in use" in message or "in use" in message.lower():
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


def make_service(config: Config, reactor: IReactorCore | IReactorTime | Any) -> ProxyService:
    """Build the proxy service; certificate problems raise before anything listens."""
    creator = tls.ReloadableServerCreator(tls.context_from_config(config))
    return ProxyService(config, reactor, creator)
