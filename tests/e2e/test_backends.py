"""
The backend side: a unix-socket backend, and what the client gets when the
backend is down (502) or too slow to answer (504).
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import pytest

from .harness import free_port, wait_for

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


def _connects_within(sock: socket.socket, seconds: float) -> bool:
    """Whether a non-blocking connect already under way completes within C{seconds}."""
    _, writable, _ = select.select([], [sock], [], seconds)
    return bool(writable) and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


@pytest.fixture
def unanswering_backend() -> Iterator[int]:
    """
    The port of a listener that never accepts, its accept queue filled: the
    kernel then drops further SYNs, so a connect neither succeeds nor is
    refused, deterministically and without leaving the machine.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []

    def queue_full() -> bool:
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.setblocking(False)
        fillers.append(filler)
        filler.connect_ex(("127.0.0.1", port))
        return not _connects_within(filler, 0.5)

    try:
        wait_for(queue_full, 15, "the backend's accept queue to fill", interval=0)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_backend_connect_timeout_gives_502(start_proxy, unanswering_backend):
    """
    --backend-connect-timeout 1 and a backend whose connects hang: the
    client gets 502 after about a second (not the 5 s default), the log
    says why, and the proxy keeps serving.
    """
    proxy = start_proxy(
        "--backend-connect-timeout", "1", backend=f"http://127.0.0.1:{unanswering_backend}"
    )
    started = time.monotonic()
    result = proxy.curl("/echo/connect-timeout")
    elapsed = time.monotonic() - started
    assert result.status == 502, result.describe()
    assert 0.9 <= elapsed < 4.0, f"502 after {elapsed:.2f} s"
    proxy.wait_for_log(r"backend connect timeout")
    proxy.wait_for_log(r'"GET /echo/connect-timeout HTTP/1\.1" 502 ')
    assert proxy.running
