"""The twistd plugin, its options and makeService, without running a reactor."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactor
from twisted.plugin import getPlugins

from mtlsproxy import tap
from mtlsproxy.config import build_config
from mtlsproxy.service import ProxyService, make_service

from . import certfactory

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    ca = certfactory.make_ca()
    cert, key = certfactory.make_server(ca).write(d, "server")
    (d / "ca.pem").write_bytes(certfactory.pem(ca.cert))
    return {"cert": str(cert), "key": str(key), "ca": str(d / "ca.pem")}


def test_plugin_is_found() -> None:
    """twistd finds the mtlsproxy service maker through the drop-in."""
    names = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "mtlsproxy" in names
    assert names["mtlsproxy"].module == "mtlsproxy.tap"


def test_options_build_a_service(pki: dict[str, str]) -> None:
    """Parsing a full command line loads the certificates and builds the service."""
    options = tap.Options()
    options.parseOptions(
        ["--backend", "http://127.0.0.1:9", "--cert", pki["cert"], "--key", pki["key"],
         "--ca", pki["ca"]]
    )
    service = tap.makeService(options)
    assert isinstance(service, ProxyService)
    assert options.config is not None and options.config.backend.port == 9


def test_repeatable_options_accumulate() -> None:
    """--crl, --allow-cn and friends may be given several times."""
    options = tap.Options()
    options.opt_allow_cn("alice")  # type: ignore[attr-defined]
    options.opt_allow_cn("bob")  # type: ignore[attr-defined]
    assert options["allow-cn"] == ["alice", "bob"]


def test_unknown_option_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown option exits 2 with one line on stderr, not twistd's whole usage text."""
    with pytest.raises(SystemExit) as e:
        tap.Options().parseOptions(["--bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mtlsproxy: ") and "bogus" in err


def test_bad_file_is_one_line(capsys: pytest.CaptureFixture[str], pki: dict[str, str]) -> None:
    """A missing certificate file ends start-up with one line naming option and file."""
    with pytest.raises(SystemExit) as e:
        tap.Options().parseOptions(
            ["--backend", "http://127.0.0.1:9", "--cert", "/nonexistent.pem", "--key", pki["key"],
             "--ca", pki["ca"]]
        )
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("mtlsproxy: --cert") and "/nonexistent.pem" in err


def test_listen_failure_is_a_listen_error(pki: dict[str, str]) -> None:
    """An endpoint description that cannot be parsed is reported against --listen."""
    from mtlsproxy.errors import ListenError

    config = build_config(
        {"backend": "http://127.0.0.1:9", "listen": "nonsense:1", **pki}
    )
    service = make_service(config, MemoryReactor())
    with pytest.raises(ListenError, match="^--listen nonsense:1: "):
        service.listen()


def test_listen_uses_the_endpoint_and_wraps_tls(pki: dict[str, str]) -> None:
    """The listener is the operator's endpoint with the TLS factory over the proxy factory."""
    from twisted.protocols.tls import TLSMemoryBIOFactory

    reactor = MemoryReactor()
    config = build_config(
        {"backend": "http://127.0.0.1:9", "listen": "tcp:0:interface=127.0.0.1", **pki}
    )
    service = make_service(config, reactor)
    service.listen()
    port, factory, backlog, interface = reactor.tcpServers[0]
    assert (port, interface) == (0, "127.0.0.1")
    assert isinstance(factory, TLSMemoryBIOFactory)


@pytest.mark.slow
def test_wheel_ships_the_plugin(tmp_path: Path) -> None:
    """A built wheel (a non-editable install) contains the twistd drop-in."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("mtlsproxy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/mtlsproxy_plugin.py" in names
    assert not [n for n in names if n.startswith("twisted/") and n.endswith("__init__.py")]


def test_systemd_listen_without_activation_is_a_listen_error(pki: dict[str, str]) -> None:
    """--listen systemd:... outside socket activation is one clear error, not an IndexError."""
    from mtlsproxy.errors import ListenError

    config = build_config(
        {"backend": "http://127.0.0.1:9", "listen": "systemd:domain=INET:index=0", **pki}
    )
    with pytest.raises(ListenError, match="no inherited socket"):
        make_service(config, MemoryReactor()).listen()


@contextlib.contextmanager
def signals_restored() -> Iterator[None]:
    """privilegedStartService installs SIGTERM/SIGHUP handlers: put the test runner's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_sigterm_is_handled_before_the_listening_line(pki: dict[str, str]) -> None:
    """
    A supervisor may send SIGTERM the instant it reads "listening on": the
    handler must already be ours then, or the default disposition kills the
    daemon with -15 instead of a clean stop (a CI flake seen once).
    """
    config = build_config(
        {"listen": "tcp:0:interface=127.0.0.1", "backend": "http://127.0.0.1:9",
         "cert": pki["cert"], "key": pki["key"], "ca": pki["ca"]}
    )
    reactor = MemoryReactor()
    service = make_service(config, reactor)
    seen: list[object] = []
    real_listen = service.listen

    def listen() -> object:
        seen.append(signal.getsignal(signal.SIGTERM))
        return real_listen()

    service.listen = listen  # type: ignore[method-assign]
    before = signal.getsignal(signal.SIGTERM)
    with signals_restored():
        service.privilegedStartService()
    assert len(seen) == 1
    assert seen[0] not in (signal.SIG_DFL, before)


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:8443", "tcp:8443:backlog=511"),
        ("tcp6:8443:interface=\\:\\:1", "tcp6:8443:interface=\\:\\:1:backlog=511"),
        ("unix:/run/mtlsproxy.sock", "unix:/run/mtlsproxy.sock:backlog=511"),
        ("tcp:8443:backlog=4096", "tcp:8443:backlog=4096"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_listen_backlog_defaults_to_nginxs(description: str, expected: str) -> None:
    """Twisted's backlog of 50 is raised to 511 unless --listen sets one."""
    from mtlsproxy.service import with_backlog

    assert with_backlog(description) == expected


def test_listening_port_gets_the_backlog(pki: dict[str, str]) -> None:
    """The daemon's listening socket is opened with that backlog."""
    config = build_config(
        {"listen": "tcp:0:interface=127.0.0.1", "backend": "http://127.0.0.1:9",
         "cert": pki["cert"], "key": pki["key"], "ca": pki["ca"]}
    )
    reactor = MemoryReactor()
    service = make_service(config, reactor)
    with signals_restored():
        service.privilegedStartService()
    (port, _factory, backlog, interface), = reactor.tcpServers
    assert (port, backlog, interface) == (0, 511, "127.0.0.1")
