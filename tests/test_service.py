"""
ProxyService behaviour that needs no network: the periodic expiry check,
/readyz while draining, and listen errors in the operator's own words.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from mtlsproxy.config import build_config
from mtlsproxy.errors import ListenError
from mtlsproxy.service import EXPIRY_CHECK_INTERVAL, make_service

from . import certfactory as cf

CRL_WARNING = "is due for its next update"


def _files(tmp_path: Path, crl_days: float | None = None) -> dict[str, object]:
    ca = cf.make_ca()
    cert, key = cf.make_server(ca).write(tmp_path, "server")
    (tmp_path / "ca.pem").write_bytes(cf.pem(ca.cert))
    files: dict[str, object] = {"cert": str(cert), "key": str(key), "ca": str(tmp_path / "ca.pem")}
    if crl_days is not None:
        crl = cf.make_crl(ca, [], next_update_days=crl_days)
        (tmp_path / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        files["crl"] = [str(tmp_path / "crl.pem")]
    return files


def _warnings(events: list[dict[str, object]]) -> list[str]:
    return [formatEvent(e) for e in events if CRL_WARNING in formatEvent(e)]


def test_expiry_is_checked_while_running(tmp_path: Path) -> None:
    """
    A CRL due in 20 days: nothing at start-up; the daemon, never reloaded,
    warns once the CRL is within 14 days (after 6 days of its clock), again
    at each later check, and each check sets the expiry gauges anew.
    """
    clock = MemoryReactorClock()
    clock.advance(time.time())  # the reactor's time is the wall clock's, as in the daemon

    def now() -> datetime.datetime:
        return datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)

    config = build_config({"backend": "http://a:1", **_files(tmp_path, crl_days=20)})
    with capturedLogs() as events:
        service = make_service(config, clock, now=now)
        service.startService()
        assert _warnings(events) == [], "a CRL due in 20 days was warned about at start-up"
        checks_per_day = 86400 // EXPIRY_CHECK_INTERVAL
        for _ in range(5 * checks_per_day):
            clock.advance(EXPIRY_CHECK_INTERVAL)
        assert _warnings(events) == [], "warned while the CRL was still 15 days away"
        for _ in range(2 * checks_per_day):
            clock.advance(EXPIRY_CHECK_INTERVAL)
        warned = _warnings(events)
        assert warned, "no warning after 7 days without a reload"
        assert any("in 13 days" in line for line in warned), warned
        assert all(e["log_level"].name == "warn" for e in events  # type: ignore[attr-defined]
                   if CRL_WARNING in formatEvent(e))

        service.metrics.set_expiries([])
        assert b'kind="crl"' not in service.metrics.render("")[0]
        before = len(_warnings(events))
        clock.advance(EXPIRY_CHECK_INTERVAL)
        assert len(_warnings(events)) == before + 1, "the next check did not warn again"
        assert b'kind="crl"' in service.metrics.render("")[0], "gauges not set by the check"

    service.stopService()
    assert service._expiry is not None and not service._expiry.running


def test_draining_readyz_says_shutting_down(tmp_path: Path) -> None:
    """While draining, /readyz is 503 with 'shutting down', not 'backend unavailable'."""
    reactor = MemoryReactorClock()
    config = build_config(
        {"backend": "http://127.0.0.1:9", "metrics": "tcp:0:interface=127.0.0.1",
         **_files(tmp_path)}
    )
    service = make_service(config, reactor)
    service._listen_metrics(config.metrics)  # type: ignore[arg-type]
    site = reactor.tcpServers[-1][1]
    readyz = site.resource.children[b"readyz"]

    service.factory.draining = True
    request = DummyRequest([b""])
    assert readyz.render(request) is NOT_DONE_YET
    assert request.finished
    assert request.responseCode == 503
    assert b"".join(request.written) == b"not ready: shutting down\n"


@pytest.mark.parametrize("listen", ["tcp:notaport", "tcp:8443:interface=127.0.0.1:bogus=1"])
def test_listen_error_shows_the_description_as_written(tmp_path: Path, listen: str) -> None:
    """
    The backlog mtlsproxy adds to a tcp: description is its own business:
    the error names --listen with exactly what the operator wrote.
    """
    config = build_config({"backend": "http://127.0.0.1:9", "listen": listen, **_files(tmp_path)})
    service = make_service(config, MemoryReactor())
    with pytest.raises(ListenError) as e:
        service.listen()
    assert str(e.value).startswith(f"--listen {listen}: "), str(e.value)
    assert "backlog" not in str(e.value)
