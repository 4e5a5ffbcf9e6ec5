"""
Certificates made on the spot for the tests, with cryptography's builders.

No private key is ever committed: every test run makes its own CA, server and
client certificates, including the hostile ones (expired, wrong purpose,
unknown CA, odd subject strings).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_NOW = datetime.datetime.now(datetime.UTC)


def new_key(kind: str = "ec") -> PrivateKey:
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=int(kind.removeprefix("rsa")))


@dataclass
class Issued:
    """A certificate with its key and the chain above it (issuer first, root excluded)."""

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    def cert_pem(self, with_chain: bool = True) -> bytes:
        certs = (self.cert, *self.chain) if with_chain else (self.cert,)
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write C{name}-cert.pem (with chain) and C{name}-key.pem; return both paths."""
        cert_path = directory / f"{name}-cert.pem"
        key_path = directory / f"{name}-key.pem"
        cert_path.write_bytes(self.cert_pem())
        key_path.write_bytes(self.key_pem())
        key_path.chmod(0o600)
        return cert_path, key_path


def _name(
    cn: str | None, ou: str | None = None, attributes: Sequence[x509.NameAttribute] = ()
) -> x509.Name:
    attrs = list(attributes)
    if ou is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def make_ca(cn: str = "Test CA", key_type: str = "ec") -> Issued:
    """A self-signed root CA."""
    key = new_key(key_type)
    name = _name(cn)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - datetime.timedelta(days=1))
        .not_valid_after(_NOW + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def make_intermediate(issuer: Issued, cn: str = "Test Intermediate CA") -> Issued:
    key = new_key()
    cert = (
        _builder(issuer, _name(cn), key, days=1825)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(issuer.key, hashes.SHA256())
    )
    return Issued(cert, key, (issuer.cert, *issuer.chain) if issuer.chain else ())


def _builder(
    issuer: Issued,
    subject: x509.Name,
    key: PrivateKey,
    days: int = 30,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or _NOW - datetime.timedelta(hours=1))
        .not_valid_after(not_after or _NOW + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )


def make_server(
    issuer: Issued,
    names: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    key_type: str = "ec",
) -> Issued:
    """A server certificate with subjectAltName and serverAuth, as clients demand."""
    key = new_key(key_type)
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (
        _builder(issuer, _name(names[0]), key)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(issuer.key, hashes.SHA256())
    )
    return Issued(cert, key, _chain_of(issuer))


def _chain_of(issuer: Issued) -> tuple[x509.Certificate, ...]:
    """The chain a leaf presents: its issuer and that one's chain, never a self-signed root."""
    if issuer.cert.issuer == issuer.cert.subject:
        return ()
    return (issuer.cert, *issuer.chain)


def make_client(
    issuer: Issued,
    cn: str | None = "client",
    *,
    ou: str | None = None,
    attributes: Sequence[x509.NameAttribute] = (),
    eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    sans: Sequence[x509.GeneralName] = (),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    key_type: str = "ec",
) -> Issued:
    """
    A client certificate.  C{eku=None} leaves extendedKeyUsage out entirely
    (which OpenSSL accepts for any purpose); a list without clientAuth makes a
    certificate that must be refused.
    """
    key = new_key(key_type)
    builder = _builder(
        issuer, _name(cn, ou, attributes), key, not_before=not_before, not_after=not_after
    ).add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return Issued(builder.sign(issuer.key, hashes.SHA256()), key, _chain_of(issuer))


def days_ago(n: float) -> datetime.datetime:
    return _NOW - datetime.timedelta(days=n)


def days_ahead(n: float) -> datetime.datetime:
    return _NOW + datetime.timedelta(days=n)


def make_crl(
    issuer: Issued, revoked: Sequence[x509.Certificate], next_update_days: float = 7
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(_NOW - datetime.timedelta(hours=1))
        .next_update(_NOW + datetime.timedelta(days=next_update_days))
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(_NOW - datetime.timedelta(minutes=5))
            .build()
        )
    return builder.sign(issuer.key, hashes.SHA256())


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
