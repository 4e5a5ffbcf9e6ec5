"""
TLS over any Twisted server endpoint: IPv6, and systemd socket activation.

Socket activation is done the way systemd does it: the listening socket is
inherited as file descriptor 3, with LISTEN_FDS=1 and LISTEN_PID set to the
pid of the process that is exec'd (a shell's C{$$} before C{exec twistd}).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import (
    Backend,
    Pki,
    Proxy,
    ProxyLauncher,
    free_port,
    port_accepts,
    require,
    wait_for,
)

pytestmark = pytest.mark.e2e


def _run(
    launcher: ProxyLauncher, args: list[str], log: Path, **popen: object
) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            popen.pop("command", None) or launcher.command(args),
            cwd=launcher.workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=launcher.environment(),
            start_new_session=True,
            **popen,
        )


@pytest.fixture
def stop_later() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)


def test_socket_activation_with_inherited_fd(
    launcher: ProxyLauncher, pki: Pki, backend: Backend, stop_later: list[subprocess.Popen[bytes]]
) -> None:
    """
    With --listen systemd:domain=INET:index=0, the proxy serves TLS on the socket it
    inherited (fd 3; LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID as systemd sets them) and binds none:
    a client with a certificate gets through, one without is refused.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    args = launcher.args(listen="systemd:domain=INET:index=0")
    # systemd >= 227 always sets LISTEN_FDNAMES; Twisted ignores the fds without it.
    command = "export LISTEN_FDS=1 LISTEN_FDNAMES=mtlsproxy.socket LISTEN_PID=$$; exec " + (
        shlex.join(launcher.command(args))
    )

    def inherit_as_fd3() -> None:
        os.dup2(listener.fileno(), 3)
        os.set_inheritable(3, True)

    log = launcher.workdir / "activated.log"
    # close_fds runs after preexec_fn: fd 3 must be named to survive it.
    proc = _run(launcher, args, log, command=["sh", "-c", command], preexec_fn=inherit_as_fd3,
                pass_fds=(3,))
    stop_later.append(proc)
    listener.close()  # only the proxy holds the socket now
    wait_for(
        lambda: proc.poll() is not None or "listening on" in log.read_text(),
        15,
        "the activated proxy to start",
    )
    assert proc.poll() is None, log.read_text()
    proxy = Proxy(proc, port, log, args, pki)
    with proxy.tls() as conn:
        response = conn.request("GET", "/echo/activated")
    assert response.status == 200
    assert response.echo().values("X-Client-Cert-CN") == ["client"]
    assert proxy.attempt(None).refused
    assert len(backend.requests()) == 1


def test_tcp6_listener(
    launcher: ProxyLauncher, backend: Backend, stop_later: list[subprocess.Popen[bytes]]
) -> None:
    """--listen tcp6:PORT:interface=\\:\\:1 serves mTLS over IPv6; curl reaches it at [::1]."""
    curl = require("curl")
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    args = launcher.args(listen=f"tcp6:{port}:interface=\\:\\:1")
    log = launcher.workdir / "tcp6.log"
    proc = _run(launcher, args, log)
    stop_later.append(proc)
    wait_for(
        lambda: proc.poll() is not None or port_accepts(port, "::1"),
        15,
        "the IPv6 proxy to listen",
    )
    assert proc.poll() is None, log.read_text()
    p = launcher.pki
    done = subprocess.run(
        [curl, "-sS", "--cacert", str(p.ca_cert), "--cert", str(p.client.cert),
         "--key", str(p.client.key), f"https://[::1]:{port}/echo/v6"],
        capture_output=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert b'"X-Client-Cert-CN"' in done.stdout
    assert b'"::1"' in done.stdout  # X-Forwarded-For is the IPv6 peer


def test_shipped_unit_command_line_serves_and_logs_to_the_journal(
    launcher: ProxyLauncher, pki: Pki, backend: Backend, stop_later: list[subprocess.Popen[bytes]]
) -> None:
    """
    The ExecStart= of etc/systemd/mtlsproxy.service as written (twistd's
    path and the configuration file's the only changes), with stdout the
    journal's stream as systemd sets it (JOURNAL_STREAM): it serves, and its
    lines carry journald priority prefixes instead of twistd's timestamps.
    """
    unit = Path(__file__).resolve().parents[2] / "etc" / "systemd" / "mtlsproxy.service"
    (exec_start,) = [
        line.split("=", 1)[1]
        for line in unit.read_text().splitlines()
        if line.startswith("ExecStart=")
    ]
    argv = shlex.split(exec_start)
    assert argv[0] == "/usr/bin/twistd"
    assert argv[-2:] == ["--config", "/etc/mtlsproxy/mtlsproxy.toml"]
    port = free_port()
    config = launcher.workdir / "unit.toml"
    config.write_text(
        "\n".join(
            f"{key} = {value!r}".replace("'", '"')
            for key, value in {
                "listen": f"tcp:{port}:interface=127.0.0.1",
                "backend": backend.url,
                "cert": str(pki.server_cert),
                "key": str(pki.server_key),
                "ca": str(pki.ca_cert),
            }.items()
        )
        + "\n"
    )
    command = [launcher.command([])[0], *argv[1:-1], str(config)]
    log = launcher.workdir / "unit.log"
    log.touch()
    stat = log.stat()
    with open(log, "r+b") as out:
        proc = subprocess.Popen(
            command,
            cwd=launcher.workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**launcher.environment(), "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"},
            start_new_session=True,
        )
    stop_later.append(proc)
    wait_for(lambda: proc.poll() is not None or port_accepts(port), 15, "the unit's proxy")
    assert proc.poll() is None, log.read_text()
    proxy = Proxy(proc, port, log, [], pki)
    with proxy.tls() as conn:
        assert conn.request("GET", "/echo/unit").status == 200
    assert proxy.attempt(None).refused
    wait_for(lambda: "certificate required" in log.read_text(), 10, "the refusal line")
    lines = log.read_text().splitlines()
    access = [line for line in lines if "/echo/unit" in line]
    assert len(access) == 1 and access[0].startswith("<6>"), lines
    refusal = [line for line in lines if "certificate required" in line]
    assert refusal and all(re.match(r"<\d>", line) for line in refusal), lines
    assert not any(re.match(r"<\d>\d{4}-\d\d-\d\dT", line) for line in lines), lines
    proc.terminate()
    assert proc.wait(15) == 0, log.read_text()
