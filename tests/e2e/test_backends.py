"""
The backend side: a unix-socket backend, and what the client gets when the
backend is down (502) or too slow to answer (504).
"""

from __future__ import annotations

import time

import pytest

from .harness import free_port

pytestmark = pytest.mark.e2e


def test_unix_socket_backend(start_proxy, unix_backend):
    """--backend unix:/path: requests reach the app over the unix socket, with identity."""
    proxy = start_proxy(backend=unix_backend.url)
    echo = proxy.curl("/echo/unix").echo()
    assert echo.values("X-Client-Cert-CN") == ["client"]
    assert echo.values("X-Forwarded-For") == ["127.0.0.1"]
    assert echo.values("Host") == [f"localhost:{proxy.port}"]
    assert [line.rsplit(" ", 1)[0] for line in unix_backend.requests()] == ["GET /echo/unix"]


def test_backend_down_gives_502(start_proxy):
    """A backend that refuses connections: the client gets 502, and the proxy keeps serving."""
    proxy = start_proxy(backend=f"http://127.0.0.1:{free_port()}")
    for _ in range(2):
        result = proxy.curl("/echo/down")
        assert result.status == 502, result.describe()
    assert proxy.running


def test_missing_unix_socket_gives_502(start_proxy, tmp_path):
    """A unix-socket backend whose socket does not exist: 502."""
    proxy = start_proxy(backend=f"unix:{tmp_path / 'absent.sock'}")
    result = proxy.curl("/echo/down")
    assert result.status == 502, result.describe()


def test_slow_backend_gives_504(start_proxy, backend):
    """
    --backend-timeout 1 and an app that takes 3 s to answer: the client gets
    504 after about a second (well before the app answers); the proxy then
    serves the next request normally.
    """
    proxy = start_proxy("--backend-timeout", "1")
    started = time.monotonic()
    result = proxy.curl("/slow?delay=3")
    elapsed = time.monotonic() - started
    assert result.status == 504, result.describe()
    assert 0.9 <= elapsed < 2.9, f"504 after {elapsed:.2f} s"
    assert any(line.startswith("GET /slow?delay=3 ") for line in backend.requests())
    assert proxy.curl("/echo/after-504").echo().values("X-Client-Cert-CN") == ["client"]


def test_backend_answering_within_timeout_is_not_cut(start_proxy):
    """An app slower than usual but within --backend-timeout gets its answer through."""
    proxy = start_proxy("--backend-timeout", "5")
    result = proxy.curl("/slow?delay=1")
    assert result.status == 200, result.describe()
    assert result.body == b"slept 1 s\n"
