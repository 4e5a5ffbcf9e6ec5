"""
``mtlsproxy pki``: one command makes a CA with server and client certificates
that OpenSSL and Java accept, revocation produces a CRL OpenSSL honours, and
every expected failure is one line on stderr.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, SignatureAlgorithmOID

from mtlsproxy import pki
from mtlsproxy.cli import main

from . import certfactory

OPENSSL = shutil.which("openssl")
KEYTOOL = shutil.which("keytool")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")
needs_keytool = pytest.mark.skipif(KEYTOOL is None, reason="keytool (Java) not installed")

PRIVATE_FILES = (
    "ca-key.pem",
    "server-key.pem",
    "client-key.pem",
    "server-keystore.pass",
    "server-truststore.pass",
    "client-keystore.pass",
    "client-truststore.pass",
)


def run(*args: str) -> tuple[int, str, str]:
    """Run the console script in-process; return (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    status = main(list(args), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def init(directory: Path, *extra: str) -> Path:
    status, _, err = run("pki", "init", str(directory), *extra)
    assert status == 0, err
    return directory


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, *args], capture_output=True, text=True, check=False)


def keytool_list(store: Path, password_file: Path) -> str:
    assert KEYTOOL is not None
    password = password_file.read_text().strip()
    result = subprocess.run(
        [KEYTOOL, "-list", "-keystore", str(store), "-storetype", "PKCS12", "-storepass", password],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PKI made once with --p12, for the tests that only read it."""
    return init(tmp_path_factory.mktemp("shared") / "pki", "--p12")


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    """A fresh PKI for tests that change it."""
    return init(tmp_path / "pki")


def extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


# --- pki init ------------------------------------------------------------------------------


@needs_openssl
def test_init_certificates_verify_for_their_purpose(shared: Path) -> None:
    """OpenSSL accepts the server certificate for sslserver and the client one for sslclient."""
    server = openssl(
        "verify", "-CAfile", str(shared / "ca-cert.pem"), "-purpose", "sslserver",
        str(shared / "server-cert.pem"),
    )  # fmt: skip
    assert server.returncode == 0, server.stdout + server.stderr
    client = openssl(
        "verify", "-CAfile", str(shared / "ca-cert.pem"), "-purpose", "sslclient",
        str(shared / "client-cert.pem"),
    )  # fmt: skip
    assert client.returncode == 0, client.stdout + client.stderr


@needs_openssl
def test_client_certificate_cannot_act_as_server(shared: Path) -> None:
    """A stolen client certificate is useless for impersonating a server: OpenSSL says so."""
    result = openssl(
        "verify", "-CAfile", str(shared / "ca-cert.pem"), "-purpose", "sslserver",
        str(shared / "client-cert.pem"),
    )  # fmt: skip
    assert result.returncode != 0


def test_server_certificate_names_localhost_and_loopback_addresses(shared: Path) -> None:
    """By default the server certificate is valid for localhost, 127.0.0.1 and ::1, as SANs."""
    import ipaddress

    cert = load_cert(shared / "server-cert.pem")
    san = extension(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = extension(cert, x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert extension(cert, x509.BasicConstraints).value.ca is False
    usage = extension(cert, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_encipherment  # EC keys cannot do RSA key exchange


def test_client_certificate_is_for_client_auth_only(shared: Path) -> None:
    """The client certificate has CN 'client' and clientAuth but not serverAuth."""
    cert = load_cert(shared / "client-cert.pem")
    assert cert.subject.rfc4514_string() == "CN=client"
    eku = extension(cert, x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert ExtendedKeyUsageOID.SERVER_AUTH not in eku


def test_certificate_profile(shared: Path) -> None:
    """
    The CA is a critical CA:TRUE with keyCertSign+cRLSign; every certificate
    is SHA-256 signed, has key identifiers linking it to the CA, and starts a
    few minutes in the past so a peer with a slow clock accepts it.
    """
    ca = load_cert(shared / "ca-cert.pem")
    constraints = extension(ca, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = extension(ca, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    ca_ski = extension(ca, x509.SubjectKeyIdentifier).value.digest
    now = datetime.datetime.now(datetime.UTC)
    assert ca.not_valid_after_utc - now > datetime.timedelta(days=3649)
    for name in ("ca", "server", "client"):
        cert = load_cert(shared / f"{name}-cert.pem")
        assert cert.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
        assert extension(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski
        assert extension(cert, x509.SubjectKeyIdentifier).value.digest
        assert now - cert.not_valid_before_utc >= datetime.timedelta(minutes=4)
        assert cert.issuer == ca.subject
    server = load_cert(shared / "server-cert.pem")
    assert server.not_valid_after_utc - now <= datetime.timedelta(days=398)
    # RFC 5280 counts both ends: exactly 398 days, not 398 days and the backdating
    period = server.not_valid_after_utc - server.not_valid_before_utc
    assert period + datetime.timedelta(seconds=1) == datetime.timedelta(days=398)
    assert server.serial_number != load_cert(shared / "client-cert.pem").serial_number


def test_keys_are_p256_by_default(shared: Path) -> None:
    """The default key type is EC P-256: instant to generate, unlike the seed's RSA 4096."""
    for name in ("ca", "server", "client"):
        key = serialization.load_pem_private_key((shared / f"{name}-key.pem").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"


def test_private_files_are_mode_0600_and_directory_0700(shared: Path) -> None:
    """Private keys, keystores and password files are readable by the owner only."""
    assert stat.S_IMODE(shared.stat().st_mode) == 0o700
    for name in (*PRIVATE_FILES, "server-keystore.p12", "client-keystore.p12"):
        assert stat.S_IMODE((shared / name).stat().st_mode) == 0o600, name
    for name in ("ca-cert.pem", "server-cert.pem", "client-cert.pem", "index.json"):
        assert stat.S_IMODE((shared / name).stat().st_mode) & 0o022 == 0, name


def test_init_refuses_to_overwrite_without_force(ca_dir: Path) -> None:
    """A second init fails, names an existing file and leaves every file as it was."""
    before = {p.name: p.read_bytes() for p in ca_dir.iterdir()}
    status, _, err = run("pki", "init", str(ca_dir))
    assert status == 1
    assert err.startswith("mtlsproxy: refusing to overwrite ")
    assert str(ca_dir / "ca-cert.pem") in err and "--force" in err
    assert err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in ca_dir.iterdir()} == before


def test_init_force_replaces_everything(ca_dir: Path) -> None:
    """With --force, init makes a new CA and new keys, still mode 0600."""
    old_ca = (ca_dir / "ca-cert.pem").read_bytes()
    old_key = (ca_dir / "server-key.pem").read_bytes()
    init(ca_dir, "--force")
    assert (ca_dir / "ca-cert.pem").read_bytes() != old_ca
    assert (ca_dir / "server-key.pem").read_bytes() != old_key
    assert stat.S_IMODE((ca_dir / "server-key.pem").stat().st_mode) == 0o600
    assert not [p for p in ca_dir.iterdir() if p.name.endswith(".tmp")]


def test_init_force_removes_the_old_crl_and_stores(tmp_path: Path) -> None:
    """
    The old CA's crl.pem and PKCS#12 files go with it when not rewritten: the
    new CA could not have signed that CRL, and the stores hold the old CA.
    """
    ca_dir = init(tmp_path / "pki", "--p12")
    run("pki", "issue", str(ca_dir), "--client", "bob")
    assert run("pki", "revoke", str(ca_dir), str(ca_dir / "bob-cert.pem"))[0] == 0
    status, out, _ = run("pki", "init", str(ca_dir), "--force")
    assert status == 0
    assert f"removed {ca_dir / 'crl.pem'}" in out
    assert not (ca_dir / "crl.pem").exists()
    assert not list(ca_dir.glob("server-*.p12")) and not list(ca_dir.glob("*.pass"))


def test_key_type_rsa2048(tmp_path: Path) -> None:
    """--key-type rsa2048 makes 2048-bit RSA keys; RSA server keys also get keyEncipherment."""
    directory = init(tmp_path / "pki", "--key-type", "rsa2048")
    for name in ("ca", "server", "client"):
        key = serialization.load_pem_private_key((directory / f"{name}-key.pem").read_bytes(), None)
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    server = load_cert(directory / "server-cert.pem")
    assert extension(server, x509.KeyUsage).value.key_encipherment


def test_server_and_client_names(tmp_path: Path) -> None:
    """--server-name makes DNS or IP SANs by the value, each once; --client-name sets the CN."""
    import ipaddress

    directory = init(
        tmp_path / "pki",
        "--server-name", "proxy.example.com",
        "--server-name", "10.1.2.3",
        "--server-name", "Proxy.Example.com",
        "--client-name", "alice",
    )  # fmt: skip
    server = load_cert(directory / "server-cert.pem")
    san = extension(server, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["proxy.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert server.subject.rfc4514_string() == "CN=proxy.example.com"
    client = load_cert(directory / "client-cert.pem")
    assert client.subject.rfc4514_string() == "CN=alice"


def test_bad_server_name_is_refused(tmp_path: Path) -> None:
    """A --server-name that is neither a DNS name nor an address is an error naming it."""
    status, _, err = run("pki", "init", str(tmp_path / "pki"), "--server-name", "bad name!")
    assert status == 1
    assert "'bad name!'" in err and "--server-name" in err
    assert not (tmp_path / "pki").exists()


def test_long_server_validity_warns(tmp_path: Path) -> None:
    """--days above 398 is allowed but prints a warning line: browsers refuse such certificates."""
    status, _, err = run("pki", "init", str(tmp_path / "pki"), "--days", "800")
    assert status == 0
    assert "mtlsproxy: warning: server certificate valid for 800 days" in err
    server = load_cert(tmp_path / "pki" / "server-cert.pem")
    assert server.not_valid_after_utc - server.not_valid_before_utc > datetime.timedelta(days=799)


def test_p12_files_open_with_their_passwords(shared: Path) -> None:
    """--p12 writes keystores (key, certificate, CA chain, friendly name) and CA truststores."""
    ca = load_cert(shared / "ca-cert.pem")
    for name in ("server", "client"):
        password = (shared / f"{name}-keystore.pass").read_bytes()
        assert password.endswith(b"\n") and len(password.strip()) >= 32
        store = pkcs12.load_pkcs12((shared / f"{name}-keystore.p12").read_bytes(), password.strip())
        assert store.key is not None and store.cert is not None
        assert store.cert.friendly_name == name.encode()
        assert store.cert.certificate == load_cert(shared / f"{name}-cert.pem")
        assert [c.certificate for c in store.additional_certs] == [ca]

        password = (shared / f"{name}-truststore.pass").read_bytes().strip()
        trust = pkcs12.load_pkcs12((shared / f"{name}-truststore.p12").read_bytes(), password)
        assert trust.key is None
        assert [c.certificate for c in trust.additional_certs] == [ca]
    passwords = {(shared / f).read_bytes() for f in PRIVATE_FILES if f.endswith(".pass")}
    assert len(passwords) == 4


@needs_keytool
def test_keytool_reads_truststore_as_trusted_certificate(shared: Path) -> None:
    """Java sees the truststore's CA as a trustedCertEntry, as `keytool -importcert` makes it."""
    for name in ("server", "client"):
        listing = keytool_list(
            shared / f"{name}-truststore.p12", shared / f"{name}-truststore.pass"
        )
        assert "trustedCertEntry" in listing


@needs_keytool
def test_keytool_reads_keystore_as_private_key_entry(shared: Path) -> None:
    """Java sees each keystore as one PrivateKeyEntry with the friendly name as its alias."""
    for name in ("server", "client"):
        listing = keytool_list(shared / f"{name}-keystore.p12", shared / f"{name}-keystore.pass")
        entries = [line for line in listing.splitlines() if "PrivateKeyEntry" in line]
        assert len(entries) == 1 and entries[0].startswith(f"{name},"), listing


def test_index_records_what_init_made(shared: Path) -> None:
    """index.json lists the CA, server and client with serial, subject, kind, file and expiry."""
    data = json.loads((shared / "index.json").read_text())
    entries = {e["kind"]: e for e in data["certificates"]}
    assert set(entries) == {"ca", "server", "client"}
    client = load_cert(shared / "client-cert.pem")
    assert int(entries["client"]["serial"], 16) == client.serial_number
    assert entries["client"]["subject"] == "CN=client"
    assert entries["client"]["file"] == "client-cert.pem"
    assert entries["client"]["revoked_at"] is None
    assert entries["client"]["not_after"] == client.not_valid_after_utc.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


# --- pki issue -----------------------------------------------------------------------------


@needs_openssl
def test_issue_client(ca_dir: Path) -> None:
    """issue --client bob writes bob-cert.pem (CN bob, clientAuth) that OpenSSL verifies."""
    status, out, _ = run("pki", "issue", str(ca_dir), "--client", "bob")
    assert status == 0 and "bob-cert.pem" in out
    assert stat.S_IMODE((ca_dir / "bob-key.pem").stat().st_mode) == 0o600
    assert load_cert(ca_dir / "bob-cert.pem").subject.rfc4514_string() == "CN=bob"
    result = openssl(
        "verify", "-CAfile", str(ca_dir / "ca-cert.pem"), "-purpose", "sslclient",
        str(ca_dir / "bob-cert.pem"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = [e.kind for e in pki.list_certificates(ca_dir)]
    assert kinds == ["ca", "server", "client", "client"]


@needs_openssl
def test_issue_server_with_extra_names(ca_dir: Path) -> None:
    """issue --server NAME makes NAME the first SAN; --server-name adds more."""
    status, _, err = run(
        "pki", "issue", str(ca_dir), "--server", "api.example.com",
        "--server-name", "192.0.2.7", "--p12",
    )  # fmt: skip
    assert status == 0, err
    cert = load_cert(ca_dir / "api.example.com-cert.pem")
    san = extension(cert, x509.SubjectAlternativeName).value
    assert [str(n.value) for n in san] == ["api.example.com", "192.0.2.7"]
    result = openssl(
        "verify", "-CAfile", str(ca_dir / "ca-cert.pem"), "-purpose", "sslserver",
        str(ca_dir / "api.example.com-cert.pem"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    password = (ca_dir / "api.example.com-keystore.pass").read_bytes().strip()
    store = pkcs12.load_pkcs12((ca_dir / "api.example.com-keystore.p12").read_bytes(), password)
    assert store.cert is not None and store.cert.friendly_name == b"api.example.com"


def test_issue_refuses_to_overwrite_without_force(ca_dir: Path) -> None:
    """Issuing the same name twice needs --force; the first certificate stays otherwise."""
    assert run("pki", "issue", str(ca_dir), "--client", "bob")[0] == 0
    first = (ca_dir / "bob-cert.pem").read_bytes()
    status, _, err = run("pki", "issue", str(ca_dir), "--client", "bob")
    assert status == 1 and str(ca_dir / "bob-cert.pem") in err
    assert (ca_dir / "bob-cert.pem").read_bytes() == first
    assert run("pki", "issue", str(ca_dir), "--client", "bob", "--force")[0] == 0
    assert (ca_dir / "bob-cert.pem").read_bytes() != first


def test_issue_without_ca_directory(tmp_path: Path) -> None:
    """Issuing from a directory that is not a CA says so and how to make one."""
    (tmp_path / "empty").mkdir()
    status, _, err = run("pki", "issue", str(tmp_path / "empty"), "--client", "bob")
    assert status == 1
    assert err == (
        f"mtlsproxy: {tmp_path / 'empty'}: not a CA directory, ca-cert.pem is missing "
        f"(create one with: mtlsproxy pki init {tmp_path / 'empty'})\n"
    )


def test_issue_with_a_foreign_ca_key(ca_dir: Path) -> None:
    """A ca-key.pem that does not belong to ca-cert.pem is refused before anything is signed."""
    other = certfactory.make_ca("Other CA")
    (ca_dir / "ca-key.pem").write_bytes(other.key_pem())
    status, _, err = run("pki", "issue", str(ca_dir), "--client", "bob")
    assert status == 1
    assert "ca-key.pem: does not match" in err and err.count("\n") == 1
    assert not (ca_dir / "bob-cert.pem").exists()


def test_issue_rejects_unsafe_names(ca_dir: Path) -> None:
    """NAME becomes a file name: path separators and the reserved 'ca' are refused."""
    for name in ("../evil", "ca", ".hidden"):
        status, _, err = run("pki", "issue", str(ca_dir), "--client", name)
        assert status == 1, name
        assert "--client" in err
    assert not (ca_dir.parent / "evil-cert.pem").exists()


def test_issue_server_by_ip_address_gets_safe_file_names(ca_dir: Path) -> None:
    """
    ``--server ::1`` is an IP SAN in files named with _ for : (a leading colon
    is no file name, and any colon breaks curl --cert FILE:PASSWORD); an IPv4
    address names its files as it is.
    """
    import ipaddress

    status, out, err = run("pki", "issue", str(ca_dir), "--server", "::1")
    assert status == 0, err
    assert f"wrote {ca_dir / '__1-cert.pem'}" in out
    cert = load_cert(ca_dir / "__1-cert.pem")
    san = extension(cert, x509.SubjectAlternativeName).value
    assert list(san) == [x509.IPAddress(ipaddress.ip_address("::1"))]
    assert [e.file for e in pki.list_certificates(ca_dir)][-1] == "__1-cert.pem"
    # The long form is the same address, so the same files.
    status, _, err = run("pki", "issue", str(ca_dir), "--server", "0:0:0:0:0:0:0:1")
    assert status == 1 and str(ca_dir / "__1-cert.pem") in err
    status, _, err = run("pki", "issue", str(ca_dir), "--server", "2001:db8::7", "--p12")
    assert status == 0, err
    assert (ca_dir / "2001_db8__7-keystore.p12").exists()
    status, _, err = run("pki", "issue", str(ca_dir), "--server", "192.0.2.7")
    assert status == 0, err
    assert (ca_dir / "192.0.2.7-cert.pem").exists()


def test_issue_server_name_unusable_as_file_name_says_why_and_how(ca_dir: Path) -> None:
    """A wildcard --server is refused naming the file-name rule and the --server-name way out."""
    status, _, err = run("pki", "issue", str(ca_dir), "--server", "*.example.com")
    assert status == 1
    assert err.startswith("mtlsproxy: --server: '*.example.com' cannot be used as a file name")
    assert "NAME-cert.pem" in err and "--server-name" in err and err.count("\n") == 1
    assert (
        run("pki", "issue", str(ca_dir), "--server", "web", "--server-name", "*.example.com")[0]
        == 0
    )


@pytest.mark.parametrize("name", ["1.2.3.999", "10.1", "010.1.2.3", "256.0.0.1", "1.2.3.4."])
def test_server_name_that_looks_like_a_bad_ipv4_address_is_refused(
    tmp_path: Path, name: str
) -> None:
    """
    All-numeric dotted names are not taken as DNS names: clients parse them as
    addresses (or fail to), so a DNS SAN for them never matches.  Refused from
    init --server-name, issue --server-name and issue --server alike.
    """
    status, _, err = run("pki", "init", str(tmp_path / "pki"), "--server-name", name)
    assert status == 1
    assert err == (
        f"mtlsproxy: --server-name: {name!r} looks like an IPv4 address but is not a valid one "
        "(four numbers 0-255 without leading zeros, like 192.0.2.7)\n"
    )
    assert not (tmp_path / "pki").exists()
    directory = init(tmp_path / "pki")
    status, _, err = run("pki", "issue", str(directory), "--server", name)
    assert status == 1 and err.startswith(f"mtlsproxy: --server: {name!r} looks like an IPv4")
    status, _, err = run("pki", "issue", str(directory), "--server", "ok", "--server-name", name)
    assert status == 1 and err.startswith(f"mtlsproxy: --server-name: {name!r} looks like")


def test_server_name_parsing() -> None:
    """Valid addresses and DNS names pass; an IPv6 zone index cannot be certified."""
    import ipaddress

    assert pki.parse_server_name("192.0.2.7") == x509.IPAddress(ipaddress.ip_address("192.0.2.7"))
    assert pki.parse_server_name("Host-1.Example.") == x509.DNSName("host-1.example")
    assert pki.parse_server_name("*.example.com") == x509.DNSName("*.example.com")
    assert pki.parse_server_name("db.123abc") == x509.DNSName("db.123abc")
    with pytest.raises(pki.PkiError, match=r"^--server: 'fe80::1%eth0' has a zone index"):
        pki.parse_server_name("fe80::1%eth0", "--server")


def test_issue_key_type_and_days(ca_dir: Path) -> None:
    """
    issue takes --key-type and --days: an rsa4096 server (the one 4096-bit
    key of the suite: it takes a while) with keyEncipherment, and an rsa2048
    client valid for exactly 7 days.
    """
    status, _, err = run(
        "pki", "issue", str(ca_dir), "--server", "big.example", "--key-type", "rsa4096",
        "--days", "30",
    )  # fmt: skip
    assert status == 0, err
    key = serialization.load_pem_private_key((ca_dir / "big.example-key.pem").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 4096
    server = load_cert(ca_dir / "big.example-cert.pem")
    assert extension(server, x509.KeyUsage).value.key_encipherment
    period = server.not_valid_after_utc - server.not_valid_before_utc
    assert period + datetime.timedelta(seconds=1) == datetime.timedelta(days=30)

    status, _, err = run(
        "pki", "issue", str(ca_dir), "--client", "dana", "--key-type", "rsa2048", "--days", "7"
    )
    assert status == 0, err
    key = serialization.load_pem_private_key((ca_dir / "dana-key.pem").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    client = load_cert(ca_dir / "dana-cert.pem")
    period = client.not_valid_after_utc - client.not_valid_before_utc
    assert period + datetime.timedelta(seconds=1) == datetime.timedelta(days=7)
    # The CA stays what it was (EC): only the new leaf keys are RSA.
    assert load_cert(ca_dir / "dana-cert.pem").signature_algorithm_oid == (
        SignatureAlgorithmOID.ECDSA_WITH_SHA256
    )


def test_issue_force_without_p12_removes_the_stale_keystore(ca_dir: Path) -> None:
    """
    ``issue --force`` without --p12 after an earlier ``issue --p12`` removes
    NAME-keystore.p12 and .pass: they held the replaced certificate and key,
    and would go on handing them out.
    """
    assert run("pki", "issue", str(ca_dir), "--client", "bob", "--p12")[0] == 0
    old = load_cert(ca_dir / "bob-cert.pem")
    status, out, err = run("pki", "issue", str(ca_dir), "--client", "bob", "--force")
    assert status == 0, err
    assert f"removed {ca_dir / 'bob-keystore.p12'} (it held the replaced certificate)" in out
    assert f"removed {ca_dir / 'bob-keystore.pass'}" in out
    assert not (ca_dir / "bob-keystore.p12").exists()
    assert not (ca_dir / "bob-keystore.pass").exists()
    assert load_cert(ca_dir / "bob-cert.pem").serial_number != old.serial_number
    # With --p12 the keystore is rewritten instead, holding the new certificate.
    status, out, err = run("pki", "issue", str(ca_dir), "--client", "bob", "--p12", "--force")
    assert status == 0, err
    assert "removed" not in out
    password = (ca_dir / "bob-keystore.pass").read_bytes().strip()
    store = pkcs12.load_pkcs12((ca_dir / "bob-keystore.p12").read_bytes(), password)
    assert store.cert is not None
    assert store.cert.certificate == load_cert(ca_dir / "bob-cert.pem")


def test_issue_refused_keeps_an_old_keystore(ca_dir: Path) -> None:
    """Without --force nothing is removed: the refused run leaves the keystore in place."""
    assert run("pki", "issue", str(ca_dir), "--client", "bob", "--p12")[0] == 0
    before = (ca_dir / "bob-keystore.p12").read_bytes()
    assert run("pki", "issue", str(ca_dir), "--client", "bob")[0] == 1
    assert (ca_dir / "bob-keystore.p12").read_bytes() == before


def test_issue_p12_adds_truststores_missing_from_a_ca_made_without_p12(ca_dir: Path) -> None:
    """
    After ``init`` without --p12, ``issue --client carol --p12`` also writes
    server- and client-truststore.p12 (with .pass, mode 0600) holding the CA.
    """
    assert not list(ca_dir.glob("*-truststore.*"))
    status, out, err = run("pki", "issue", str(ca_dir), "--client", "carol", "--p12")
    assert status == 0, err
    ca = load_cert(ca_dir / "ca-cert.pem")
    for side in ("server", "client"):
        assert f"wrote {ca_dir / f'{side}-truststore.p12'}" in out
        pass_file = ca_dir / f"{side}-truststore.pass"
        assert stat.S_IMODE(pass_file.stat().st_mode) == 0o600
        password = pass_file.read_bytes().strip()
        trust = pkcs12.load_pkcs12((ca_dir / f"{side}-truststore.p12").read_bytes(), password)
        assert trust.key is None
        assert [c.certificate for c in trust.additional_certs] == [ca]


def test_issue_p12_never_rewrites_a_complete_truststore(tmp_path: Path) -> None:
    """
    Truststores that ``init --p12`` made stay byte for byte, even with --force:
    a new password would break every client configured with the old one.
    """
    directory = init(tmp_path / "pki", "--p12")
    names = [f"{s}-truststore.{e}" for s in ("server", "client") for e in ("p12", "pass")]
    before = {n: (directory / n).read_bytes() for n in names}
    for extra in ((), ("--force",)):
        status, out, err = run("pki", "issue", str(directory), "--client", "carol", "--p12", *extra)
        assert status == 0, err
        assert "truststore" not in out
    assert {n: (directory / n).read_bytes() for n in names} == before


def test_issue_p12_refuses_half_a_truststore_pair_without_force(ca_dir: Path) -> None:
    """
    A truststore without its password file cannot be kept or silently
    replaced: refused with a line naming both files; --force writes both anew.
    """
    (ca_dir / "client-truststore.p12").write_bytes(b"not pkcs12")
    status, _, err = run("pki", "issue", str(ca_dir), "--client", "carol", "--p12")
    assert status == 1
    assert err.startswith(f"mtlsproxy: {ca_dir / 'client-truststore.p12'}: ")
    assert str(ca_dir / "client-truststore.pass") in err and "--force" in err
    assert err.count("\n") == 1
    assert not (ca_dir / "carol-cert.pem").exists()
    assert not (ca_dir / "server-truststore.p12").exists()
    status, _, err = run("pki", "issue", str(ca_dir), "--client", "carol", "--p12", "--force")
    assert status == 0, err
    password = (ca_dir / "client-truststore.pass").read_bytes().strip()
    trust = pkcs12.load_pkcs12((ca_dir / "client-truststore.p12").read_bytes(), password)
    assert [c.certificate for c in trust.additional_certs] == [load_cert(ca_dir / "ca-cert.pem")]


@needs_keytool
def test_keytool_reads_the_stores_issue_p12_writes(ca_dir: Path) -> None:
    """
    keytool lists the keystore of ``issue --client carol --p12`` as one
    PrivateKeyEntry aliased carol, and the truststores it added as trustedCertEntry.
    """
    status, _, err = run("pki", "issue", str(ca_dir), "--client", "carol", "--p12")
    assert status == 0, err
    listing = keytool_list(ca_dir / "carol-keystore.p12", ca_dir / "carol-keystore.pass")
    entries = [line for line in listing.splitlines() if "PrivateKeyEntry" in line]
    assert len(entries) == 1 and entries[0].startswith("carol,"), listing
    for side in ("server", "client"):
        listing = keytool_list(
            ca_dir / f"{side}-truststore.p12", ca_dir / f"{side}-truststore.pass"
        )
        assert "trustedCertEntry" in listing, listing


def test_modes_are_set_at_creation_even_with_umask_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    With umask 0 nothing masks a sloppy mode: every private file (keys,
    keystores, .pass) is created 0600 by open() itself, never chmod-ed
    afterwards, and public files are exactly 0644, the directory 0700.
    """
    created: dict[str, int] = {}
    real_open = os.open

    def recording_open(path: Any, flags: int, mode: int = 0o777, *args: Any, **kw: Any) -> int:
        if flags & os.O_CREAT:
            created[os.path.basename(os.fsdecode(path))] = mode
        return real_open(path, flags, mode, *args, **kw)

    def no_chmod(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"mode changed after creation: {args}")

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    directory = tmp_path / "pki"
    previous = os.umask(0)
    try:
        init(directory, "--p12")
        assert run("pki", "issue", str(directory), "--client", "carol", "--p12")[0] == 0
        assert run("pki", "issue", str(directory), "--client", "carol", "--p12", "--force")[0] == 0
        assert run("pki", "revoke", str(directory), str(directory / "carol-cert.pem"))[0] == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    private = {*PRIVATE_FILES, "server-keystore.p12", "client-keystore.p12"}
    private |= {"carol-key.pem", "carol-keystore.p12", "carol-keystore.pass"}
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
    assert private <= set(files)
    for name, mode in files.items():
        assert mode == (0o600 if name in private else 0o644), f"{name}: {mode:o}"
    for name in private:
        assert created[name] == 0o600, name
    # --force wrote through temporary files: those too were created 0600.
    assert {m for n, m in created.items() if n.startswith(".carol-key.pem.")} == {0o600}


# --- pki revoke and list -------------------------------------------------------------------


@needs_openssl
def test_revoke_writes_a_crl_openssl_honours(ca_dir: Path) -> None:
    """
    revoke signs crl.pem with the CA (OpenSSL verifies it) and OpenSSL then
    reports the revoked certificate as revoked, while others stay valid.
    """
    run("pki", "issue", str(ca_dir), "--client", "bob")
    status, out, err = run("pki", "revoke", str(ca_dir), str(ca_dir / "bob-cert.pem"))
    assert status == 0, err
    assert "revoked CN=bob" in out
    crl_path = ca_dir / "crl.pem"
    check = openssl("crl", "-in", str(crl_path), "-CAfile", str(ca_dir / "ca-cert.pem"), "-noout")
    assert check.returncode == 0 and "verify OK" in check.stderr + check.stdout
    revoked = openssl(
        "verify", "-crl_check", "-CRLfile", str(crl_path), "-CAfile", str(ca_dir / "ca-cert.pem"),
        str(ca_dir / "bob-cert.pem"),
    )  # fmt: skip
    assert revoked.returncode != 0
    assert "certificate revoked" in revoked.stdout + revoked.stderr
    fine = openssl(
        "verify", "-crl_check", "-CRLfile", str(crl_path), "-CAfile", str(ca_dir / "ca-cert.pem"),
        str(ca_dir / "client-cert.pem"),
    )  # fmt: skip
    assert fine.returncode == 0, fine.stdout + fine.stderr


def test_crl_contents(ca_dir: Path) -> None:
    """
    The CRL has lastUpdate now, nextUpdate after --crl-days, an authority key
    identifier, and a CRL number that grows; earlier revocations stay listed.
    """
    run("pki", "issue", str(ca_dir), "--client", "bob")
    run("pki", "issue", str(ca_dir), "--client", "carol")
    ca = load_cert(ca_dir / "ca-cert.pem")
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    assert run("pki", "revoke", str(ca_dir), str(ca_dir / "bob-cert.pem"))[0] == 0
    first = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert extension_number(first) == 1
    status, _, err = run(
        "pki", "revoke", str(ca_dir), str(ca_dir / "carol-cert.pem"), "--crl-days", "7"
    )
    assert status == 0, err
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert extension_number(crl) == 2
    after = datetime.datetime.now(datetime.UTC)
    assert before <= crl.last_update_utc <= after
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == datetime.timedelta(days=7)
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == extension(ca, x509.SubjectKeyIdentifier).value.digest
    revoked = {r.serial_number for r in crl}
    assert revoked == {
        load_cert(ca_dir / "bob-cert.pem").serial_number,
        load_cert(ca_dir / "carol-cert.pem").serial_number,
    }


def extension_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_revoke_refuses_a_certificate_from_another_ca(ca_dir: Path, tmp_path: Path) -> None:
    """A certificate this CA did not issue cannot be revoked here: one clear line, no CRL."""
    stranger = certfactory.make_client(certfactory.make_ca("Elsewhere CA"), "mallory")
    cert_path, _ = stranger.write(tmp_path, "mallory")
    status, _, err = run("pki", "revoke", str(ca_dir), str(cert_path))
    assert status == 1
    assert err.startswith(f"mtlsproxy: {cert_path}: not issued by this CA")
    assert "CN=Elsewhere CA" in err and err.count("\n") == 1
    assert not (ca_dir / "crl.pem").exists()


def test_revoke_by_serial_and_list_shows_status(ca_dir: Path) -> None:
    """
    After ``issue --force`` replaced bob's file, the old certificate is revoked
    by serial; ``list`` shows it revoked and everything else valid.
    """
    run("pki", "issue", str(ca_dir), "--client", "bob")
    old = load_cert(ca_dir / "bob-cert.pem")
    run("pki", "issue", str(ca_dir), "--client", "bob", "--force")
    status, _, err = run("pki", "revoke", str(ca_dir), "--serial", f"{old.serial_number:x}")
    assert status == 0, err
    status, out, _ = run("pki", "list", str(ca_dir))
    assert status == 0
    header, *rows = out.splitlines()
    assert header.split() == ["SERIAL", "KIND", "STATUS", "EXPIRES", "FILE", "SUBJECT"]
    by_serial = {row.split()[0]: row.split(maxsplit=5) for row in rows}
    assert by_serial[pki.serial_hex(old.serial_number)][2] == "revoked"
    new = load_cert(ca_dir / "bob-cert.pem")
    assert by_serial[pki.serial_hex(new.serial_number)][2] == "valid"
    assert [r[1] for r in by_serial.values()] == ["ca", "server", "client", "client", "client"]
    assert sorted(r[2] for r in by_serial.values()) == ["revoked"] + ["valid"] * 4
    subjects = [r[5] for r in by_serial.values()][1:]
    assert subjects == ["CN=localhost", "CN=client", "CN=bob", "CN=bob"]
    entries = json.loads(run("pki", "list", str(ca_dir), "--json")[1])
    assert [e["status"] for e in entries if e["revoked_at"]] == ["revoked"]


def test_revoke_twice_refreshes_the_crl(ca_dir: Path) -> None:
    """Revoking again keeps the original date and only re-signs the CRL with the next number."""
    run("pki", "issue", str(ca_dir), "--client", "bob")
    run("pki", "revoke", str(ca_dir), str(ca_dir / "bob-cert.pem"))
    first = pki.list_certificates(ca_dir)[-1].revoked_at
    status, out, _ = run("pki", "revoke", str(ca_dir), str(ca_dir / "bob-cert.pem"))
    assert status == 0 and "already revoked" in out
    assert pki.list_certificates(ca_dir)[-1].revoked_at == first
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert extension_number(crl) == 2 and len(list(crl)) == 1


@needs_openssl
def test_crl_refresh_writes_an_empty_crl_first(ca_dir: Path) -> None:
    """
    ``pki crl`` writes a first, empty CRL (so the proxy can start with --crl
    before anything is revoked) that OpenSSL accepts, and re-signs it later
    with the next number.
    """
    status, out, err = run("pki", "crl", str(ca_dir))
    assert status == 0, err
    assert "0 revoked" in out
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert list(crl) == [] and extension_number(crl) == 1
    fine = openssl(
        "verify", "-crl_check", "-CRLfile", str(ca_dir / "crl.pem"),
        "-CAfile", str(ca_dir / "ca-cert.pem"), str(ca_dir / "client-cert.pem"),
    )  # fmt: skip
    assert fine.returncode == 0, fine.stdout + fine.stderr
    run("pki", "issue", str(ca_dir), "--client", "bob")
    run("pki", "revoke", str(ca_dir), str(ca_dir / "bob-cert.pem"))
    status, out, _ = run("pki", "crl", str(ca_dir), "--crl-days", "2")
    assert status == 0 and "1 revoked" in out
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert extension_number(crl) == 3 and len(list(crl)) == 1
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == datetime.timedelta(days=2)


def test_list_without_index_shows_the_ca(tmp_path: Path) -> None:
    """A CA made by hand (no index.json) still lists its own certificate."""
    ca = certfactory.make_ca("Hand-made CA")
    directory = tmp_path / "pki"
    directory.mkdir()
    (directory / "ca-cert.pem").write_bytes(ca.cert_pem())
    (directory / "ca-key.pem").write_bytes(ca.key_pem())
    status, out, _ = run("pki", "list", str(directory))
    assert status == 0 and "CN=Hand-made CA" in out
    assert run("pki", "issue", str(directory), "--client", "bob")[0] == 0
    assert [e.kind for e in pki.list_certificates(directory)] == ["ca", "client"]


# --- the command line ----------------------------------------------------------------------


def test_missing_ca_directory_is_one_line_without_traceback(tmp_path: Path) -> None:
    """Run as a real process, a missing CA directory gives exit 1 and one stderr line."""
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [sys.executable, "-m", "mtlsproxy.cli", "pki", "issue", str(missing), "--client", "x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"mtlsproxy: {missing}: no such CA directory "
        f"(create one with: mtlsproxy pki init {missing})\n"
    )


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Command lines argparse cannot parse exit 2, as argparse does, without a traceback."""
    assert main(["pki"]) == 2
    assert main(["pki", "init", str(tmp_path), "--key-type", "dsa"]) == 2
    assert main(["pki", "init", str(tmp_path), "--days", "0"]) == 2
    assert main(["pki", "issue", str(tmp_path), "--client", "a", "--server", "b"]) == 2
    assert main(["pki", "issue", str(tmp_path), "--client", "a", "--server-name", "x"]) == 2
    assert main(["pki", "revoke", str(tmp_path)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["--help"]) == 0


@pytest.fixture
def fake_check(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    calls: list[list[str]] = []
    """A stand-in mtlsproxy.check recording the argv run_check gets, returning 3."""
    module = types.ModuleType("mtlsproxy.check")

    def run_check(argv: list[str]) -> int:
        calls.append(argv)
        return 3

    module.run_check = run_check  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mtlsproxy.check", module)
    yield calls


def test_check_passes_every_argument_through(fake_check: list[list[str]]) -> None:
    """``check`` hands every further argument, options too, to run_check; returns its status."""
    assert main(["check", "--config", "proxy.toml", "--help", "x"]) == 3
    assert main(["check"]) == 3
    assert fake_check == [["--config", "proxy.toml", "--help", "x"], []]


def test_no_temporary_files_left_behind(shared: Path) -> None:
    """Atomic writes (temp file + rename) leave no temporary files in the CA directory."""
    assert not [p for p in os.listdir(shared) if p.startswith(".")]
