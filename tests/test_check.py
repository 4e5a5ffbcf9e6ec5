"""`mtlsproxy check`: the report, the exit status, and the expiry warnings the daemon shares."""

from __future__ import annotations

import datetime
import io
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from mtlsproxy import cli
from mtlsproxy.check import (
    Expiry,
    expiries,
    expiry_warnings,
    load_material,
    run_check,
    warnings_for,
)
from mtlsproxy.config import build_config

from . import certfactory as cf


@dataclass
class Files:
    dir: Path
    ca: cf.Issued
    server: cf.Issued
    cert: Path
    key: Path
    ca_file: Path
    crl: Path

    def args(self, *extra: str) -> list[str]:
        return [
            "--backend", "http://127.0.0.1:8080",
            "--cert", str(self.cert),
            "--key", str(self.key),
            "--ca", str(self.ca_file),
            *extra,
        ]


@dataclass
class Result:
    status: int
    out: str
    err: str

    @property
    def errors(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("ERROR: ")]

    @property
    def warnings(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("WARNING: ")]


def check(args: list[str], now: datetime.datetime | None = None) -> Result:
    out, err = io.StringIO(), io.StringIO()
    status = run_check(args, out=out, err=err, now=now)
    result = Result(status, out.getvalue(), err.getvalue())
    assert "Traceback" not in result.out + result.err
    return result


@pytest.fixture
def files(tmp_path: Path) -> Files:
    ca = cf.make_ca("Check CA")
    server = cf.make_server(ca)  # valid for 30 days
    cert, key = server.write(tmp_path, "server")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(cf.pem(ca.cert))
    crl = tmp_path / "crl.pem"
    crl.write_bytes(
        cf.make_crl(ca, [], next_update_days=30).public_bytes(serialization.Encoding.PEM)
    )
    return Files(tmp_path, ca, server, cert, key, ca_file, crl)


def test_good_configuration(files: Files) -> None:
    """A sound configuration exits 0 and reports each file, the subject, names and days left."""
    r = check(files.args("--crl", str(files.crl)))
    assert r.status == 0, r.err
    assert r.err == ""
    assert f"server certificate {files.cert}: OK" in r.out
    assert f"server key {files.key}: OK, matches the certificate" in r.out
    assert "subject CN=localhost" in r.out
    assert "names DNS:localhost, IP:127.0.0.1, IP:::1" in r.out
    assert "days left" in r.out
    assert f"client CA file {files.ca_file}: OK, 1 CA certificate" in r.out
    assert "CA CN=Check CA" in r.out
    assert f"CRL file {files.crl}: OK, 1 CRL" in r.out
    assert "issuer CN=Check CA: next update" in r.out
    assert "listen tcp:8443: OK" in r.out
    assert r.out.rstrip().endswith("configuration OK")


def test_expiring_soon_is_a_warning(files: Files) -> None:
    """A certificate or CRL ending within 14 days is a WARNING line, and still exit 0."""
    now = cf.days_ahead(20)  # the server certificate and the CRL have 10 days left
    r = check(files.args("--crl", str(files.crl)), now=now)
    assert r.status == 0
    assert any("server certificate CN=localhost expires in 9 days" in w for w in r.warnings), r.err
    assert any("CRL from CN=Check CA is due for its next update in" in w for w in r.warnings)
    assert "configuration OK (2 warnings)" in r.out


def test_expired_certificate_and_crl_are_problems(files: Files) -> None:
    """An expired server certificate or a CRL past its next update is an ERROR and exit 1."""
    r = check(files.args("--crl", str(files.crl)), now=cf.days_ahead(40))
    assert r.status == 1
    assert any("server certificate CN=localhost expired on" in e for e in r.errors), r.err
    assert any("past its next update" in e and "CRL expired" in e for e in r.errors)
    assert not any("CN=localhost expired" in w for w in r.warnings)  # an ERROR, not both
    assert "problems found" in r.out


def test_missing_key_is_one_line(files: Files) -> None:
    """A missing file is one ERROR line naming option and file; the rest is still checked."""
    args = files.args("--crl", str(files.dir / "nope.pem"))
    args[args.index("--key") + 1] = str(files.dir / "missing-key.pem")
    r = check(args)
    assert r.status == 1
    assert r.errors == [
        f"ERROR: --key: {files.dir / 'missing-key.pem'}: no such file",
        f"ERROR: --crl: {files.dir / 'nope.pem'}: no such file",
    ]
    assert "client CA file" in r.out  # checked despite the earlier problems
    assert "2 problems found" in r.out


def test_key_not_matching_certificate(files: Files, tmp_path: Path) -> None:
    """A key that belongs to another certificate is reported as such."""
    other = cf.make_server(files.ca)
    _, other_key = other.write(tmp_path, "other")
    args = files.args()
    args[args.index("--key") + 1] = str(other_key)
    r = check(args)
    assert r.status == 1
    assert len(r.errors) == 1 and "private key does not match certificate" in r.errors[0]


def test_usage_errors_exit_2(files: Files) -> None:
    """An unknown option is a usage error: one line on stderr, exit 2."""
    r = check([*files.args(), "--no-such-option"])
    assert r.status == 2
    assert r.err.count("\n") == 1 and "no-such-option" in r.err and r.out == ""


def test_configuration_errors_exit_1(files: Files) -> None:
    """A missing required option is a problem of the configuration (exit 1), as for the daemon."""
    r = check(["--cert", str(files.cert), "--key", str(files.key), "--ca", str(files.ca_file)])
    assert r.status == 1
    assert r.errors == ["ERROR: --backend: is required (http://HOST:PORT or unix:/path)"]


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    """--help shows the daemon's options under the check's own synopsis and exits 0."""
    assert run_check(["--help"]) == 0
    text = capsys.readouterr().out
    assert "mtlsproxy check" in text and "--keystore-password-file" in text


def test_config_file(files: Files) -> None:
    """--config FILE is read like the daemon reads it; the command line wins."""
    toml = files.dir / "proxy.toml"
    toml.write_text(
        f'listen = "tcp:9443"\nbackend = "http://127.0.0.1:8080"\ncert = "{files.cert}"\n'
        f'key = "{files.key}"\nca = "{files.ca_file}"\ncrl = ["{files.crl}"]\n'
    )
    r = check(["--config", str(toml), "--listen", "tcp:10443"])
    assert r.status == 0, r.err
    assert f"config {toml}: OK" in r.out
    assert "listen tcp:10443: OK" in r.out


def test_bad_toml_key(files: Files) -> None:
    """An unknown key in the TOML file is one ERROR line naming the file."""
    toml = files.dir / "bad.toml"
    toml.write_text('backend = "http://127.0.0.1:1"\nlisten-port = 443\n')
    r = check(["--config", str(toml)])
    assert r.status == 1
    assert r.errors == [f"ERROR: {toml}: unknown key 'listen-port'"]


def test_invalid_listen_and_systemd_listen(files: Files) -> None:
    """A listen description Twisted cannot parse is a problem; systemd: is left to systemd."""
    bad = check(files.args("--listen", "tcp:notaport"))
    assert bad.status == 1 and "listen tcp:notaport: not a valid endpoint" in bad.errors[0]
    activated = check(files.args("--listen", "systemd:domain=INET:index=0"))
    assert activated.status == 0, activated.err
    assert "socket activation" in activated.out


def test_chain_is_reported_and_checked(tmp_path: Path) -> None:
    """The chain sent is listed; a certificate that did not sign the one below is a warning."""
    ca = cf.make_ca("Root")
    inter = cf.make_intermediate(ca, "Issuing CA")
    server = cf.make_server(inter)
    cert, key = server.write(tmp_path, "server")
    (tmp_path / "ca.pem").write_bytes(cf.pem(ca.cert))
    base = ["--backend", "http://127.0.0.1:1", "--key", str(key), "--ca", str(tmp_path / "ca.pem")]
    r = check([*base, "--cert", str(cert)])
    assert r.status == 0, r.err
    assert "chain #1 CN=Issuing CA" in r.out
    wrong = tmp_path / "wrong-chain.pem"
    wrong.write_bytes(cf.pem(server.cert, cf.make_intermediate(ca, "Unrelated CA").cert))
    r = check([*base, "--cert", str(wrong)])
    assert r.status == 0
    assert any("did not issue CN=localhost" in w for w in r.warnings), r.err


def test_crl_coverage_warnings(files: Files, tmp_path: Path) -> None:
    """A CRL from an untrusted CA has no effect; a trusted CA without a CRL refuses its clients."""
    stranger = cf.make_ca("Stranger CA")
    crl = tmp_path / "stranger-crl.pem"
    crl.write_bytes(
        cf.make_crl(stranger, [], 30).public_bytes(serialization.Encoding.PEM)
    )
    r = check(files.args("--crl", str(crl)))
    assert r.status == 0
    assert any("not a client CA; it has no effect" in w for w in r.warnings), r.err
    assert any("no CRL from CA CN=Check CA" in w for w in r.warnings)


def test_crl_with_a_bad_signature(files: Files, tmp_path: Path) -> None:
    """A CRL naming a trusted CA as issuer but signed by another key is a problem."""
    impostor = cf.make_ca("Check CA")  # same name, different key
    crl = tmp_path / "forged-crl.pem"
    crl.write_bytes(cf.make_crl(impostor, [], 30).public_bytes(serialization.Encoding.PEM))
    r = check(files.args("--crl", str(crl)))
    assert r.status == 1
    assert any("signature does not verify" in e for e in r.errors), r.err


def test_keystore(files: Files, tmp_path: Path) -> None:
    """A PKCS#12 keystore with a password file is opened and reported like a PEM pair."""
    store = tmp_path / "server.p12"
    password = tmp_path / "server.pass"
    password.write_text("s3cret\n")
    store.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"server",
            files.server.key,
            files.server.cert,
            None,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    args = [
        "--backend", "http://127.0.0.1:1", "--keystore", str(store),
        "--keystore-password-file", str(password), "--ca", str(files.ca_file),
    ]
    r = check(args)
    assert r.status == 0, r.err
    assert f"server keystore {store}: OK, key matches certificate" in r.out
    password.write_text("wrong\n")
    r = check(args)
    assert r.status == 1 and "wrong keystore password" in r.errors[0]


def test_through_the_console_script(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    """`mtlsproxy check ...` reaches run_check with every argument untouched."""
    assert cli.main(["check", *files.args()]) == 0
    assert "configuration OK" in capsys.readouterr().out
    assert cli.main(["check", "--bogus"]) == 2


# -- the helpers the daemon uses ------------------------------------------------------


def test_expiries_list_everything_in_use(tmp_path: Path) -> None:
    """Server, chain, CA and CRL next-update times are all listed, with Unix timestamps."""
    ca = cf.make_ca("Root")
    inter = cf.make_intermediate(ca, "Issuing CA")
    cert, key = cf.make_server(inter).write(tmp_path, "server")
    (tmp_path / "ca.pem").write_bytes(cf.pem(ca.cert))
    crl = tmp_path / "crl.pem"
    crl.write_bytes(cf.make_crl(ca, [], 5).public_bytes(serialization.Encoding.PEM))
    config = build_config(
        {"backend": "http://127.0.0.1:1", "cert": str(cert), "key": str(key),
         "ca": str(tmp_path / "ca.pem"), "crl": [str(crl)]}
    )
    entries = expiries(load_material(config))
    assert [(e.kind, e.subject) for e in entries] == [
        ("server", "CN=localhost"),
        ("chain", "CN=Issuing CA"),
        ("ca", "CN=Root"),
        ("crl", "CN=Root"),
    ]
    assert entries[0].as_metric()[2] == entries[0].when.timestamp()


def test_warnings_for_boundaries() -> None:
    """Exactly 14 days is warned about, 15 is not; past dates say 'expired ... ago'."""
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    day = datetime.timedelta(days=1)
    entries = [
        Expiry("server", "CN=a", now + 14 * day),
        Expiry("ca", "CN=b", now + 15 * day),
        Expiry("chain", "CN=c", now - 2 * day),
        Expiry("server", "CN=d", now + datetime.timedelta(hours=3)),
    ]
    assert warnings_for(entries, now) == [
        "server certificate CN=a expires in 14 days (2030-01-15 00:00 UTC)",
        "chain certificate CN=c expired 2 days ago (2029-12-30 00:00 UTC)",
        "server certificate CN=d expires in less than a day (2030-01-01 03:00 UTC)",
    ]


def test_expiry_warnings_from_a_config(files: Files) -> None:
    """expiry_warnings reads the configured files and never raises for a file problem."""
    config = build_config(
        {"backend": "http://127.0.0.1:1", "cert": str(files.cert), "key": str(files.key),
         "ca": str(files.ca_file), "crl": [str(files.crl)]}
    )
    assert expiry_warnings(config) == []
    soon = expiry_warnings(config, now=cf.days_ahead(25))
    assert len(soon) == 2 and soon[0].startswith("server certificate CN=localhost expires in")
    files.key.unlink()
    assert expiry_warnings(config) == [
        f"cannot check certificate expiry: --key: {files.key}: no such file"
    ]
