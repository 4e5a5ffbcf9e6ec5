"""
Start-up errors end in a non-zero exit and one line on stderr naming the
option or file, never a traceback; SIGTERM ends the proxy cleanly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .harness import (
    TWISTD,
    ProxyLauncher,
    TlsConnection,
    assert_startup_error,
    free_port,
    port_accepts,
    tls_context,
    wait_for,
)

pytestmark = pytest.mark.e2e


def test_missing_cert_file(proxy_args, run_proxy_expect_exit, tmp_path):
    """--cert naming a file that does not exist."""
    missing = tmp_path / "missing-cert.pem"
    result = run_proxy_expect_exit(proxy_args(port=free_port(), cert=missing))
    assert_startup_error(result, ["--cert", "missing-cert.pem"])


def test_missing_ca_file(proxy_args, run_proxy_expect_exit, tmp_path):
    """--ca naming a file that does not exist."""
    missing = tmp_path / "missing-ca.pem"
    result = run_proxy_expect_exit(proxy_args(port=free_port(), ca=missing))
    assert_startup_error(result, ["--ca", "missing-ca.pem"])


def test_key_is_a_directory(proxy_args, run_proxy_expect_exit, tmp_path):
    """--key naming a directory: unreadable as a key (tests run as root, so not chmod 000)."""
    directory = tmp_path / "key-dir"
    directory.mkdir()
    result = run_proxy_expect_exit(proxy_args(port=free_port(), key=directory))
    assert_startup_error(result, ["--key", "key-dir"])


def test_key_not_pem(proxy_args, run_proxy_expect_exit, pki):
    """--key naming a file that holds no key."""
    garbage = pki.write("garbage-key.pem", "this is not a private key\n")
    result = run_proxy_expect_exit(proxy_args(port=free_port(), key=garbage))
    assert_startup_error(result, ["--key", "garbage-key.pem"])


def test_key_not_matching_cert(proxy_args, run_proxy_expect_exit, pki):
    """--key holding another certificate's key (the client's)."""
    result = run_proxy_expect_exit(proxy_args(port=free_port(), key=pki.client.key))
    assert_startup_error(
        result, ["--key", "--cert", pki.client.key.name, pki.server_cert.name]
    )


def test_wrong_keystore_password(proxy_args, run_proxy_expect_exit, pki):
    """--keystore with a password file holding the wrong password."""
    wrong = pki.write("wrong.pass", "not-the-password\n")
    keystore = pki.keystore()
    args = proxy_args(
        "--keystore", str(keystore.path), "--keystore-password-file", str(wrong),
        port=free_port(), cert=None, key=None,
    )
    result = run_proxy_expect_exit(args)
    assert_startup_error(
        result, ["--keystore", keystore.path.name, "wrong.pass"]
    )


def test_wrong_keystore_password_from_environment(proxy_args, run_proxy_expect_exit, pki):
    """--keystore with the wrong MTLSPROXY_KEYSTORE_PASSWORD."""
    keystore = pki.keystore()
    args = proxy_args("--keystore", str(keystore.path), port=free_port(), cert=None, key=None)
    result = run_proxy_expect_exit(args, env={"MTLSPROXY_KEYSTORE_PASSWORD": "wrong"})
    assert_startup_error(result, ["--keystore", keystore.path.name, "MTLSPROXY_KEYSTORE_PASSWORD"])


def test_wrong_truststore_password(proxy_args, run_proxy_expect_exit, pki):
    """--truststore with a password file holding the wrong password."""
    wrong = pki.write("wrong-trust.pass", "not-the-password\n")
    truststore = pki.truststore()
    args = proxy_args(
        "--truststore", str(truststore.path), "--truststore-password-file", str(wrong),
        port=free_port(), ca=None,
    )
    result = run_proxy_expect_exit(args)
    assert_startup_error(result, ["--truststore", truststore.path.name, "wrong-trust.pass"])


@pytest.mark.parametrize("content", ["", "no certificate in here\n"], ids=["empty", "text"])
def test_ca_file_without_certificate(proxy_args, run_proxy_expect_exit, pki, content):
    """--ca naming a file that contains no certificate."""
    name = f"no-ca-{len(content)}.pem"
    result = run_proxy_expect_exit(proxy_args(port=free_port(), ca=pki.write(name, content)))
    assert_startup_error(result, ["--ca", name])


def test_invalid_crl_file(proxy_args, run_proxy_expect_exit, pki):
    """--crl naming a file that is not a CRL."""
    bad = pki.write("bad-crl.pem", "-----BEGIN X509 CRL-----\nbm9wZQ==\n-----END X509 CRL-----\n")
    result = run_proxy_expect_exit(proxy_args("--crl", str(bad), port=free_port()))
    assert_startup_error(result, ["--crl", "bad-crl.pem"])


def test_config_file_value_of_wrong_type(proxy_args, run_proxy_expect_exit, tmp_path):
    """
    workers = "2" in the --config file (a string where TOML needs an integer):
    one line naming the file and the key, not a silent conversion.
    """
    config = tmp_path / "wrong-type.toml"
    config.write_text('workers = "2"\n')
    result = run_proxy_expect_exit(proxy_args("--config", str(config), port=free_port()))
    line = assert_startup_error(result, [str(config)])
    assert "workers: expected a whole number" in line, line


def test_unknown_option(proxy_args, run_proxy_expect_exit):
    """An option mtlsproxy does not have."""
    result = run_proxy_expect_exit(proxy_args("--frobnicate", "7", port=free_port()))
    assert_startup_error(result, ["--frobnicate"])


def test_missing_backend(proxy_args, run_proxy_expect_exit):
    """No --backend at all."""
    result = run_proxy_expect_exit(proxy_args(port=free_port(), backend=None))
    assert_startup_error(result, ["--backend"])


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one-process", "workers"])
def test_port_in_use(proxy_args, run_proxy_expect_exit, workers):
    """
    --listen on a port another socket already listens on; the line shows
    --listen as written, without the backlog the proxy adds to it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        result = run_proxy_expect_exit(proxy_args(port=port) + workers)
    assert_startup_error(result, ["--listen", str(port)])
    assert "backlog" not in result[2], result[2]


def test_sigterm_exits_zero(proxy):
    """SIGTERM to an idle proxy: it exits promptly with status 0."""
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.proc.wait(timeout=10)
    assert proxy.proc.returncode == 0, proxy.log_text()


def test_sigterm_lets_in_flight_request_finish(proxy, backend):
    """
    SIGTERM while a request is in flight: the client still gets its complete
    response, then the proxy exits with status 0.
    """
    outcome: dict = {}

    def client() -> None:
        try:
            with proxy.tls() as conn:
                outcome["response"] = conn.request("GET", "/slow?delay=2")
        except Exception as e:  # reported by the assertion below
            outcome["error"] = repr(e)

    thread = threading.Thread(target=client)
    thread.start()
    wait_for(lambda: backend.requests(), 10, "the request to reach the backend")
    proxy.proc.send_signal(signal.SIGTERM)
    thread.join(20)
    assert "error" not in outcome, outcome
    assert outcome["response"].status == 200
    assert outcome["response"].body == b"slept 2 s\n"
    proxy.proc.wait(timeout=15)
    assert proxy.proc.returncode == 0, proxy.log_text()


# -- without -n: twistd forks into the background --------------------------

#: a daemonising twistd that cannot start must say so and exit within this
DAEMON_DEADLINE = 20.0


def run_daemonising(
    launcher: ProxyLauncher, args: list[str], workdir: Path
) -> tuple[int, str, str, float]:
    """
    Run C{twistd --pidfile --logfile mtlsproxy ARGS} (no C{-n}) in C{workdir};
    return (status, stdout, stderr, seconds it took).  The command ends when
    the daemon reports its start-up, or failure, to the parent.
    """
    command = [
        str(TWISTD), f"--pidfile={workdir / 'tw.pid'}", f"--logfile={workdir / 'tw.log'}",
        "mtlsproxy", *args,
    ]
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=workdir, capture_output=True, stdin=subprocess.DEVNULL,
            env=launcher.environment(), timeout=DAEMON_DEADLINE, start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"twistd without -n did not return within {DAEMON_DEADLINE:g} s: {command}")
    return (
        done.returncode,
        done.stdout.decode(errors="replace"),
        done.stderr.decode(errors="replace"),
        time.monotonic() - started,
    )


def _assert_daemon_listen_error(
    launcher: ProxyLauncher, args: list[str], workdir: Path, mentions: list[str]
) -> None:
    status, out, err, _ = run_daemonising(launcher, args, workdir)
    line = assert_startup_error((status, out, err), mentions)
    assert "--listen" in line, line
    log = (workdir / "tw.log").read_text()
    assert line in log, log
    assert "Traceback" not in log, log
    assert not (workdir / "tw.pid").exists()


def test_port_in_use_without_nodaemon(launcher, proxy_args, tmp_path):
    """
    Without -n, a port in use: twistd returns at once with the one line on
    stderr and status 1 (it used to wait forever on its status pipe), and
    the line is in the log file too.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        _assert_daemon_listen_error(
            launcher, proxy_args(port=port), tmp_path, [f"{port}"]
        )


def test_bad_endpoint_without_nodaemon(launcher, proxy_args, tmp_path):
    """Without -n, --listen bogus:1: one line on stderr naming the option, status 1."""
    _assert_daemon_listen_error(
        launcher, proxy_args(listen="bogus:1"), tmp_path, ["bogus:1"]
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_daemon_mode_serves_and_stops_on_sigterm(launcher, proxy_args, pki, backend, tmp_path):
    """
    Without -n: twistd returns 0 once the daemon listens, the pidfile names
    it, a request goes through, and SIGTERM to that pid stops it (pidfile removed).
    """
    port = free_port()
    status, out, err, _ = run_daemonising(launcher, proxy_args(port=port), tmp_path)
    log_file = tmp_path / "tw.log"
    assert status == 0, f"{out}\n{err}\n{log_file.read_text() if log_file.exists() else ''}"
    pidfile = tmp_path / "tw.pid"
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "pidfile"))
    try:
        wait_for(lambda: port_accepts(port), 10, "the daemon to accept")
        context = tls_context(pki.ca_cert, pki.get("client"))
        with TlsConnection(port, context) as conn:
            response = conn.request("GET", "/echo/daemon")
        assert response.status == 200
        assert response.echo().values("X-Client-Cert-CN") == ["client"]
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not _alive(pid), 15, "the daemon to exit after SIGTERM")
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pidfile.exists(), 5, "the pidfile to be removed")
    log = log_file.read_text()
    assert "received SIGTERM, stopping" in log, log
    assert "Traceback" not in log, log
    assert any("/echo/daemon" in line and " 200 " in line for line in log.splitlines()), log
