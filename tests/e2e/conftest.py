"""
Fixtures of the end-to-end tests (helpers live in L{tests.e2e.harness}).

  - C{pki} (session): L{harness.Pki}; C{pki.client} is the valid client,
    C{pki.get(kind)} the others, C{pki.crl()}, C{pki.keystore()}, C{pki.truststore()}.
  - C{backend} / C{unix_backend}: a fresh legacy_app per test (L{harness.Backend}),
    with C{.url}, C{.requests()}.
  - C{start_proxy(*extra, expect_fail=False, env=None, backend=..., cert=...,
    key=..., ca=...)}: starts C{twistd -n mtlsproxy} against C{backend} and
    returns a L{harness.Proxy} (C{.port}, C{.proc}, C{.log_text()},
    C{.wait_for_log()}, C{.rss_kib()}, C{.stop()}, C{.curl()}, C{.tls()},
    C{.attempt()}, C{.s_client()}); every proxy is stopped at teardown, and a
    Python traceback in its log fails the test.
  - C{proxy}: C{start_proxy()} with the standard options.
  - C{proxy_args(*extra, port=..., backend=..., ...)}: the standard option list.
  - C{run_proxy_expect_exit(args, env=None)}: C{(status, stdout, stderr)}.
  - C{shared_stack} (module): one backend and one proxy for the tests of a
    module that only look at what one request does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Backend, Pki, Proxy, ProxyLauncher


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Backend]:
    app = Backend.start(tmp_path / "backend")
    yield app
    app.stop()


@pytest.fixture
def unix_backend(tmp_path: Path) -> Iterator[Backend]:
    app = Backend.start(tmp_path / "unix-backend", unix=True)
    yield app
    app.stop()


def _finish(launcher: ProxyLauncher) -> None:
    problems = launcher.stop_all()
    if problems:
        pytest.fail("traceback in the proxy log:\n" + "\n\n".join(problems), pytrace=False)


@pytest.fixture
def launcher(pki: Pki, backend: Backend, tmp_path: Path) -> Iterator[ProxyLauncher]:
    launch = ProxyLauncher(pki, tmp_path / "proxy", backend.url)
    yield launch
    _finish(launch)


@pytest.fixture
def start_proxy(launcher: ProxyLauncher):
    return launcher.start


@pytest.fixture
def proxy(start_proxy) -> Proxy:
    return start_proxy()


@pytest.fixture
def proxy_args(launcher: ProxyLauncher):
    return launcher.args


@pytest.fixture
def run_proxy_expect_exit(launcher: ProxyLauncher):
    return launcher.run_expect_exit


@pytest.fixture(scope="module")
def shared_stack(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Backend, Proxy]]:
    workdir = tmp_path_factory.mktemp("shared")
    app = Backend.start(workdir / "backend")
    launch = ProxyLauncher(pki, workdir / "proxy", app.url)
    try:
        yield app, launch.start()
    finally:
        problems = launch.stop_all()
        app.stop()
    if problems:
        pytest.fail("traceback in the proxy log:\n" + "\n\n".join(problems), pytrace=False)
