"""
Prometheus metrics and health endpoints, served on the plain-HTTP C{--metrics} listener.

L{Metrics} holds its own C{CollectorRegistry} rather than prometheus_client's
global one: the proxy's numbers are never mixed with whatever else a process
registers, and tests (or several proxies in one process) each get their own.

Label values are bounded on purpose: handshake reasons and backend error kinds
are mapped onto a small fixed set (the plain words operators already grep the
log for), and status codes are reduced to their class.  A label taken straight
from a client-controlled string would let any client grow the time series
without bound.

C{/healthz} answers C{200} whenever the reactor is turning (liveness);
C{/readyz} also asks the backend (readiness), so a load balancer stops sending
traffic to a proxy whose application is down or that is shutting down.

With C{--workers N}, each worker counts only what it serves, so the master
alone listens on C{--metrics} and adds the workers' numbers up with
prometheus_client's multiprocess mode: it gives each worker
C{PROMETHEUS_MULTIPROC_DIR} (L{MULTIPROC_ENV}, a private directory from
L{make_multiprocess_dir}) in its environment at spawn -- prometheus_client
picks its value storage when it is first imported, so setting it later would
be too late -- and each worker's L{Metrics} then writes every value to files
there, which L{WorkersMetrics} merges at each scrape.  Counters and histograms
of a worker that died stay in the sum (its files remain); gauges say in their
C{multiprocess_mode} how the workers' values combine.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from typing import Protocol as TypingProtocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from . import __version__
from .config import Backend
from .http.backend import backend_endpoint

log = Logger("mtlsproxy.metrics")

# Every counter and histogram would otherwise carry a *_created series, the
# time the process made it: noise on /metrics that no dashboard reads, and
# with --workers one per worker.  Prometheus itself does not need them.
disable_created_metrics()

#: The handshake refusal reasons that get their own label value, in the words
#: of the interface; anything else is counted as C{"other"}.
HANDSHAKE_REASONS: tuple[str, ...] = (
    "certificate required",
    "unknown CA",
    "certificate expired",
    "certificate not yet valid",
    "certificate revoked",
    "unsuitable certificate purpose",
    "certificate signature invalid",
    "invalid CA certificate",
    "certificate chain too long",
    "CRL problem",
    "handshake timeout",
    "connection closed during handshake",
    "TLS handshake failed",
    "other",
)

#: Backend error kinds with their own label value; anything else is C{"other"}.
BACKEND_ERROR_KINDS: tuple[str, ...] = (
    "refused",
    "connect timeout",
    "name does not resolve",
    "unreachable",
    "response timeout",
    "closed early",
    "protocol error",
    "other",
)

#: What the expiry gauge's C{kind} label may be.
EXPIRY_KINDS: tuple[str, ...] = ("server", "chain", "ca", "crl")

#: Request durations: up to the default C{--backend-timeout} of 60 s and beyond.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"),
)

_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

#: C{(kind, subject, timestamp)} or C{(kind, subject, timestamp, fingerprint)}
ExpiryEntry = tuple[str, str, float] | tuple[str, str, float, str]

#: Where prometheus_client, in a worker, keeps its values (multiprocess mode).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_EXPIRY_NAME = "mtlsproxy_expiry_timestamp_seconds"


def handshake_reason(reason: str) -> str:
    """
    Map a refusal reason as logged (C{tls.refusal_reason}'s words, possibly
    followed by details such as C{"(depth 0, subject CN=x)"}) onto
    L{HANDSHAKE_REASONS}.
    """
    text = reason.strip()
    if text.startswith(("CRL ", "unable to get CRL")):
        return "CRL problem"
    for known in HANDSHAKE_REASONS:
        if text == known or text.startswith(known + " ") or text.startswith(known + ":"):
            return known
    return "other"


def backend_error_kind(kind: str) -> str:
    """
    Map a backend error kind, or the reason text the HTTP layer logs
    (C{http.backend.connect_error_reason}, C{"backend sent no response headers
    in time"}, ...), onto L{BACKEND_ERROR_KINDS}.
    """
    text = kind.strip().lower()
    if text in BACKEND_ERROR_KINDS:
        return text
    if "refused" in text:
        return "refused"
    if "connect timeout" in text or "connection timed out" in text:
        return "connect timeout"
    if "resolve" in text or "dns" in text:
        return "name does not resolve"
    if "unreachable" in text:
        return "unreachable"
    if "in time" in text or "timeout" in text or "timed out" in text:
        return "response timeout"
    if "closed" in text or "reset" in text or "lost" in text:
        return "closed early"
    if "invalid" in text or "malformed" in text or "protocol" in text or "parse" in text:
        return "protocol error"
    return "other"


def status_class(status: int) -> str:
    """C{"2xx"} for 200 to 299 and so on; C{"other"} outside 100 to 599."""
    if 100 <= status <= 599:
        return _STATUS_CLASSES[status // 100 - 1]
    return "other"


class Metrics:
    """
    The proxy's metrics, in a registry of their own.

    The HTTP layer calls L{handshake}, L{request}, L{backend_error}; the
    service calls L{reload} and L{set_expiries}, and L{watch_connections} once
    with callables that count open connections (read at scrape time, so
    nothing has to be updated on every connection).

    In a worker (L{MULTIPROC_ENV} set), nothing reads this registry: the
    master merges the files prometheus_client writes.  A scrape there cannot
    call this process's callables, so the worker calls L{refresh} every
    second to write the open-connection counts down.
    """

    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True) -> None:
        """
        @param registry: where to register; a new one by default.
        @param process: also export C{process_*} (memory, CPU, open file
            descriptors) from C{/proc}; off in tests that compare whole outputs.
        """
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        #: values go to files in L{MULTIPROC_ENV}, for the master to merge
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self._watched: list[tuple[Gauge, Callable[[], float]]] = []
        #: expiry series this process has set (multiprocess mode: see set_expiries)
        self._expiry_keys: set[tuple[str, str, str]] = set()
        r = self.registry
        self._handshakes = Counter(
            "mtlsproxy_handshakes",
            "TLS handshakes by result (ok, refused) and refusal reason",
            ["result", "reason"],
            registry=r,
        )
        self._requests = Counter(
            "mtlsproxy_requests",
            "Requests answered, by status class (the proxy's own answers included)",
            ["status_class"],
            registry=r,
        )
        self._request_counters: dict[str, Any] = {}
        self._duration = Histogram(
            "mtlsproxy_request_duration_seconds",
            "Time from a request's head to the last byte of its response",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._backend_errors = Counter(
            "mtlsproxy_backend_errors",
            "Backend connections that failed or broke, by kind",
            ["kind"],
            registry=r,
        )
        self._client_connections = Gauge(
            "mtlsproxy_client_connections",
            "Client connections open now (handshaking ones included)",
            registry=r,
            multiprocess_mode="livesum",  # every running worker's; a dead one's are gone
        )
        self._backend_connections = Gauge(
            "mtlsproxy_backend_connections",
            "Backend connections open now (idle pooled ones included)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._reloads = Counter(
            "mtlsproxy_reloads",
            "Certificate reloads (SIGHUP) by result",
            ["result"],
            registry=r,
        )
        self._last_reload_ok = Gauge(
            "mtlsproxy_last_reload_successful",
            "1 if the last reload succeeded (or none was attempted), 0 if it failed",
            registry=r,
            multiprocess_mode="livemin",  # 0 while any running worker's last reload failed
        )
        self._last_reload_time = Gauge(
            "mtlsproxy_last_reload_timestamp_seconds",
            "Unix time of the last reload attempt",
            registry=r,
            multiprocess_mode="max",  # the latest attempt of any worker
        )
        self._expiry = Gauge(
            "mtlsproxy_expiry_timestamp_seconds",
            "Unix time when certificates in use expire (kind server, chain, ca) "
            "or when a CRL in use is due for its next update (kind crl); "
            "fingerprint: first 16 hex digits of the SHA-256 of the certificate or CRL",
            ["kind", "subject", "fingerprint"],
            registry=r,
            # Every worker reports the same certificates: one series each,
            # not one per worker; the latest write of a running worker wins,
            # so a series a reload removed (NaN, see set_expiries) goes away.
            multiprocess_mode="livemostrecent",
        )
        info = Gauge(
            "mtlsproxy_info", "mtlsproxy version", ["version"], registry=r, multiprocess_mode="max"
        )
        info.labels(version=__version__).set(1)
        if process:
            ProcessCollector(registry=r)

        # Zeroed series from the start, so that rate() and absent() work
        # before the first event of each kind.
        self._handshakes.labels(result="ok", reason="none")
        for cls in _STATUS_CLASSES:
            self._requests.labels(status_class=cls)
        for result in ("ok", "failed"):
            self._reloads.labels(result=result)
        self._last_reload_ok.set(1)

    # -- events from the HTTP layer ----------------------------------------

    def handshake(self, result: str, reason: str = "") -> None:
        """
        Count one finished handshake.

        @param result: C{"ok"} or C{"refused"}.
        @param reason: for refusals, the logged reason (see L{handshake_reason}).
        @raise ValueError: for any other C{result}: a programming error.
        """
        if result == "ok":
            self._handshakes.labels(result="ok", reason="none").inc()
        elif result == "refused":
            self._handshakes.labels(result="refused", reason=handshake_reason(reason)).inc()
        else:
            raise ValueError(f"handshake result must be 'ok' or 'refused', not {result!r}")

    def request(self, status: int, duration: float) -> None:
        """Count one answered request (499 for a client gone mid-exchange) and its duration."""
        kind = status_class(status)
        counter = self._request_counters.get(kind)
        if counter is None:
            # labels() costs more than the increment itself: done once per class
            counter = self._request_counters[kind] = self._requests.labels(status_class=kind)
        counter.inc()
        self._duration.observe(max(0.0, duration))

    def backend_error(self, kind: str) -> None:
        """Count one backend failure; C{kind} as in L{backend_error_kind}."""
        self._backend_errors.labels(kind=backend_error_kind(kind)).inc()

    def watch_connections(
        self,
        client: Callable[[], float] | None = None,
        backend: Callable[[], float] | None = None,
    ) -> None:
        """
        Read the open-connection gauges from these callables at each scrape,
        e.g. C{lambda: len(factory.connections)} and C{lambda: pool.open_connections}.
        """
        watched = ((self._client_connections, client), (self._backend_connections, backend))
        for gauge, count in watched:
            if count is None:
                continue
            if self.multiprocess:
                self._watched.append((gauge, count))
                gauge.set(count())
            else:
                gauge.set_function(count)

    def refresh(self) -> None:
        """Multiprocess mode: write the watched counts to the files now."""
        for gauge, count in self._watched:
            gauge.set(count())

    # -- events from the service -------------------------------------------

    def reload(self, ok: bool, timestamp: float | None = None) -> None:
        """Record a reload attempt and whether it succeeded."""
        self._reloads.labels(result="ok" if ok else "failed").inc()
        self._last_reload_ok.set(1 if ok else 0)
        if timestamp is None:
            self._last_reload_time.set_to_current_time()
        else:
            self._last_reload_time.set(timestamp)

    def expiry(self, kind: str, subject: str, timestamp: float, fingerprint: str = "") -> None:
        """
        Export one expiry time.

        @param kind: one of L{EXPIRY_KINDS}.
        @param subject: the certificate's subject (the CRL's issuer), RFC 4514.
        @param timestamp: Unix time of notAfter (of nextUpdate for a CRL).
        @param fingerprint: tells apart certificates with one subject
            (L{mtlsproxy.check.fingerprint}); without it, during a CA
            rollover the new CA's series would hide the old one's, which
            expires first.
        @raise ValueError: for an unknown C{kind}.
        """
        if kind not in EXPIRY_KINDS:
            raise ValueError(f"expiry kind must be one of {EXPIRY_KINDS}, not {kind!r}")
        self._expiry.labels(kind=kind, subject=subject, fingerprint=fingerprint).set(timestamp)

    def set_expiries(self, entries: Iterable[ExpiryEntry]) -> None:
        """
        Replace every expiry series with C{(kind, subject, timestamp,
        fingerprint)} entries (C{fingerprint} may be left out): what start-up
        and each successful reload call, so that a certificate no longer in
        use stops being reported.
        """
        entries = list(entries)
        for entry in entries:
            if entry[0] not in EXPIRY_KINDS:
                raise ValueError(f"expiry kind must be one of {EXPIRY_KINDS}, not {entry[0]!r}")
        if not self.multiprocess:
            self._expiry.clear()
            for entry in entries:
                self.expiry(*entry)
            return
        # clear() does not reach the files the master reads: a series no
        # longer in use is overwritten with NaN, which WorkersMetrics leaves out.
        keys = {(e[0], e[1], e[3] if len(e) > 3 else "") for e in entries}  # type: ignore[misc]
        for kind, subject, fingerprint in self._expiry_keys - keys:
            self._expiry.labels(kind=kind, subject=subject, fingerprint=fingerprint).set(math.nan)
        self._expiry_keys = keys
        for entry in entries:
            self.expiry(*entry)

    # -- exposition ----------------------------------------------------------

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """
        The body and content type of a scrape; OpenMetrics when the scraper
        asks for it in C{Accept}, Prometheus text format otherwise.
        """
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class Renders(TypingProtocol):
    """What C{/metrics} serves: L{Metrics}, or L{WorkersMetrics} in a --workers master."""

    def render(self, accept: str = "") -> tuple[bytes, str]: ...


# -- several workers ----------------------------------------------------------


def make_multiprocess_dir(environ: Mapping[str, str] | None = None) -> str:
    """
    A new, empty directory (mode 0700) for the workers' metric files: under
    C{$RUNTIME_DIRECTORY} (systemd's C{RuntimeDirectory=}) when set, else
    in the temporary directory.  New at every start, so that the files of a
    previous run (a master killed before it could remove them) are never
    added to this one's numbers.
    """
    env = os.environ if environ is None else environ
    # RuntimeDirectory= with several names gives them colon-separated.
    runtime = (env.get("RUNTIME_DIRECTORY") or "").split(":")[0] or None
    return tempfile.mkdtemp(prefix="mtlsproxy-metrics-", dir=runtime)


def remove_multiprocess_dir(path: str) -> None:
    """Remove the workers' metric files at exit; a failure is logged, not raised."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warn("could not remove the metrics directory {path}: {error}", path=path, error=e)


class _Merged:
    """
    The workers' files, merged by prometheus_client's MultiProcessCollector,
    without the NaN tombstones of expiry series that no worker uses any more.
    """

    def __init__(self, path: str) -> None:
        self.collector = multiprocess.MultiProcessCollector(None, path=path)

    def collect(self) -> Iterator[Metric]:
        for family in self.collector.collect():
            if family.name == _EXPIRY_NAME:
                family.samples = [s for s in family.samples if not math.isnan(s.value)]
            yield family


class WorkersMetrics:
    """
    The master's C{/metrics} with C{--workers}: the sum of what every worker
    (running, or dead and replaced) recorded in L{path}.  C{process_*} are
    left out: they describe one process, and no worker's registry is read.
    """

    def __init__(self, path: str | None = None) -> None:
        #: the workers' directory; None until the master has made it (nothing to show)
        self.path = path

    def mark_dead(self, pid: int) -> None:
        """A worker ended: its C{live*} gauges (open connections...) no longer count."""
        if self.path is not None:
            multiprocess.mark_process_dead(pid, self.path)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        # A registry per scrape, as prometheus_client's multiprocess docs do:
        # the collector reads the files afresh each time anyway.
        registry = CollectorRegistry()
        if self.path is not None:
            registry.register(_Merged(self.path))  # type: ignore[arg-type]
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type


# -- HTTP ---------------------------------------------------------------------


class _Text(Resource):
    """A fixed plain-text answer."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return self.body


class MetricsResource(Resource):
    """C{/metrics}: the registry in Prometheus (or OpenMetrics) text format."""

    isLeaf = True

    def __init__(self, metrics: Renders) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept") or b""
        body, content_type = self.metrics.render(accept.decode("latin-1"))
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body


class ReadyResource(Resource):
    """
    C{/readyz}: C{200} when C{backend_ready()} says yes within C{timeout}
    seconds, C{503} otherwise (no, an error, or no answer in time).
    """

    isLeaf = True

    def __init__(
        self,
        backend_ready: Callable[[], Deferred[bool]],
        clock: IReactorTime | None = None,
        timeout: float = 5.0,
    ) -> None:
        super().__init__()
        self.backend_ready = backend_ready
        self.clock = clock
        self.timeout = timeout

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        d: Deferred[bool] = maybeDeferred(self.backend_ready)
        if self.clock is not None:
            d.addTimeout(self.timeout, self.clock)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(ready: object) -> None:
            if gone:
                return
            if ready is True:
                request.setResponseCode(200)
                request.write(b"ready\n")
            else:
                request.setResponseCode(503)
                if isinstance(ready, Failure):
                    problem = ready.getErrorMessage() or getattr(ready.type, "__name__", "error")
                    request.write(f"not ready: {problem}\n".encode())
                else:
                    request.write(b"not ready: backend unavailable\n")
            request.finish()

        d.addBoth(answer)
        d.addErrback(lambda f: log.failure("readiness answer failed", f))
        return NOT_DONE_YET


class _QuietSite(Site):
    """
    The metrics site: no access log line per scrape (a scrape every few
    seconds would drown the proxy's own log), no tracebacks to clients.
    """

    noisy = False
    displayTracebacks = False

    def log(self, request: http.Request) -> None:
        pass


def metrics_root(
    metrics: Renders,
    backend_ready: Callable[[], Deferred[bool]],
    clock: IReactorTime | None = None,
    ready_timeout: float = 5.0,
) -> Resource:
    """The resource tree: C{/metrics}, C{/healthz}, C{/readyz} and a small index."""
    root = Resource()
    root.putChild(b"", _Text(b"mtlsproxy: /metrics /healthz /readyz\n"))
    root.putChild(b"metrics", MetricsResource(metrics))
    root.putChild(b"healthz", _Text(b"ok\n"))
    root.putChild(b"readyz", ReadyResource(backend_ready, clock, ready_timeout))
    return root


def metrics_site(
    metrics: Renders,
    backend_ready: Callable[[], Deferred[bool]],
    clock: IReactorTime | None = None,
    ready_timeout: float = 5.0,
) -> Site:
    """
    The site to listen with on C{--metrics}:
    C{serverFromString(reactor, config.metrics).listen(metrics_site(...))}.

    @param backend_ready: asked at each C{/readyz}; see L{backend_probe}.
    @param clock: bounds how long C{/readyz} waits for C{backend_ready};
        without one, C{backend_ready} must bound itself.
    """
    site = _QuietSite(metrics_root(metrics, backend_ready, clock, ready_timeout))
    site.timeOut = 30
    return site


def backend_probe(
    reactor: Any,
    backend: Backend,
    timeout: float,
    endpoint: IStreamClientEndpoint | None = None,
) -> Callable[[], Deferred[bool]]:
    """
    A C{backend_ready} for L{metrics_site}: open a connection to the backend
    and close it at once.  A connection (not a request) is the check because
    the proxy knows no path on the application that is safe to request.

    @param endpoint: where to connect instead of C{backend} (tests).
    """
    target = endpoint or backend_endpoint(reactor, backend, timeout)

    factory = Factory.forProtocol(Protocol)
    factory.noisy = False  # no "Starting factory" log line per /readyz

    def probe() -> Deferred[bool]:
        d: Deferred[Any] = target.connect(factory)
        d.addTimeout(timeout, reactor)

        def connected(protocol: Protocol) -> bool:
            if protocol.transport is not None:
                protocol.transport.loseConnection()
            return True

        def failed(failure: Failure) -> bool:
            return False

        return d.addCallbacks(connected, failed)

    return probe
