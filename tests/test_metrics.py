"""Prometheus metrics, /healthz and /readyz, rendered in memory, parsed with prometheus_client."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from mtlsproxy import __version__
from mtlsproxy.config import Backend
from mtlsproxy.http.backend import connect_error_reason
from mtlsproxy.metrics import (
    BACKEND_ERROR_KINDS,
    HANDSHAKE_REASONS,
    MULTIPROC_ENV,
    Metrics,
    WorkersMetrics,
    backend_error_kind,
    backend_probe,
    handshake_reason,
    make_multiprocess_dir,
    metrics_root,
    metrics_site,
    remove_multiprocess_dir,
    status_class,
)

# -- helpers ------------------------------------------------------------------


def samples(metrics: Metrics) -> dict[str, list[Sample]]:
    """Every family of a scrape, parsed by prometheus_client's own parser."""
    body, _ = metrics.render()
    return {f.name: f.samples for f in text_string_to_metric_families(body.decode())}


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """The one sample called C{name} whose labels include C{labels}."""
    family = name.removesuffix("_total").removesuffix("_bucket").removesuffix("_count")
    family = family.removesuffix("_sum")
    found = [
        s.value
        for s in samples(metrics)[family]
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def render(root: Resource, path: bytes, accept: bytes | None = None) -> defer.Deferred[Any]:
    """GET C{path} from the resource tree in memory; fires with the finished request."""
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    if accept is not None:
        request.requestHeaders.setRawHeaders(b"accept", [accept])
    resource = getChildForRequest(root, request)
    request.render(resource)
    if request.finished:
        return defer.succeed(request)
    return request.notifyFinish().addCallback(lambda _: request)


def body(request: DummyRequest) -> bytes:
    return b"".join(request.written)


def never_asked() -> defer.Deferred[bool]:
    raise AssertionError("backend_ready must not be called")


# -- label mapping ------------------------------------------------------------


def test_handshake_reasons_map_to_a_fixed_set() -> None:
    """Logged refusal reasons, details and all, map onto the interface's words; else 'other'."""
    assert handshake_reason("certificate required") == "certificate required"
    assert handshake_reason("unknown CA (depth 0, subject CN=mallory)") == "unknown CA"
    expired = "certificate expired (depth 0, subject CN=old)"
    assert handshake_reason(expired) == "certificate expired"
    assert handshake_reason("certificate revoked (depth 0, subject CN=x)") == "certificate revoked"
    assert handshake_reason("CRL expired (depth 0, subject CN=x)") == "CRL problem"
    assert handshake_reason("unable to get CRL (depth 0, subject CN=x)") == "CRL problem"
    assert handshake_reason("TLS handshake failed: no shared cipher") == "TLS handshake failed"
    assert handshake_reason("handshake timeout") == "handshake timeout"
    assert handshake_reason("certificate verify failed (error 99)") == "other"
    assert handshake_reason("CN=<script> anything a client chose") == "other"


def test_backend_error_kinds_map_to_a_fixed_set() -> None:
    """The HTTP layer's own reason texts (and plain kinds) map onto a bounded label set."""
    from twisted.internet import error

    assert backend_error_kind(connect_error_reason(Failure(error.ConnectionRefusedError()))) == (
        "refused"
    )
    assert backend_error_kind(connect_error_reason(Failure(defer.TimeoutError()))) == (
        "connect timeout"
    )
    assert backend_error_kind(connect_error_reason(Failure(error.DNSLookupError("x")))) == (
        "name does not resolve"
    )
    assert backend_error_kind("backend unreachable: No route to host") == "unreachable"
    assert backend_error_kind("backend sent no response headers in time") == "response timeout"
    assert backend_error_kind("backend closed the connection early") == "closed early"
    assert backend_error_kind("refused") == "refused"
    assert backend_error_kind("something new") == "other"
    for kind in BACKEND_ERROR_KINDS:
        assert backend_error_kind(kind) == kind


def test_status_classes() -> None:
    """Status codes are reduced to their class; nonsense codes are 'other'."""
    assert [status_class(s) for s in (101, 200, 304, 499, 502)] == [
        "1xx", "2xx", "3xx", "4xx", "5xx",
    ]
    assert status_class(99) == "other" and status_class(600) == "other"


# -- the registry ---------------------------------------------------------------


def test_handshakes_by_result_and_reason() -> None:
    """Handshakes are counted by result and mapped reason; zeroed series exist from the start."""
    m = Metrics(process=False)
    assert value(m, "mtlsproxy_handshakes_total", result="ok", reason="none") == 0
    m.handshake("ok")
    m.handshake("ok")
    m.handshake("refused", "unknown CA (depth 0, subject CN=x)")
    m.handshake("refused", "weird reason a client made up")
    assert value(m, "mtlsproxy_handshakes_total", result="ok") == 2
    assert value(m, "mtlsproxy_handshakes_total", result="refused", reason="unknown CA") == 1
    assert value(m, "mtlsproxy_handshakes_total", result="refused", reason="other") == 1
    reasons = {s.labels["reason"] for s in samples(m)["mtlsproxy_handshakes"]}
    assert reasons <= {"none", *HANDSHAKE_REASONS}


def test_handshake_result_must_be_known() -> None:
    """Any result but ok/refused is a programming error, not a new label value."""
    with pytest.raises(ValueError):
        Metrics(process=False).handshake("maybe", "x")


def test_requests_by_status_class_and_duration_histogram() -> None:
    """Requests are counted per status class and their durations land in the histogram."""
    m = Metrics(process=False)
    m.request(200, 0.003)
    m.request(204, 0.2)
    m.request(502, 5.5)
    m.request(499, -1.0)  # a clock step must not produce a negative observation
    assert value(m, "mtlsproxy_requests_total", status_class="2xx") == 2
    assert value(m, "mtlsproxy_requests_total", status_class="5xx") == 1
    assert value(m, "mtlsproxy_requests_total", status_class="4xx") == 1
    assert value(m, "mtlsproxy_requests_total", status_class="3xx") == 0
    assert value(m, "mtlsproxy_request_duration_seconds_count") == 4
    assert value(m, "mtlsproxy_request_duration_seconds_sum") == pytest.approx(5.703)
    assert value(m, "mtlsproxy_request_duration_seconds_bucket", le="0.005") == 2
    assert value(m, "mtlsproxy_request_duration_seconds_bucket", le="10.0") == 4


def test_backend_errors() -> None:
    """Backend errors are counted by mapped kind."""
    m = Metrics(process=False)
    m.backend_error("backend refused the connection")
    m.backend_error("refused")
    m.backend_error("backend sent no response headers in time")
    assert value(m, "mtlsproxy_backend_errors_total", kind="refused") == 2
    assert value(m, "mtlsproxy_backend_errors_total", kind="response timeout") == 1


def test_open_connections_are_read_at_scrape_time() -> None:
    """The connection gauges call their callables at each scrape, nothing is pushed."""
    m = Metrics(process=False)
    open_now = {"client": 3, "backend": 1}
    m.watch_connections(lambda: open_now["client"], lambda: open_now["backend"])
    assert value(m, "mtlsproxy_client_connections") == 3
    assert value(m, "mtlsproxy_backend_connections") == 1
    open_now["client"] = 0
    assert value(m, "mtlsproxy_client_connections") == 0


def test_reloads() -> None:
    """Reloads are counted by result, and the last one's outcome and time are exported."""
    m = Metrics(process=False)
    assert value(m, "mtlsproxy_last_reload_successful") == 1
    m.reload(True, timestamp=1000.0)
    m.reload(False, timestamp=2000.0)
    assert value(m, "mtlsproxy_reloads_total", result="ok") == 1
    assert value(m, "mtlsproxy_reloads_total", result="failed") == 1
    assert value(m, "mtlsproxy_last_reload_successful") == 0
    assert value(m, "mtlsproxy_last_reload_timestamp_seconds") == 2000.0


def test_expiries_are_replaced_as_a_whole() -> None:
    """set_expiries drops certificates no longer in use; kinds are checked."""
    m = Metrics(process=False)
    m.set_expiries([("server", "CN=old", 100.0), ("ca", "CN=CA", 500.0)])
    m.set_expiries([("server", "CN=new", 200.0), ("crl", "CN=CA", 300.0)])
    series = {
        (s.labels["kind"], s.labels["subject"]): s.value
        for s in samples(m)["mtlsproxy_expiry_timestamp_seconds"]
    }
    assert series == {("server", "CN=new"): 200.0, ("crl", "CN=CA"): 300.0}
    with pytest.raises(ValueError):
        m.expiry("bogus", "CN=x", 1.0)
    with pytest.raises(ValueError):
        m.set_expiries([("server", "CN=a", 1.0), ("bogus", "CN=x", 1.0)])
    # A refused batch leaves the previous series alone.
    assert len(samples(m)["mtlsproxy_expiry_timestamp_seconds"]) == 2


def test_expiries_keep_certificates_that_share_a_subject_apart() -> None:
    """
    A CA rollover: the old and the new CA have one subject.  Each keeps its
    own series (told apart by the fingerprint label), so the old CA's early
    expiry is not hidden behind the new one's.
    """
    m = Metrics(process=False)
    m.set_expiries([("ca", "CN=Corp CA", 1000.0, "aaaa"), ("ca", "CN=Corp CA", 9e9, "bbbb")])
    series = {
        (s.labels["subject"], s.labels["fingerprint"]): s.value
        for s in samples(m)["mtlsproxy_expiry_timestamp_seconds"]
    }
    assert series == {("CN=Corp CA", "aaaa"): 1000.0, ("CN=Corp CA", "bbbb"): 9e9}
    # the earliest expiry of that subject, as an alert would compute it
    assert min(v for (subject, _), v in series.items() if subject == "CN=Corp CA") == 1000.0


def test_expiries_from_material_label_each_certificate_by_fingerprint() -> None:
    """
    check.expiries (what the daemon exports at start and on reload) gives two
    CA certificates with one subject two series, labelled with the first 16
    hex digits of each certificate's SHA-256.
    """
    import types

    from cryptography.hazmat.primitives import hashes

    from mtlsproxy import check
    from tests import certfactory as cf

    old, new = cf.make_ca("Corp CA"), cf.make_ca("Corp CA")
    server = cf.make_server(old)
    material = types.SimpleNamespace(
        identity=types.SimpleNamespace(cert=server.cert, chain=()),
        cas=(old.cert, new.cert),
        crls=(cf.make_crl(old, []),),
    )
    entries = check.expiries(material)  # type: ignore[arg-type]
    m = Metrics(process=False)
    m.set_expiries(e.as_metric() for e in entries)
    cas = {
        s.labels["fingerprint"]: s.labels["subject"]
        for s in samples(m)["mtlsproxy_expiry_timestamp_seconds"]
        if s.labels["kind"] == "ca"
    }
    expected = {c.fingerprint(hashes.SHA256()).hex()[:16] for c in (old.cert, new.cert)}
    assert set(cas) == expected and len(expected) == 2
    assert set(cas.values()) == {"CN=Corp CA"}
    kinds = {s.labels["kind"] for s in samples(m)["mtlsproxy_expiry_timestamp_seconds"]}
    assert kinds == {"server", "ca", "crl"}


def test_registries_are_independent() -> None:
    """Each Metrics has its own registry, so several can live in one process."""
    a, b = Metrics(process=False), Metrics(process=False)
    a.request(200, 0.1)
    assert value(a, "mtlsproxy_requests_total", status_class="2xx") == 1
    assert value(b, "mtlsproxy_requests_total", status_class="2xx") == 0


def test_info_and_process_metrics() -> None:
    """The version is exported, and process metrics when asked for (Linux /proc)."""
    m = Metrics()
    parsed = samples(m)
    assert parsed["mtlsproxy_info"][0].labels == {"version": __version__}
    if Path("/proc/self/stat").exists():
        assert "process_resident_memory_bytes" in parsed


# -- HTTP -------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_metrics_endpoint_serves_prometheus_text() -> Generator[Any, Any, None]:
    """GET /metrics answers the registry in the text format, parseable by prometheus_client."""
    m = Metrics(process=False)
    m.request(200, 0.1)
    request = yield render(metrics_root(m, never_asked), b"/metrics")
    assert request.responseCode in (None, 200)
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    text = body(request).decode()
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {"mtlsproxy_requests", "mtlsproxy_handshakes", "mtlsproxy_info"} <= families
    assert "_created" not in text  # no per-series creation times: noise nobody graphs


@pytest_twisted.inlineCallbacks
def test_metrics_endpoint_speaks_openmetrics_when_asked() -> Generator[Any, Any, None]:
    """A scraper asking for OpenMetrics gets it (Prometheus does when configured to)."""
    root = metrics_root(Metrics(process=False), never_asked)
    request = yield render(root, b"/metrics", accept=b"application/openmetrics-text; version=1.0.0")
    content_type = request.responseHeaders.getRawHeaders(b"content-type")[0]
    assert content_type.startswith(b"application/openmetrics-text")
    assert body(request).endswith(b"# EOF\n")


@pytest_twisted.inlineCallbacks
def test_healthz() -> Generator[Any, Any, None]:
    """/healthz is 200 'ok' without asking the backend (liveness only)."""
    request = yield render(metrics_root(Metrics(process=False), never_asked), b"/healthz")
    assert request.responseCode in (None, 200)
    assert body(request) == b"ok\n"


@pytest.mark.parametrize(
    ("answer", "code", "text"),
    [
        (lambda: defer.succeed(True), 200, b"ready\n"),
        (lambda: defer.succeed(False), 503, b"not ready: backend unavailable\n"),
        (lambda: defer.fail(RuntimeError("probe broke")), 503, b"not ready: probe broke\n"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_readyz_follows_the_backend(
    answer: Any, code: int, text: bytes
) -> Generator[Any, Any, None]:
    """/readyz is 200 only when backend_ready says yes; no or an error is 503."""
    request = yield render(metrics_root(Metrics(process=False), answer), b"/readyz")
    assert request.responseCode == code
    assert body(request) == text


@pytest_twisted.inlineCallbacks
def test_readyz_times_out() -> Generator[Any, Any, None]:
    """A backend check that never answers becomes 503 after the timeout."""
    clock = Clock()
    pending: defer.Deferred[bool] = defer.Deferred()
    root = metrics_root(Metrics(process=False), lambda: pending, clock, ready_timeout=2.0)
    finished = render(root, b"/readyz")
    assert not finished.called
    clock.advance(2.0)
    request = yield finished
    assert request.responseCode == 503
    assert pending.called  # cancelled, so the probe can give up too


def test_readyz_client_gone_before_the_answer() -> None:
    """A scraper that disconnects before the backend answers gets nothing written, and no error."""
    pending: defer.Deferred[bool] = defer.Deferred()
    root = metrics_root(Metrics(process=False), lambda: pending)
    request = DummyRequest([b"readyz"])
    request.render(getChildForRequest(root, request))
    request.processingFailed(Failure(ConnectionDone()))
    pending.callback(True)
    assert request.written == []


def test_site_is_quiet() -> None:
    """The metrics site logs no access line per scrape and shows no tracebacks."""
    site = metrics_site(Metrics(process=False), never_asked)
    assert site.displayTracebacks is False
    assert site.noisy is False
    site.log(DummyRequest([b"metrics"]))  # type: ignore[arg-type]  # a no-op, not a write to a log file


@pytest.mark.filterwarnings("ignore:Using readBody with a transport:DeprecationWarning")
@pytest_twisted.inlineCallbacks
def test_site_over_a_real_socket() -> Generator[Any, Any, None]:
    """The Site from metrics_site serves /metrics over TCP, parsed by prometheus_client."""
    m = Metrics(process=False)
    m.handshake("refused", "certificate required")
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        metrics_site(m, lambda: defer.succeed(True))
    )
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/metrics".encode()
        response = yield Agent(reactor).request(b"GET", url)
        text = (yield readBody(response)).decode()
        assert response.code == 200
        handshakes = {
            f.name: f for f in text_string_to_metric_families(text)
        }["mtlsproxy_handshakes"]
        refused = [s for s in handshakes.samples if s.labels.get("result") == "refused"]
        assert refused[0].labels["reason"] == "certificate required" and refused[0].value == 1
        ready = yield Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{port.getHost().port}/readyz".encode()
        )
        yield readBody(ready)
        assert ready.code == 200
    finally:
        yield port.stopListening()


# -- the backend probe ------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_backend_probe_tcp() -> Generator[Any, Any, None]:
    """The probe says yes while something listens on the backend's port, no once it is gone."""
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Protocol)
    )
    number = port.getHost().port
    probe = backend_probe(reactor, Backend(f"http://127.0.0.1:{number}", "127.0.0.1", number), 5)
    assert (yield probe()) is True
    yield port.stopListening()
    assert (yield probe()) is False


@pytest_twisted.inlineCallbacks
def test_backend_probe_unix(tmp_path: Path) -> Generator[Any, Any, None]:
    """The probe works for unix: backends too."""
    path = str(tmp_path / "app.sock")
    probe = backend_probe(reactor, Backend(f"unix:{path}", path=path), 5)
    assert (yield probe()) is False
    port = yield UNIXServerEndpoint(reactor, path).listen(Factory.forProtocol(Protocol))
    try:
        assert (yield probe()) is True
    finally:
        yield port.stopListening()


# -- several workers: prometheus_client's multiprocess mode ------------------------------

#: What a worker records, run in a process of its own: multiprocess mode is
#: chosen when prometheus_client is imported, from PROMETHEUS_MULTIPROC_DIR.
_WORKER = """
import os, sys
from mtlsproxy.metrics import Metrics
m = Metrics(process=False)
assert m.multiprocess
m.watch_connections(lambda: 2, lambda: 1)
for status in (200, 200, 404):
    m.request(status, 0.01)
m.handshake("ok")
m.set_expiries([("server", "CN=old", 2000000000.0, "aaaa"), ("ca", "CN=ca", 2100000000.0, "cccc")])
# a reload that replaced the server certificate
m.set_expiries([("server", "CN=new", 2050000000.0, "bbbb"), ("ca", "CN=ca", 2100000000.0, "cccc")])
m.reload(True, 1700000000.0 + int(sys.argv[1]))
print(os.getpid())
"""


def _run_worker(directory: str, n: int) -> int:
    import os
    import subprocess
    import sys

    env = {**os.environ, MULTIPROC_ENV: directory}
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, str(n)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def _scrape(metrics: WorkersMetrics) -> dict[str, list[Sample]]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(body.decode())}


def test_multiprocess_dir_is_private_and_new_each_time(tmp_path: Path) -> None:
    """Under $RUNTIME_DIRECTORY (its first entry), mode 0700, never reused; removed whole."""
    first = make_multiprocess_dir({"RUNTIME_DIRECTORY": f"{tmp_path}:/nonexistent"})
    second = make_multiprocess_dir({"RUNTIME_DIRECTORY": str(tmp_path)})
    assert first != second
    for made in (first, second):
        assert Path(made).parent == tmp_path
        assert Path(made).stat().st_mode & 0o777 == 0o700
    (Path(first) / "counter_1.db").write_bytes(b"x")
    remove_multiprocess_dir(first)
    remove_multiprocess_dir(first)  # already gone: no error
    assert sorted(tmp_path.iterdir()) == [Path(second)]
    elsewhere = make_multiprocess_dir({})
    try:
        assert Path(elsewhere).parent != tmp_path
    finally:
        remove_multiprocess_dir(elsewhere)


def test_workers_metrics_add_up_the_workers_files(tmp_path: Path) -> None:
    """
    Two workers' files: counters and histograms summed, open connections
    summed over live workers, each expiry series once (a series a reload
    removed is gone), no pid label; a dead worker's counts stay.
    """
    directory = make_multiprocess_dir({"RUNTIME_DIRECTORY": str(tmp_path)})
    metrics = WorkersMetrics()
    assert metrics.render()[0] == b""  # before the master made the directory
    metrics.path = directory
    first = _run_worker(directory, 1)
    _run_worker(directory, 2)
    found = _scrape(metrics)
    assert all("pid" not in s.labels for family in found.values() for s in family)

    def one(name: str, **labels: str) -> float:
        family = name.removesuffix("_total").removesuffix("_count")
        values = [
            s.value for s in found[family]
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(values) == 1, (name, labels, values)
        return values[0]

    assert one("mtlsproxy_requests_total", status_class="2xx") == 4
    assert one("mtlsproxy_requests_total", status_class="4xx") == 2
    assert one("mtlsproxy_request_duration_seconds_count") == 6
    assert one("mtlsproxy_handshakes_total", result="ok") == 2
    assert one("mtlsproxy_client_connections") == 4
    assert one("mtlsproxy_backend_connections") == 2
    assert one("mtlsproxy_reloads_total", result="ok") == 2
    assert one("mtlsproxy_last_reload_successful") == 1
    assert one("mtlsproxy_last_reload_timestamp_seconds") == 1700000002.0
    assert one("mtlsproxy_info", version=__version__) == 1
    expiries = {
        (s.labels["kind"], s.labels["subject"], s.labels["fingerprint"]): s.value
        for s in found["mtlsproxy_expiry_timestamp_seconds"]
    }
    assert expiries == {
        ("server", "CN=new", "bbbb"): 2050000000.0,
        ("ca", "CN=ca", "cccc"): 2100000000.0,
    }
    assert len(found["mtlsproxy_expiry_timestamp_seconds"]) == 2

    metrics.mark_dead(first)
    found = _scrape(metrics)
    assert one("mtlsproxy_client_connections") == 2  # the dead worker's are gone
    assert one("mtlsproxy_requests_total", status_class="2xx") == 4  # its requests stay
    assert len(found["mtlsproxy_expiry_timestamp_seconds"]) == 2
    remove_multiprocess_dir(directory)


def test_single_process_metrics_ignore_multiprocess_modes(monkeypatch) -> None:
    """Without PROMETHEUS_MULTIPROC_DIR: gauges read at scrape time, expiries cleared."""
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    m = Metrics(process=False)
    assert not m.multiprocess
    m.watch_connections(lambda: 3)
    m.refresh()  # nothing to write down
    assert value(m, "mtlsproxy_client_connections") == 3
