"""
Operating the daemon as the README's "Running under systemd" section
describes it: SIGHUP and --reload-interval reloads (certificates, keys, CAs,
CRLs, what that does to requests in flight and to TLS session resumption, and
a fix made with chmod alone), sd_notify around start, reload and stop, the
--metrics listener (/metrics, /healthz, /readyz), the graceful stop on
SIGTERM with --shutdown-timeout, and expiry warnings in the log and in
`mtlsproxy check`.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import ssl
import threading
import time

import pytest

from tests import certfactory as cf

from .harness import (
    REPO,
    ConnectionClosed,
    TlsConnection,
    free_port,
    pattern_sha256,
    port_accepts,
    wait_for,
)
from .ops_helpers import (
    RELOAD_FAILED,
    RELOADED,
    NotifySocket,
    Scrape,
    ServerFiles,
    attempt_with_session,
    client_files,
    http_get,
    keystore_bytes,
    log_count,
    make_server_cert,
    new_connection_serial,
    obey_file_permissions,
    replace_file,
    run_check,
    served_certificate,
    wait_for_log_count,
    wait_for_metric,
    write_crl,
)

pytestmark = pytest.mark.e2e

TLS_VERSIONS = [
    pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2"),
    pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3"),
]

#: How a client resumes: (TLS version, whether it takes session tickets).
#: Without tickets (ssl.OP_NO_TICKET), a TLS 1.2 client resumes by session
#: id, from the server's session cache: another store than the tickets,
#: which a reload must handle too.
RESUMPTION = [
    pytest.param((ssl.TLSVersion.TLSv1_2, True), id="tls1.2"),
    pytest.param((ssl.TLSVersion.TLSv1_3, True), id="tls1.3"),
    pytest.param((ssl.TLSVersion.TLSv1_2, False), id="tls1.2-session-cache"),
]

#: the log line of a reload that swapped in new material
SWAPPED = r"reloaded certificates, CA and CRLs"


@pytest.fixture
def server_files(pki, tmp_path) -> ServerFiles:
    """A copy of the standard server certificate and key that a test may replace."""
    return ServerFiles.create(tmp_path / "server", pki.server)


def _metrics_option() -> tuple[int, list[str]]:
    port = free_port()
    return port, ["--metrics", f"tcp:{port}:interface=127.0.0.1"]


# -- SIGHUP ---------------------------------------------------------------------------


def test_sighup_serves_new_certificate_and_keeps_open_connections(
    start_proxy, pki, server_files
):
    """
    The server certificate and key files are replaced by a new certificate
    (same CA, another serial) and the proxy gets SIGHUP: it logs the reload,
    new handshakes present the new certificate, a connection opened before the
    reload still answers requests (on its old certificate), and the process
    keeps running.
    """
    old_serial = pki.server.cert.serial_number
    proxy = start_proxy(cert=server_files.cert, key=server_files.key)

    before = proxy.tls()
    try:
        assert before.request("GET", "/echo/before").status == 200
        assert served_certificate(before).serial_number == old_serial
        assert new_connection_serial(proxy) == old_serial

        renewed = cf.make_server(pki.ca)
        assert renewed.cert.serial_number != old_serial
        server_files.install(renewed)
        proxy.proc.send_signal(signal.SIGHUP)
        wait_for_log_count(proxy, RELOADED, 1)

        assert new_connection_serial(proxy) == renewed.cert.serial_number
        again = before.request("GET", "/echo/after-reload")
        assert again.status == 200, again
        assert again.echo().values("X-Client-Cert-CN") == ["client"]
        assert served_certificate(before).serial_number == old_serial
    finally:
        before.close()
    assert proxy.running, proxy.log_text()
    assert log_count(proxy, RELOAD_FAILED) == 0, proxy.log_text()


def test_sighup_with_invalid_key_keeps_old_certificate(start_proxy, pki, server_files):
    """
    The key file is overwritten with garbage and the proxy gets SIGHUP: the
    log says "reload failed" naming the key file, new handshakes still get the
    old certificate, /metrics reports the failed reload
    (mtlsproxy_last_reload_successful 0), and the process keeps running.
    """
    metrics_port, metrics = _metrics_option()
    old_serial = pki.server.cert.serial_number
    proxy = start_proxy(*metrics, cert=server_files.cert, key=server_files.key)
    assert new_connection_serial(proxy) == old_serial

    server_files.key.write_bytes(
        b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n"
    )
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for_log_count(proxy, RELOAD_FAILED, 1)

    line = next(ln for ln in proxy.log_text().splitlines() if re.search(RELOAD_FAILED, ln))
    assert server_files.key.name in line, line
    assert log_count(proxy, RELOADED) == 0, proxy.log_text()
    assert proxy.running, proxy.log_text()
    assert new_connection_serial(proxy) == old_serial

    scrape = Scrape.get(metrics_port)
    assert scrape.value("mtlsproxy_last_reload_successful") == 0
    assert scrape.value("mtlsproxy_reloads_total", result="failed") == 1
    assert scrape.value("mtlsproxy_reloads_total", result="ok") == 0
    assert proxy.running, proxy.log_text()


# -- CRL reload and TLS session resumption ---------------------------------------------


def _resumption_context(proxy, client, resumption) -> ssl.SSLContext:
    """A client context for one of the RESUMPTION ways."""
    version, tickets = resumption
    context = proxy.context(client, min_version=version, max_version=version)
    if not tickets:
        context.options |= ssl.OP_NO_TICKET
    return context


def _resumable_session(proxy, context) -> ssl.SSLSession:
    """
    A session the proxy resumes right now: made by a full handshake, then shown
    to resume (the control for the attempts after a reload).  Returns the
    latest session (with TLS 1.3, the ticket from the resumed connection).
    """
    with proxy.tls(context=context) as first:
        assert first.request("GET", "/echo/full").echo().values("X-Client-Cert-CN")
        assert not first.session_reused
        session = first.session
        _close_notify(first)
    assert session is not None
    with proxy.tls(context=context, session=session) as second:
        assert second.session_reused, "control: the proxy did not resume a fresh session"
        assert second.request("GET", "/echo/resumed").status == 200
        latest = second.session
        _close_notify(second)
    assert latest is not None
    return latest


def _close_notify(conn: TlsConnection) -> None:
    """
    End the connection as curl, openssl s_client or Go do: with a TLS
    close_notify.  OpenSSL forgets a cached session whose connection ended
    without one (the proxy never shut it down), so a TLS 1.2 client without
    tickets that just drops the TCP connection is not resumed.
    """
    try:
        conn.sock.unwrap()
    except (ssl.SSLError, OSError):
        pass  # the session is what matters here, not a tidy goodbye


@pytest.mark.parametrize("resumption", RESUMPTION)
def test_crl_reload_refuses_resumption_of_revoked_client(
    start_proxy, pki, tmp_path, resumption
):
    """
    Started with --crl (an empty CRL from the CA), a client gets a TLS session
    (a TLS 1.2 ticket, a TLS 1.3 ticket, or a TLS 1.2 session id in the
    server's session cache) that resumes.  Then a CRL revoking
    that client is written and the proxy gets SIGHUP: offering the old session
    is NOT resumed, and the full handshake is refused with "certificate
    revoked", so a revoked client cannot ride in on a session from before.
    """
    client = pki.get("ops-crl-client")
    crl = write_crl(tmp_path / "crl.pem", pki.ca, [])
    proxy = start_proxy("--crl", str(crl))
    context = _resumption_context(proxy, client, resumption)
    session = _resumable_session(proxy, context)

    write_crl(crl, pki.ca, [client.issued.cert])
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for_log_count(proxy, RELOADED, 1)

    attempt = attempt_with_session(proxy.port, context, session)
    assert attempt.resumed is not True, f"the revoked client's session was resumed: {attempt}"
    assert attempt.response is None, f"the revoked client got an answer: {attempt}"
    proxy.wait_for_log(rf"refused {re.escape(attempt.peer)}: certificate revoked")
    assert proxy.running, proxy.log_text()


@pytest.mark.parametrize("resumption", RESUMPTION)
def test_reload_without_trust_change_keeps_sessions_resumable(start_proxy, pki, resumption):
    """
    A SIGHUP that finds the same certificates, key, CA and CRLs keeps the
    running context: a session made before it is still resumed, and the
    resumed connection still carries the client's identity.
    """
    proxy = start_proxy()
    context = _resumption_context(proxy, "client", resumption)
    session = _resumable_session(proxy, context)

    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for_log(r"reload: certificates, key, CA and CRLs unchanged")

    attempt = attempt_with_session(proxy.port, context, session)
    assert attempt.response is not None, attempt
    assert attempt.response.echo().values("X-Client-Cert-CN") == ["client"]
    assert attempt.resumed is True, f"not resumed after a no-op reload: {attempt}"


@pytest.mark.parametrize("resumption", RESUMPTION)
def test_ca_change_refuses_old_clients_and_their_sessions(start_proxy, pki, tmp_path, resumption):
    """
    The --ca file is replaced by another CA's certificate and the proxy gets
    SIGHUP: a client of the old CA can neither resume its session (a resumed
    session skips verification) nor make a full handshake ("unknown CA"),
    while a client of the new CA gets in.
    """
    ca_file = tmp_path / "trusted-ca.pem"
    ca_file.write_bytes(pki.ca_cert.read_bytes())
    proxy = start_proxy(ca=ca_file)
    context = _resumption_context(proxy, "client", resumption)
    session = _resumable_session(proxy, context)

    other_ca = cf.make_ca("mtlsproxy e2e replacement CA")
    replace_file(ca_file, cf.pem(other_ca.cert))
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for_log_count(proxy, SWAPPED, 1)

    attempt = attempt_with_session(proxy.port, context, session)
    assert attempt.resumed is not True, f"the old CA's client resumed its session: {attempt}"
    assert attempt.response is None, f"the old CA's client got an answer: {attempt}"
    proxy.wait_for_log(rf"refused {re.escape(attempt.peer)}: unknown CA")

    newcomer = client_files(tmp_path / "newcomer", cf.make_client(other_ca, "newcomer"), "newcomer")
    with proxy.tls(newcomer) as conn:
        response = conn.request("GET", "/echo/new-ca")
    assert response.status == 200, response
    assert response.echo().values("X-Client-Cert-CN") == ["newcomer"]
    assert proxy.running, proxy.log_text()


def test_request_in_flight_across_sighup_completes(start_proxy, pki, server_files, backend):
    """
    A request the backend answers after 3 s is in flight when the
    certificate is replaced and the proxy gets SIGHUP: the reload happens
    while it waits, and the client still gets its complete 200.
    """
    proxy = start_proxy(cert=server_files.cert, key=server_files.key)
    outcome: dict = {}
    thread = _download_in_thread(proxy, "/slow?delay=3", outcome)
    wait_for(lambda: backend.requests(), 10, "the request to reach the backend")

    server_files.install(cf.make_server(pki.ca))
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for_log_count(proxy, SWAPPED, 1)
    assert "ended" not in outcome, "the request ended before the reload: nothing was tested"

    thread.join(20)
    assert "error" not in outcome, f"{outcome}\n{proxy.log_text()}"
    response = outcome["response"]
    assert response.status == 200, response
    assert response.body == b"slept 3 s\n"
    assert proxy.running, proxy.log_text()


# -- --reload-interval -----------------------------------------------------------------


def test_reload_interval_picks_up_replaced_certificate(start_proxy, pki, server_files):
    """
    With --reload-interval 1 and no signal at all: replacing the certificate
    and key files (renamed over the old ones, as certbot does) makes the proxy
    log the change and the reload, and new handshakes present the new certificate.
    """
    proxy = start_proxy("--reload-interval", "1", cert=server_files.cert, key=server_files.key)
    assert new_connection_serial(proxy) == pki.server.cert.serial_number

    renewed = cf.make_server(pki.ca)
    server_files.install(renewed)
    proxy.wait_for_log(r"certificate files changed on disk, reloading", timeout=10)
    wait_for_log_count(proxy, RELOADED, 1, timeout=10)
    wait_for(
        lambda: new_connection_serial(proxy) == renewed.cert.serial_number,
        10,
        "new handshakes to present the renewed certificate",
    )
    assert proxy.running, proxy.log_text()


def test_reload_interval_picks_up_a_fix_made_with_chmod(launcher, pki, tmp_path):
    """
    --reload-interval 1 with a keystore, the proxy subject to file
    permissions as the service user is: a renewed keystore arrives that the
    proxy cannot read (mode 0000, as a file copied by root without the
    service's group).  The reload fails, logged once naming the file, and
    the old certificate stays.  Then chmod alone (content, size and mtime
    unchanged) fixes it: the proxy reloads and new handshakes present the
    renewed certificate.
    """
    obey_file_permissions(launcher)
    password = "renewal-secret"
    password_file = tmp_path / "keystore.pass"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    keystore = tmp_path / "keystore.p12"
    keystore.write_bytes(keystore_bytes(pki.server, password))
    keystore.chmod(0o600)
    proxy = launcher.start(
        "--keystore", str(keystore), "--keystore-password-file", str(password_file),
        "--reload-interval", "1", cert=None, key=None,
    )
    assert new_connection_serial(proxy) == pki.server.cert.serial_number

    renewed = cf.make_server(pki.ca)
    incoming = tmp_path / ".keystore.p12.new"
    incoming.write_bytes(keystore_bytes(renewed, password))
    incoming.chmod(0)
    os.replace(incoming, keystore)
    line = proxy.wait_for_log(rf"{RELOAD_FAILED}.*", timeout=10).group(0)
    assert f"{keystore.name}: permission denied" in line, line
    assert new_connection_serial(proxy) == pki.server.cert.serial_number

    mtime = keystore.stat().st_mtime_ns
    keystore.chmod(0o600)
    assert keystore.stat().st_mtime_ns == mtime
    wait_for(
        lambda: new_connection_serial(proxy) == renewed.cert.serial_number,
        10,
        "new handshakes to present the renewed certificate",
    )
    assert log_count(proxy, SWAPPED) == 1, proxy.log_text()
    assert log_count(proxy, RELOAD_FAILED) == 1, proxy.log_text()
    assert proxy.running, proxy.log_text()


# -- sd_notify ---------------------------------------------------------------------------


@pytest.fixture
def notify_socket():
    sock = NotifySocket()
    yield sock
    sock.close()


def test_sd_notify_ready_reloading_stopping(start_proxy, notify_socket):
    """
    With NOTIFY_SOCKET naming an AF_UNIX datagram socket (what systemd sets for
    Type=notify): READY=1 arrives once the proxy listens (its port is listening
    when the message arrives), a SIGHUP is framed by RELOADING=1 (with
    MONOTONIC_USEC, as Type=notify-reload requires) and READY=1, SIGTERM
    sends STOPPING=1, and the exit status is 0.
    """
    proxy = start_proxy(env={"NOTIFY_SOCKET": str(notify_socket.path)})
    notify_socket.wait_for_states(["READY=1"])
    ready = notify_socket.messages[0]
    assert proxy.port in ready.listening, (
        f"READY=1 came before port {proxy.port} listened: {sorted(ready.listening)}"
    )

    sent = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    proxy.proc.send_signal(signal.SIGHUP)
    notify_socket.wait_for_states(["READY=1", "RELOADING=1", "READY=1"])
    wait_for_log_count(proxy, RELOADED, 1)
    reloading = notify_socket.messages[1]
    usec = int(reloading.fields["MONOTONIC_USEC"])
    assert sent <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000, reloading

    proxy.proc.send_signal(signal.SIGTERM)
    notify_socket.wait_for_states(["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"])
    assert proxy.proc.wait(timeout=15) == 0, proxy.log_text()
    assert notify_socket.states() == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


# -- metrics and health -------------------------------------------------------------------


def test_metrics_health_and_readiness(start_proxy, pki, backend):
    """
    --metrics tcp:PORT:interface=127.0.0.1 serves, as prometheus_client's parser reads it:
    handshakes ok and refused ("certificate required"), requests by status class
    with their duration histogram, open client and backend connections,
    expiry timestamps equal to the server's and the CA's notAfter, the reload
    counter after a SIGHUP, and after the backend is stopped a 502 counted as a
    backend error.  /healthz is 200 throughout; /readyz is 200 while the backend
    is up and 503 once it is down.
    """
    metrics_port, metrics = _metrics_option()
    proxy = start_proxy(*metrics)

    status, _, body = http_get(metrics_port, "/healthz")
    assert (status, body) == (200, "ok\n")
    status, _, body = http_get(metrics_port, "/readyz")
    assert status == 200, body

    with proxy.tls() as open_conn:
        assert open_conn.request("GET", "/echo/metrics").status == 200
        refused = proxy.attempt(None)
        assert refused.refused, refused
        scrape = wait_for_metric(
            metrics_port,
            lambda s: s.total(
                "mtlsproxy_handshakes_total", result="refused", reason="certificate required"
            ) >= 1,
            "the refused handshake to be counted",
        )
        assert scrape.value("mtlsproxy_handshakes_total", result="ok") >= 1
        assert scrape.value("mtlsproxy_requests_total", status_class="2xx") >= 1
        assert scrape.value("mtlsproxy_request_duration_seconds_count") >= 1
        assert scrape.value("mtlsproxy_client_connections") >= 1, "the open connection"
        assert scrape.values("mtlsproxy_backend_connections"), scrape.text

    expiry = "mtlsproxy_expiry_timestamp_seconds"
    server_subject = pki.server.cert.subject.rfc4514_string()
    ca_subject = pki.ca.cert.subject.rfc4514_string()
    assert scrape.value(expiry, kind="server", subject=server_subject) == pytest.approx(
        pki.server.cert.not_valid_after_utc.timestamp(), abs=0.5
    )
    assert scrape.value(expiry, kind="ca", subject=ca_subject) == pytest.approx(
        pki.ca.cert.not_valid_after_utc.timestamp(), abs=0.5
    )

    assert scrape.value("mtlsproxy_reloads_total", result="ok") == 0
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for_log_count(proxy, RELOADED, 1)
    scrape = Scrape.get(metrics_port)
    assert scrape.value("mtlsproxy_reloads_total", result="ok") == 1
    assert scrape.value("mtlsproxy_last_reload_successful") == 1

    backend.stop()
    wait_for(lambda: not port_accepts(backend.port), 10, "the backend to stop listening")
    with proxy.tls() as conn:
        response = conn.request("GET", "/echo/backend-down")
    assert response.status == 502, response
    scrape = wait_for_metric(
        metrics_port,
        lambda s: s.total("mtlsproxy_backend_errors_total") >= 1,
        "the backend error to be counted",
    )
    assert scrape.value("mtlsproxy_requests_total", status_class="5xx") >= 1
    status, _, body = http_get(metrics_port, "/readyz")
    assert status == 503, body
    status, _, body = http_get(metrics_port, "/healthz")
    assert (status, body) == (200, "ok\n")
    assert proxy.running, proxy.log_text()


# -- graceful stop ---------------------------------------------------------------------------


def _download_in_thread(proxy, target: str, outcome: dict) -> threading.Thread:
    def client() -> None:
        try:
            with proxy.tls(timeout=30) as conn:
                outcome["response"] = conn.request("GET", target)
        except (ConnectionClosed, ssl.SSLError, OSError) as e:
            outcome["error"] = repr(e)
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    return thread


def test_sigterm_lets_download_finish_and_refuses_new_connections(start_proxy, backend):
    """
    --shutdown-timeout 10, SIGTERM while a rate-limited download (~2 s) is in
    flight: the proxy stops listening at once (new connections are refused),
    the download completes intact, and the proxy exits 0.
    """
    size, rate = 200_000, 100_000
    proxy = start_proxy("--shutdown-timeout", "10")
    outcome: dict = {}
    thread = _download_in_thread(proxy, f"/download?bytes={size}&rate={rate}", outcome)
    wait_for(lambda: backend.requests(), 10, "the download to reach the backend")

    proxy.proc.send_signal(signal.SIGTERM)
    proxy.wait_for_log(r"stopping: draining 1 connection\(s\), 1 with a request in flight")
    assert not port_accepts(proxy.port), "the proxy still accepts connections while stopping"
    with pytest.raises(ConnectionRefusedError):
        TlsConnection(proxy.port, proxy.context(), timeout=5)
    assert proxy.running, "the proxy exited before the download finished"

    thread.join(30)
    assert "error" not in outcome, f"{outcome}\n{proxy.log_text()}"
    response = outcome["response"]
    assert response.status == 200, response
    assert len(response.body) == size
    assert hashlib.sha256(response.body).hexdigest() == pattern_sha256(size)
    assert proxy.proc.wait(timeout=15) == 0, proxy.log_text()


def test_shutdown_timeout_cuts_long_request(start_proxy, backend):
    """
    --shutdown-timeout 1, SIGTERM while a download that needs ~8 s is in
    flight: the proxy aborts it after about a second (the client gets a
    truncated response), logs the abort, and exits 0 long before the download
    would have finished.
    """
    size, rate = 800_000, 100_000
    proxy = start_proxy("--shutdown-timeout", "1")
    outcome: dict = {}
    thread = _download_in_thread(proxy, f"/download?bytes={size}&rate={rate}", outcome)
    wait_for(lambda: backend.requests(), 10, "the download to reach the backend")

    sent = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    status = proxy.proc.wait(timeout=15)
    exited = time.monotonic() - sent
    assert status == 0, proxy.log_text()
    assert exited < 4.0, f"exit took {exited:.1f} s with --shutdown-timeout 1"
    assert re.search(
        r"shutdown timeout \(1(\.0)?s\) passed: aborted 1 connection\(s\), 1 with a request",
        proxy.log_text(),
    ), proxy.log_text()

    thread.join(15)
    assert "ended" in outcome, "the client is still reading from an exited proxy"
    assert "error" in outcome, f"the download was not cut: {outcome.get('response')}"
    assert outcome["ended"] - sent < 4.0, outcome


# -- expiry warnings and mtlsproxy check ---------------------------------------------------------


def test_expiring_certificate_warned_at_start_and_by_check(start_proxy, pki, tmp_path, backend):
    """
    A server certificate that expires in 5 days: the proxy starts, and its
    start-up log warns about it, naming it; `mtlsproxy check` with the same
    options prints a WARNING line about it and exits 0 (usable).
    """
    expiring = make_server_cert(
        pki.ca, cn="expiring.test", names=("expiring.test", "localhost", "127.0.0.1"),
        not_after=cf.days_ahead(5),
    )
    cert, key = expiring.write(tmp_path, "expiring-server")
    warning = r"server certificate CN=expiring\.test expires in [45] days"

    proxy = start_proxy(cert=cert, key=key)
    line = proxy.wait_for_log(r".*" + warning + r".*").group(0)
    assert "warn" in line.lower(), f"not logged as a warning: {line}"
    assert proxy.curl("/echo/expiring").status == 200

    done = run_check(
        "--backend", backend.url, "--cert", str(cert), "--key", str(key),
        "--ca", str(pki.ca_cert),
    )
    shown = f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, shown
    warnings = [ln for ln in done.stderr.splitlines() if ln.startswith("WARNING:")]
    assert any(re.search(warning, ln) for ln in warnings), shown
    assert "ERROR" not in done.stderr and "Traceback" not in done.stderr + done.stdout, shown


def test_crl_due_soon_warned_at_start_and_by_check(start_proxy, pki, tmp_path, backend):
    """
    A CRL whose nextUpdate is 3 days away: the proxy starts and serves, and
    its start-up log warns that the CRL is due, naming its issuer, because
    past that date every client of that CA is refused; `mtlsproxy check`
    prints the same warning and exits 0.
    """
    crl = write_crl(tmp_path / "due-crl.pem", pki.ca, [], next_update_days=3)
    issuer = re.escape(pki.ca.cert.subject.rfc4514_string())
    warning = rf"CRL from {issuer} is due for its next update in [23] days"

    proxy = start_proxy("--crl", str(crl))
    line = proxy.wait_for_log(r".*" + warning + r".*").group(0)
    assert "warn" in line.lower(), f"not logged as a warning: {line}"
    assert proxy.curl("/echo/crl-due").status == 200

    done = run_check(
        "--backend", backend.url, "--cert", str(pki.server_cert), "--key", str(pki.server_key),
        "--ca", str(pki.ca_cert), "--crl", str(crl),
    )
    shown = f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, shown
    warnings = [ln for ln in done.stderr.splitlines() if ln.startswith("WARNING:")]
    assert any(re.search(warning, ln) for ln in warnings), shown


def test_check_key_not_matching_certificate(pki, backend):
    """
    `mtlsproxy check` with a key that belongs to another certificate: exit
    status 1, exactly one ERROR line naming the key option and file, no traceback.
    """
    done = run_check(
        "--backend", backend.url, "--cert", str(pki.server_cert), "--key", str(pki.client.key),
        "--ca", str(pki.ca_cert),
    )
    shown = f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 1, shown
    assert "Traceback" not in done.stdout + done.stderr, shown
    errors = [ln for ln in (done.stdout + done.stderr).splitlines() if "ERROR" in ln]
    assert len(errors) == 1, shown
    assert errors[0].startswith("ERROR: "), shown
    assert "--key" in errors[0] and pki.client.key.name in errors[0], shown
    assert "does not match" in errors[0], shown


def test_check_with_toml_config(pki, tmp_path):
    """
    `mtlsproxy check --config FILE` with a copy of the shipped
    etc/mtlsproxy.toml whose file names point at real files (and with its
    crl, metrics and reload-interval examples switched on): exit 0, and the
    report names the config file, the certificate, the key, the CA and the CRL.
    """
    crl = write_crl(tmp_path / "crl.pem", pki.ca, [])
    replacements = {
        "cert": f'"{pki.server_cert}"',
        "key": f'"{pki.server_key}"',
        "ca": f'"{pki.ca_cert}"',
        "crl": f'["{crl}"]',
        "metrics": '"tcp:9100:interface=127.0.0.1"',
        "reload-interval": "60",
    }
    text = (REPO / "etc" / "mtlsproxy.toml").read_text()
    for name, value in replacements.items():
        text, count = re.subn(rf"^#?{re.escape(name)} = .*$", f"{name} = {value}", text,
                              count=1, flags=re.MULTILINE)
        assert count == 1, f"etc/mtlsproxy.toml has no '{name} = ' line"
    config = tmp_path / "mtlsproxy.toml"
    config.write_text(text)

    done = run_check("--config", str(config))
    shown = f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, shown
    assert "ERROR" not in done.stderr and "Traceback" not in done.stdout + done.stderr, shown
    for path in (config, pki.server_cert, pki.server_key, pki.ca_cert, crl):
        assert str(path) in done.stdout, f"{path} not in the report\n{shown}"
    assert done.stdout.rstrip().splitlines()[-1].startswith("configuration OK"), shown
