"""
twistd glue: the command-line options and C{makeService}.  No logic lives here.

Configuration errors must reach the operator as one line on stderr and a
non-zero exit.  twistd prints the whole usage text on a C{UsageError}, and a
traceback for anything raised in C{makeService}, so both are caught here and
turned into that one line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

from twisted.application.service import MultiService
from twisted.logger import Logger, textFileLogObserver
from twisted.python import usage

from . import __version__
from .config import OPTIONS, REPEATABLE, Config, build_config
from .errors import MtlsProxyError


def fail(message: str, status: int = 1) -> NoReturn:
    """One line on stderr, then exit: what every start-up error looks like."""
    sys.stderr.write(f"mtlsproxy: {message}\n")
    sys.stderr.flush()
    raise SystemExit(status)


_HELP = {
    "config": "TOML configuration file (same option names, without dashes)",
    "listen": "Twisted server endpoint description to listen on [default: tcp:8443]",
    "backend": "the plain-HTTP application: http://HOST:PORT or unix:/path (required)",
    "cert": "server certificate chain, PEM, leaf first",
    "key": "server private key, PEM",
    "keystore": "PKCS#12 keystore with the server key and certificate chain",
    "keystore-password-file": "file holding the keystore password "
    "(or env MTLSPROXY_KEYSTORE_PASSWORD)",
    "ca": "PEM bundle of the CAs trusted to sign client certificates",
    "truststore": "PKCS#12 truststore (keytool -importcert -storetype PKCS12)",
    "truststore-password-file": "file holding the truststore password "
    "(or env MTLSPROXY_TRUSTSTORE_PASSWORD)",
    "crl": "PEM certificate revocation list (repeatable)",
    "client-auth": "required | optional [default: required]",
    "allow-cn": "only admit clients with this subject CN (repeatable)",
    "allow-ou": "only admit clients with this subject OU (repeatable)",
    "allow-san": "only admit clients with this subjectAltName, e.g. DNS:x (repeatable)",
    "min-tls": "1.2 | 1.3 [default: 1.2]",
    "handshake-timeout": "seconds to finish the TLS handshake [default: 10]",
    "idle-timeout": "seconds a connection may idle or take to send headers [default: 60]",
    "backend-connect-timeout": "seconds to connect to the backend, else 502 [default: 5]",
    "backend-timeout": "seconds to wait for the backend's response headers, else 504 "
    "[default: 60]",
    "max-header-bytes": "request line plus headers above this get 431 [default: 65536]",
    "metrics": "endpoint description of the plain-HTTP metrics listener",
    "workers": "processes sharing the listening socket [default: 1]",
    "shutdown-timeout": "seconds to let requests finish on SIGTERM [default: 10]",
    "max-connections": "client connections open at once per process; at the limit the "
    "oldest unfinished handshake is dropped, then new clients wait in the kernel's accept "
    "queue [default: 4096]",
    "reload-interval": "check the certificate, key, CA and CRL files every S seconds and "
    "reload when one changed [default: off, reload on SIGHUP]",
    "verify-depth": "most intermediate CAs between a client certificate and a trusted CA "
    "(0: issued by a trusted CA directly) [default: 10]",
    "forward-cert": "also send the client certificate: none | pem (X-Client-Cert) | "
    "xfcc (X-Forwarded-Client-Cert) | rfc9440 (Client-Cert) [default: none]",
    "forward-headers": "identity headers to send (repeatable, or comma-separated): cn, "
    "subject, issuer, serial, fingerprint, san, not-before, not-after [default: all]",
}


class Options(usage.Options):
    """C{twistd mtlsproxy} options; every one can also come from the C{--config} file."""

    synopsis = "[options]"
    longdesc = (
        "Terminate TLS, require a client certificate signed by a trusted CA, and "
        "forward HTTP to a plain-HTTP application with the client's identity in "
        "X-Client-Cert-CN."
    )
    optParameters = [
        [name, None, None, _HELP[name]] for name in ["config", *OPTIONS] if name not in REPEATABLE
    ]

    def __init__(self) -> None:
        super().__init__()
        for name in REPEATABLE:
            self[name] = []
        self.config: Config | None = None
        self.service: Any = None

    def opt_version(self) -> NoReturn:
        """Print the version and exit."""
        print(f"mtlsproxy {__version__}")
        raise SystemExit(0)

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            fail(f"{e} (see twistd mtlsproxy --help)", 2)

    def given(self) -> dict[str, Any]:
        """The options given on the command line, as L{build_config} takes them."""
        given: dict[str, Any] = {}
        for name in OPTIONS:
            value = self.get(name)
            if value is None or (name in REPEATABLE and not value):
                continue
            given[name] = value
        return given

    def postOptions(self) -> None:
        given = self.given()
        config_file = Path(self["config"]) if self["config"] else None
        try:
            self.config = build_config(given, config_file)
            # Load every certificate, key and CRL now, before twistd goes on,
            # so that a bad file ends start-up instead of the first handshake.
            from .service import make_service

            if self.config.workers > 1:
                from .tls import context_from_config
                from .workers import WorkersService

                context_from_config(self.config)  # every file checked before any worker starts
                self.service = WorkersService(self.config, _reactor(), given, config_file)
            else:
                self.service = make_service(self.config, _reactor())
        except MtlsProxyError as e:
            fail(str(e))


def _repeatable(name: str) -> Any:
    def opt(self: Options, value: str) -> None:
        self[name].append(value)

    opt.__doc__ = _HELP[name]
    return opt


for _name in REPEATABLE:
    setattr(Options, "opt_" + _name.replace("-", "_"), _repeatable(_name))


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def makeService(options: Options) -> Any:
    """
    twistd's entry point: the service was built and checked in C{postOptions}.

    When twistd is about to daemonise, the listening sockets are opened here,
    before the fork: see L{open_before_daemonising}.
    """
    twistd = options.parent
    if twistd is not None and daemonising(twistd):
        return open_before_daemonising(options.service, daemon_log_file(twistd))
    return options.service


def daemonising(twistd: Any) -> bool:
    """Whether twistd (its own options, C{twistd}) will fork into the background."""
    return not (twistd.get("nodaemon") or twistd.get("debug"))


def daemon_log_file(twistd: Any) -> str | None:
    """
    The file a daemonising twistd will log to (C{--logfile}, else
    C{twistd.log}), or C{None} when it logs to syslog or through a
    C{--logger} of the operator's choosing.
    """
    if twistd.get("syslog") or twistd.get("logger"):
        return None
    name = twistd.get("logfile") or "twistd.log"
    return None if name == "-" else str(name)


class _OpenedBeforeDaemonising(MultiService):
    """The proxy service, whose C{privilegedStartService} already ran."""

    def privilegedStartService(self) -> None:
        pass  # done before the fork, in open_before_daemonising


def open_before_daemonising(service: Any, log_file: str | None) -> MultiService:
    """
    Open the listeners now (C{privilegedStartService}), in the process
    twistd started, and return the service wrapped so that twistd does not
    open them again.

    A daemonising twistd forks first and only then starts the service: the
    child's standard error is C{/dev/null}, and its parent waits for a word
    on a status pipe that a C{SystemExit} never sends, so a port already in
    use left the command hanging with nothing said.  Here the line reaches
    the operator's terminal, the command exits 1, and the line is appended
    to the log file twistd would have used, which is not open yet.  The
    sockets are inherited across twistd's fork.
    """
    from .service import ListenFailed

    try:
        service.privilegedStartService()
    except ListenFailed as e:
        if log_file is not None:
            append_log_line(log_file, e.line)
        raise
    wrapper = _OpenedBeforeDaemonising()
    service.setServiceParent(wrapper)
    return wrapper


def append_log_line(path: str, line: str) -> None:
    """C{line} as an error in C{path}, in the format of twistd's own log file; best effort."""
    try:
        with open(path, "a") as f:
            Logger(namespace="mtlsproxy", observer=textFileLogObserver(f)).error(
                "{line}", line=line
            )
    except OSError:
        pass  # the operator already has the line on stderr
