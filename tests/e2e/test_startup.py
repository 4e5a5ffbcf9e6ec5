"""
Start-up errors end in a non-zero exit and one line on stderr naming the
option or file, never a traceback; SIGTERM ends the proxy cleanly.
"""

from __future__ import annotations

import signal
import socket
import threading

import pytest

from .harness import assert_startup_error, free_port, wait_for

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


def test_unknown_option(proxy_args, run_proxy_expect_exit):
    """An option mtlsproxy does not have."""
    result = run_proxy_expect_exit(proxy_args("--frobnicate", "7", port=free_port()))
    assert_startup_error(result, ["--frobnicate"])


def test_missing_backend(proxy_args, run_proxy_expect_exit):
    """No --backend at all."""
    result = run_proxy_expect_exit(proxy_args(port=free_port(), backend=None))
    assert_startup_error(result, ["--backend"])


def test_port_in_use(proxy_args, run_proxy_expect_exit):
    """--listen on a port another socket already listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        result = run_proxy_expect_exit(proxy_args(port=port))
    assert_startup_error(result, ["--listen", str(port)])


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
