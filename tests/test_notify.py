"""sd_notify over NOTIFY_SOCKET, received on a real AF_UNIX datagram socket as systemd would."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtlsproxy import notify


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a file, as systemd's notification socket is."""
    path = tmp_path / "notify"
    if len(str(path).encode()) >= 100:  # AF_UNIX paths are limited to 108 bytes
        pytest.skip(f"temporary directory too deep for an AF_UNIX path: {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    """Outside systemd (no NOTIFY_SOCKET) every call is a quiet no-op."""
    assert notify.notify("READY=1", environ={}) is False
    assert notify.ready(environ={}) is False
    assert notify.notify("READY=1", environ={"NOTIFY_SOCKET": ""}) is False


def test_ready_reaches_a_socket_file(receiver: tuple[socket.socket, str]) -> None:
    """READY=1 arrives as one datagram on the socket NOTIFY_SOCKET names."""
    sock, path = receiver
    assert notify.ready(environ={"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1"


def test_default_environment_is_the_process_environment(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an explicit mapping, NOTIFY_SOCKET is read from os.environ at call time."""
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify.notify("STOPPING=1") is True
    assert sock.recv(4096) == b"STOPPING=1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")
def test_abstract_socket_name() -> None:
    """A name starting with '@' is an abstract socket, as systemd sets it for some services."""
    name = f"mtlsproxy-test-{os.getpid()}-{id(object())}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        assert notify.notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_reloading_carries_monotonic_usec(receiver: tuple[socket.socket, str]) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC, which Type=notify-reload (systemd 253+) requires."""
    sock, path = receiver
    before = notify.time.clock_gettime_ns(notify.time.CLOCK_MONOTONIC) // 1000
    assert notify.reloading(environ={"NOTIFY_SOCKET": path})
    fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
    assert fields["RELOADING"] == "1"
    assert int(fields["MONOTONIC_USEC"]) >= before


def test_status_is_one_line(receiver: tuple[socket.socket, str]) -> None:
    """A status text with newlines is flattened: a newline would start another field."""
    sock, path = receiver
    assert notify.stopping("draining 3 connections\nREADY=1", environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining 3 connections READY=1"
    assert notify.status("serving", environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"STATUS=serving"


def test_missing_socket_is_not_an_error(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET nobody listens on makes notify() return False, never raise."""
    assert notify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_unsupported_address_is_ignored() -> None:
    """Addresses this module cannot use (vsock:, relative names) are ignored."""
    assert notify.socket_address("vsock:2:1234") is None
    assert notify.socket_address("relative/path") is None
    assert notify.notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    assert notify.socket_address("@x") == b"\0x"
    assert notify.socket_address("/run/systemd/notify") == "/run/systemd/notify"


def test_reload_status_says_whether_the_reload_worked() -> None:
    """
    A failed reload still ends in READY=1, so its STATUS= must say so; a good
    one sends a status too, replacing an earlier failure's.
    """
    assert notify.reload_status(None) == notify.RELOAD_OK
    failed = notify.reload_status("crl.pem: not a CRL")
    assert failed.startswith("reload failed") and "crl.pem: not a CRL" in failed


def test_ready_with_a_reload_failure_is_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notify.ready(notify.reload_status("bad\nfile"), environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == (
        b"READY=1\nSTATUS=reload failed, keeping the current certificates: bad file"
    )
