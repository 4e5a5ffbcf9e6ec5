"""
Tests for L{mtlsproxy.certs}: every file the operator names either loads into
cryptography objects or fails with a L{CertificateLoadError} naming the
option, the file and the problem in plain words.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from mtlsproxy.certs import load_client_cas, load_crls, load_server_identity
from mtlsproxy.config import Backend, Config
from mtlsproxy.errors import CertificateLoadError
from tests.certfactory import (
    Issued,
    days_ago,
    days_ahead,
    make_ca,
    make_client,
    make_crl,
    make_intermediate,
    make_server,
    new_key,
    pem,
)

PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER


def config(**options: object) -> Config:
    """A configuration with only the certificate options under test set."""
    return Config(backend=Backend("http://127.0.0.1:8080", "127.0.0.1", 8080), **options)  # type: ignore[arg-type]


def keystore_bytes(
    issued: Issued, password: bytes | None, extra: list[x509.Certificate] | None = None
) -> bytes:
    """A PKCS#12 keystore holding C{issued}'s key, certificate and chain."""
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    cas = list(issued.chain) if extra is None else extra
    return pkcs12.serialize_key_and_certificates(
        b"server", issued.key, issued.cert, cas or None, encryption
    )


def load_error(call: object, *args: object) -> CertificateLoadError:
    """Run C{call(*args)}, which must fail with L{CertificateLoadError}; return it."""
    with pytest.raises(CertificateLoadError) as info:
        call(*args)  # type: ignore[operator]
    return info.value


def ca_without_basic_constraints() -> Issued:
    """An old-style self-signed root with no basicConstraints at all."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Old Root")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(days_ago(1))
        .not_valid_after(days_ahead(30))
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


@pytest.fixture(scope="module")
def pki() -> dict[str, Issued]:
    """One CA hierarchy for the whole module: root, intermediate, server leaf."""
    root = make_ca("Root CA")
    intermediate = make_intermediate(root, "Issuing CA")
    return {"root": root, "intermediate": intermediate, "server": make_server(intermediate)}


# --- server identity from PEM ------------------------------------------------


def test_pem_identity_with_chain(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A cert file holding leaf then intermediate gives the leaf and a chain."""
    cert, key = pki["server"].write(tmp_path, "server")
    identity = load_server_identity(config(cert=cert, key=key))
    assert identity.cert == pki["server"].cert
    assert identity.chain == (pki["intermediate"].cert,)
    assert identity.key.public_key() == pki["server"].key.public_key()


@pytest.mark.parametrize(
    ("key_type", "key_format", "marker"),
    [
        ("ec", serialization.PrivateFormat.PKCS8, b"BEGIN PRIVATE KEY"),
        ("ec", serialization.PrivateFormat.TraditionalOpenSSL, b"BEGIN EC PRIVATE KEY"),
        ("rsa2048", serialization.PrivateFormat.TraditionalOpenSSL, b"BEGIN RSA PRIVATE KEY"),
    ],
)
def test_pem_key_formats(
    tmp_path: Path,
    pki: dict[str, Issued],
    key_type: str,
    key_format: serialization.PrivateFormat,
    marker: bytes,
) -> None:
    """PKCS#8 and traditional RSA/EC PEM keys all load."""
    server = make_server(pki["root"], key_type=key_type)
    cert, key = server.write(tmp_path, "server")
    key_bytes = server.key.private_bytes(PEM, key_format, serialization.NoEncryption())
    assert marker in key_bytes
    key.write_bytes(key_bytes)
    identity = load_server_identity(config(cert=cert, key=key))
    assert identity.cert == server.cert
    assert identity.chain == ()


def test_combined_pem_file(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """One file holding key, leaf and chain may be given as both --cert and --key."""
    both = tmp_path / "both.pem"
    both.write_bytes(pki["server"].key_pem() + pki["server"].cert_pem())
    identity = load_server_identity(config(cert=both, key=both))
    assert identity.cert == pki["server"].cert
    assert identity.chain == (pki["intermediate"].cert,)


@pytest.mark.parametrize(
    "key_format",
    [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL],
)
def test_encrypted_pem_key(
    tmp_path: Path, pki: dict[str, Issued], key_format: serialization.PrivateFormat
) -> None:
    """An encrypted PEM key is refused with advice to decrypt it or use a keystore."""
    cert, key = pki["server"].write(tmp_path, "server")
    key.write_bytes(
        pki["server"].key.private_bytes(
            PEM, key_format, serialization.BestAvailableEncryption(b"secret")
        )
    )
    error = load_error(load_server_identity, config(cert=cert, key=key))
    assert error.option == "--key"
    assert error.path == str(key)
    assert "encrypted private keys are not supported" in error.problem
    assert "--keystore" in error.problem


def test_key_mismatch(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A key that is not the certificate's is refused, naming --key."""
    cert, _ = pki["server"].write(tmp_path, "server")
    _, other_key = make_server(pki["root"]).write(tmp_path, "other")
    error = load_error(load_server_identity, config(cert=cert, key=other_key))
    assert error.option == "--key"
    assert "private key does not match certificate" in error.problem
    assert str(cert) in error.problem


def test_missing_cert_file(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A --cert file that does not exist says 'no such file'."""
    _, key = pki["server"].write(tmp_path, "server")
    missing = tmp_path / "nope.pem"
    error = load_error(load_server_identity, config(cert=missing, key=key))
    assert (error.option, error.path) == ("--cert", str(missing))
    assert error.problem.endswith("no such file")
    assert str(error) == f"--cert: {missing}: no such file"


def test_missing_key_file(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A --key file that does not exist says 'no such file', naming --key."""
    cert, _ = pki["server"].write(tmp_path, "server")
    error = load_error(load_server_identity, config(cert=cert, key=tmp_path / "nope.pem"))
    assert error.option == "--key"
    assert "no such file" in error.problem


def test_unreadable_key(
    tmp_path: Path, pki: dict[str, Issued], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key file the proxy may not read says 'permission denied'."""
    cert, key = pki["server"].write(tmp_path, "server")
    real_read = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        # Simulated: the tests may run as root, who can read a mode-0 file.
        if path == key:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    error = load_error(load_server_identity, config(cert=cert, key=key))
    assert (error.option, error.problem) == ("--key", f"{key}: permission denied")


def test_directory_instead_of_file(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A directory given as --cert is reported as such."""
    _, key = pki["server"].write(tmp_path, "server")
    error = load_error(load_server_identity, config(cert=tmp_path, key=key))
    assert "is a directory" in error.problem


def test_cert_not_pem(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A --cert file that is not PEM says 'not a PEM certificate'."""
    _, key = pki["server"].write(tmp_path, "server")
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"this is not a certificate\n")
    error = load_error(load_server_identity, config(cert=junk, key=key))
    assert error.option == "--cert"
    assert error.problem.endswith("not a PEM certificate")


def test_cert_is_der(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A DER certificate is refused with the command that converts it."""
    _, key = pki["server"].write(tmp_path, "server")
    der = tmp_path / "server.der"
    der.write_bytes(pki["server"].cert.public_bytes(DER))
    error = load_error(load_server_identity, config(cert=der, key=key))
    assert "not a PEM certificate (it is DER" in error.problem
    assert "openssl x509 -inform DER" in error.problem


def test_cert_file_holds_only_a_key(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A PEM --cert file without a CERTIFICATE block says it holds no certificate."""
    _, key = pki["server"].write(tmp_path, "server")
    error = load_error(load_server_identity, config(cert=key, key=key))
    assert error.option == "--cert"
    assert error.problem.endswith("holds no certificate")


def test_malformed_pem_certificate(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A damaged CERTIFICATE block is reported with its position in the file."""
    _, key = pki["server"].write(tmp_path, "server")
    bad = tmp_path / "bad.pem"
    bad.write_bytes(
        pki["server"].cert_pem(with_chain=False)
        + b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    error = load_error(load_server_identity, config(cert=bad, key=key))
    assert "certificate #2 is not a valid PEM certificate" in error.problem


def test_key_not_pem(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A --key file that holds no PEM private key says so."""
    cert, _ = pki["server"].write(tmp_path, "server")
    error = load_error(load_server_identity, config(cert=cert, key=cert))
    assert error.option == "--key"
    assert error.problem.endswith("not a PEM private key")


# --- server identity from a PKCS#12 keystore ------------------------------------


def test_keystore(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A password-protected PKCS#12 keystore gives key, leaf and ordered chain."""
    store = tmp_path / "server.p12"
    # Root first, intermediate second: the loader must put the issuer first.
    store.write_bytes(
        keystore_bytes(pki["server"], b"s3cret", [pki["root"].cert, pki["intermediate"].cert])
    )
    identity = load_server_identity(config(keystore=store, keystore_password=b"s3cret"))
    assert identity.cert == pki["server"].cert
    assert identity.chain == (pki["intermediate"].cert, pki["root"].cert)


def test_keystore_without_password(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """An unprotected keystore loads when no password is configured."""
    store = tmp_path / "server.p12"
    store.write_bytes(keystore_bytes(pki["server"], None))
    identity = load_server_identity(config(keystore=store))
    assert identity.cert == pki["server"].cert


def test_keystore_wrong_password(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A wrong keystore password is reported in words, naming --keystore."""
    store = tmp_path / "server.p12"
    store.write_bytes(keystore_bytes(pki["server"], b"right"))
    error = load_error(load_server_identity, config(keystore=store, keystore_password=b"wrong"))
    assert error.option == "--keystore"
    assert error.problem.endswith("wrong keystore password or not a PKCS#12 file")


def test_keystore_password_missing(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A protected keystore with no password configured says no password was given."""
    store = tmp_path / "server.p12"
    store.write_bytes(keystore_bytes(pki["server"], b"right"))
    error = load_error(load_server_identity, config(keystore=store))
    assert "wrong keystore password or not a PKCS#12 file" in error.problem
    assert "no password was given" in error.problem


def test_keystore_not_pkcs12(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A PEM file given as --keystore is not mistaken for a keystore."""
    cert, _ = pki["server"].write(tmp_path, "server")
    error = load_error(load_server_identity, config(keystore=cert, keystore_password=b"x"))
    assert "not a PKCS#12 file" in error.problem


def test_keystore_without_key(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A truststore given as --keystore is refused: it holds no private key."""
    store = tmp_path / "trust.p12"
    store.write_bytes(
        pkcs12.serialize_java_truststore(
            [pkcs12.PKCS12Certificate(pki["root"].cert, b"root")],
            serialization.BestAvailableEncryption(b"changeit"),
        )
    )
    error = load_error(load_server_identity, config(keystore=store, keystore_password=b"changeit"))
    assert error.problem.endswith("holds no private key")


def test_keystore_key_without_certificate(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A keystore whose key has no certificate of its own is refused."""
    store = tmp_path / "server.p12"
    store.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"x", pki["server"].key, None, [pki["root"].cert], serialization.NoEncryption()
        )
    )
    error = load_error(load_server_identity, config(keystore=store))
    assert error.option == "--keystore"
    assert error.problem.endswith("holds no certificate for its private key")


def test_unusable_key_type(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A key type TLS cannot sign with (X25519) is refused by name."""
    from cryptography.hazmat.primitives.asymmetric import x25519

    cert, _ = pki["server"].write(tmp_path, "server")
    key = tmp_path / "x25519.pem"
    key.write_bytes(
        x25519.X25519PrivateKey.generate().private_bytes(
            PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    error = load_error(load_server_identity, config(cert=cert, key=key))
    assert "cannot be used for a TLS server" in error.problem


# --- client CAs ------------------------------------------------------------------


def test_ca_bundle(tmp_path: Path) -> None:
    """A PEM bundle gives every CA certificate in it, in order."""
    one, two = make_ca("One"), make_ca("Two")
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(pem(one.cert, two.cert))
    assert load_client_cas(config(ca=bundle)) == (one.cert, two.cert)


@pytest.mark.parametrize("content", [b"", b"\n  \n", b"-----BEGIN PRIVATE KEY-----\n"])
def test_ca_file_without_certificate(tmp_path: Path, content: bytes) -> None:
    """
    A CA file holding no certificate is an error, never "trust everyone"
    (Traefik CVE-2022-46153).
    """
    empty = tmp_path / "ca.pem"
    empty.write_bytes(content)
    error = load_error(load_client_cas, config(ca=empty))
    assert error.option == "--ca"
    assert error.problem.endswith("holds no certificate; refusing to trust everyone")


def test_ca_file_holding_only_a_key(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A key file given as --ca is refused as holding no certificate."""
    _, key = pki["server"].write(tmp_path, "server")
    error = load_error(load_client_cas, config(ca=key))
    assert "holds no certificate; refusing to trust everyone" in error.problem


def test_ca_file_not_pem(tmp_path: Path) -> None:
    """Garbage given as --ca says 'not a PEM certificate'."""
    junk = tmp_path / "ca.pem"
    junk.write_bytes(b"\x00\x01garbage")
    error = load_error(load_client_cas, config(ca=junk))
    assert error.problem.endswith("not a PEM certificate")


def test_ca_missing(tmp_path: Path) -> None:
    """A missing --ca file says 'no such file'."""
    error = load_error(load_client_cas, config(ca=tmp_path / "ca.pem"))
    assert (error.option, error.problem) == ("--ca", f"{tmp_path / 'ca.pem'}: no such file")


def test_ca_file_with_leaf_certificate(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A certificate marked CA:FALSE (a client's own) is refused as a trust anchor."""
    client = make_client(pki["root"], "alice")
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(pem(pki["root"].cert, client.cert))
    error = load_error(load_client_cas, config(ca=bundle))
    assert "CN=alice is not a CA certificate" in error.problem


def test_ca_without_basic_constraints(tmp_path: Path) -> None:
    """A root without basicConstraints (old roots) is accepted."""
    old = ca_without_basic_constraints()
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(pem(old.cert))
    assert load_client_cas(config(ca=bundle)) == (old.cert,)


def test_java_truststore(tmp_path: Path) -> None:
    """A Java-style PKCS#12 truststore (certificates only) gives its CAs."""
    one, two = make_ca("One"), make_ca("Two")
    store = tmp_path / "trust.p12"
    store.write_bytes(
        pkcs12.serialize_java_truststore(
            [
                pkcs12.PKCS12Certificate(one.cert, b"one"),
                pkcs12.PKCS12Certificate(two.cert, b"two"),
            ],
            serialization.BestAvailableEncryption(b"changeit"),
        )
    )
    cas = load_client_cas(config(truststore=store, truststore_password=b"changeit"))
    assert set(cas) == {one.cert, two.cert}


def test_truststore_from_plain_pkcs12(tmp_path: Path) -> None:
    """A certificates-only PKCS#12 without Java's trust attribute gives its CAs."""
    ca = make_ca("Plain")
    store = tmp_path / "trust.p12"
    store.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"trust", None, None, [ca.cert], serialization.NoEncryption()
        )
    )
    assert load_client_cas(config(truststore=store)) == (ca.cert,)


def test_truststore_cert_in_main_slot(tmp_path: Path) -> None:
    """A PKCS#12 whose CA sits in the key-certificate slot is accepted too."""
    ca = make_ca("Main Slot")
    store = tmp_path / "trust.p12"
    store.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"ca", ca.key, ca.cert, None, serialization.BestAvailableEncryption(b"pw")
        )
    )
    assert load_client_cas(config(truststore=store, truststore_password=b"pw")) == (ca.cert,)


def test_truststore_wrong_password(tmp_path: Path) -> None:
    """A wrong truststore password names --truststore and says so."""
    store = tmp_path / "trust.p12"
    store.write_bytes(
        pkcs12.serialize_java_truststore(
            [pkcs12.PKCS12Certificate(make_ca().cert, b"ca")],
            serialization.BestAvailableEncryption(b"changeit"),
        )
    )
    error = load_error(load_client_cas, config(truststore=store, truststore_password=b"nope"))
    assert error.option == "--truststore"
    assert error.problem.endswith("wrong truststore password or not a PKCS#12 file")


def test_truststore_without_certificate(tmp_path: Path) -> None:
    """A PKCS#12 holding only a key is no truststore: it holds no certificate."""
    store = tmp_path / "trust.p12"
    store.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"k", new_key(), None, None, serialization.NoEncryption()
        )
    )
    error = load_error(load_client_cas, config(truststore=store))
    assert error.problem.endswith("holds no certificate; refusing to trust everyone")


@pytest.mark.skipif(shutil.which("keytool") is None, reason="keytool not installed")
def test_keytool_truststore(tmp_path: Path) -> None:
    """A truststore written by the real 'keytool -importcert -storetype PKCS12' loads."""
    ca = make_ca("Keytool CA")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(pem(ca.cert))
    store = tmp_path / "trust.p12"
    subprocess.run(
        [
            "keytool", "-importcert", "-noprompt", "-storetype", "PKCS12",
            "-keystore", str(store), "-storepass", "changeit",
            "-alias", "clients", "-file", str(ca_file),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    assert load_client_cas(config(truststore=store, truststore_password=b"changeit")) == (ca.cert,)
    error = load_error(load_client_cas, config(truststore=store))
    assert "no password was given for --truststore" in error.problem


# --- CRLs ------------------------------------------------------------------------


def test_crls_pem_and_der(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """PEM files (several CRLs each) and DER files all load, in order."""
    root_crl = make_crl(pki["root"], [])
    issuing_crl = make_crl(pki["intermediate"], [pki["server"].cert])
    both = tmp_path / "both.pem"
    both.write_bytes(root_crl.public_bytes(PEM) + issuing_crl.public_bytes(PEM))
    der = tmp_path / "one.crl"
    der.write_bytes(issuing_crl.public_bytes(DER))
    assert load_crls([both, der]) == (root_crl, issuing_crl, issuing_crl)
    assert load_crls([]) == ()


def test_crl_missing(tmp_path: Path) -> None:
    """A missing CRL file names --crl and says 'no such file'."""
    error = load_error(load_crls, [tmp_path / "gone.crl"])
    assert error.option == "--crl"
    assert error.problem.endswith("no such file")


def test_crl_garbage(tmp_path: Path) -> None:
    """A file that is neither PEM nor DER CRL says so."""
    junk = tmp_path / "junk.crl"
    junk.write_bytes(b"\x30\x03junk")
    error = load_error(load_crls, [junk])
    assert "not a PEM or DER certificate revocation list" in error.problem


def test_crl_file_holds_certificate(tmp_path: Path, pki: dict[str, Issued]) -> None:
    """A certificate given as --crl is named for what it is."""
    cert, _ = pki["server"].write(tmp_path, "server")
    error = load_error(load_crls, [cert])
    assert error.problem.endswith("holds no CRL (found CERTIFICATE)")


def test_crl_empty(tmp_path: Path) -> None:
    """An empty CRL file is an error rather than 'nothing revoked'."""
    empty = tmp_path / "empty.crl"
    empty.write_bytes(b"")
    error = load_error(load_crls, [empty])
    assert "holds no CRL" in error.problem
