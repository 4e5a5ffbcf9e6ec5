"""
Certificates the end-to-end access-control, identity and hostile-certificate
tests need beyond what L{harness.Pki} makes: clients with chosen subjects,
SANs, serial numbers and validity, their own intermediate CAs, certificates
holding bytes cryptography's builders refuse to write, and CRLs.

Everything is issued under the session's L{harness.Pki} root (the CA every
proxy trusts) unless another issuer is given, and written beside the Pki's
files with an C{extra-} prefix so that nothing collides with L{harness.Pki.get}.

Also here: the documented header encoding as an independent reference
(L{doc_encode}), and strict readers of what the proxy forwards (L{parse_xfcc},
L{sf_binary}), shared by the identity and hostile-certificate tests.
"""

from __future__ import annotations

import base64
import datetime
import re
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote_to_bytes

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests import certfactory as cf

from .harness import ClientCert, Pki

A = x509.NameAttribute
NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
CLIENT_AUTH = (ExtendedKeyUsageOID.CLIENT_AUTH,)

#: Printable ASCII as docs/identity.md means it (0x20..0x7E).
PRINTABLE = frozenset(range(0x20, 0x7F))


def name(*attributes: x509.NameAttribute) -> x509.Name:
    """An X.509 name from attributes in certificate order (least specific first)."""
    return x509.Name(list(attributes))


def cn(value: str, **kwargs: object) -> x509.NameAttribute:
    """A commonName attribute; values beyond X.520's 64 characters are allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return A(NameOID.COMMON_NAME, value, _validate=False, **kwargs)  # type: ignore[arg-type]


def build_certificate(
    issuer: cf.Issued,
    subject: x509.Name,
    *,
    sans: Sequence[x509.GeneralName] = (),
    eku: Sequence[x509.ObjectIdentifier] | None = CLIENT_AUTH,
    serial: int | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    ca: bool = False,
    key: cf.PrivateKey | None = None,
) -> cf.Issued:
    """
    A certificate signed by C{issuer}: a client (clientAuth, or C{eku}) or,
    with C{ca=True}, an intermediate CA (pathlen 0, keyCertSign and cRLSign).
    """
    key = key or cf.new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before or NOW - datetime.timedelta(hours=1))
        .not_valid_after(not_after or NOW + datetime.timedelta(days=30))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        ).add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    chain: tuple[x509.Certificate, ...] = ()
    if issuer.cert.issuer != issuer.cert.subject:  # an intermediate: present it too
        chain = (issuer.cert, *issuer.chain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cert = builder.sign(issuer.key, hashes.SHA256())
    return cf.Issued(cert, key, chain)


# -- DER surgery: what cryptography's builders refuse to write ------------------


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


_ECDSA_SHA256 = _tlv(0x30, _tlv(0x06, bytes.fromhex("2a8648ce3d040302")))


def resigned_der(cert: x509.Certificate, old: bytes, new: bytes, issuer: cf.Issued) -> bytes:
    """
    C{cert} with C{old} replaced by C{new} (same length) in its to-be-signed
    part, signed again by C{issuer} (an EC key): a correctly signed
    certificate holding bytes its string type forbids.
    """
    tbs = cert.tbs_certificate_bytes
    assert tbs.count(old) == 1, f"{old!r} occurs {tbs.count(old)} times in the TBS"
    assert len(old) == len(new)
    tbs = tbs.replace(old, new)
    assert isinstance(issuer.key, ec.EllipticCurvePrivateKey)
    signature = issuer.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _tlv(0x30, tbs + _ECDSA_SHA256 + _tlv(0x03, b"\x00" + signature))


def der_to_pem(der: bytes) -> bytes:
    """PEM written by hand, so that no parser has to read the certificate first."""
    b64 = base64.b64encode(der).decode("ascii")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return ("-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"
            ).encode("ascii")


# -- the documented encoding, as an independent reference ------------------------


def doc_encode(value: str) -> str:
    """
    docs/identity.md's X-Client-Cert-* encoding: every byte of the UTF-8 text
    outside printable ASCII, and C{%}, as C{%XX} (upper case); a space at
    either end as C{%20}.
    """
    out = []
    for b in value.encode("utf-8", "surrogatepass"):
        out.append(chr(b) if b in PRINTABLE and b != 0x25 else f"%{b:02X}")
    text = "".join(out)
    if text.startswith(" "):
        text = "%20" + text[1:]
    if text.endswith(" "):
        text = text[:-1] + "%20"
    return text


def doc_decode(value: str) -> str:
    """What any URL-unquoting function gives back from a header value (UTF-8)."""
    return unquote_to_bytes(value).decode("utf-8")


def is_printable_ascii(value: str) -> bool:
    return all(ord(c) in PRINTABLE for c in value)


def pem_of(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def der_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# -- reading what the proxy forwards -------------------------------------------------


def parse_xfcc(value: str) -> list[tuple[str, str]]:
    """
    A strict parser of one XFCC element as Envoy means it: a quoted value
    ends at the first C{"} that is not part of an RFC 9110 quoted-pair, and
    the text between the quotes is returned as it stands (the Subject is the
    RFC 4514 string, its own C{\\} escapes included, as Envoy sends OpenSSL's).
    """
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < len(value):
        key, eq, _ = value[pos:].partition("=")
        assert eq and re.fullmatch(r"[A-Za-z]+", key), value[pos:]
        pos += len(key) + 1
        if value[pos : pos + 1] == '"':
            pos += 1
            start = pos
            while value[pos] != '"':
                pos += 2 if value[pos] == "\\" else 1
            text = value[start:pos]
            pos += 1
        else:
            end = value.find(";", pos)
            end = len(value) if end < 0 else end
            text = value[pos:end]
            assert not any(c in text for c in ',="\\'), text
            pos = end
        pairs.append((key, text))
        if pos < len(value):
            assert value[pos] == ";", value[pos:]
            pos += 1
    return pairs


def sf_binary(item: str) -> bytes:
    """An RFC 8941 byte sequence :base64: -> bytes (strict base64)."""
    assert item.startswith(":") and item.endswith(":") and len(item) >= 2, item
    return base64.b64decode(item[1:-1], validate=True)


# -- making and caching them per Pki -----------------------------------------------


class Extra:
    """
    Client certificates, CAs and CRLs for one L{Pki}, made once per name.

    C{client(name, ...)} returns a L{ClientCert} that the harness's clients
    (C{proxy.tls}, C{proxy.attempt}, C{proxy.curl}) accept.
    """

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self._lock = threading.RLock()
        self._made: dict[str, object] = {}

    def _once(self, key: str, make):  # type: ignore[no-untyped-def]
        with self._lock:
            if key not in self._made:
                self._made[key] = make()
            return self._made[key]

    def _write(self, label: str, cert_pem: bytes, issued: cf.Issued) -> tuple[Path, Path]:
        cert_path = self.pki.dir / f"extra-{label}-cert.pem"
        key_path = self.pki.dir / f"extra-{label}-key.pem"
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in issued.chain)
        cert_path.write_bytes(cert_pem + chain)
        key_path.write_bytes(issued.key_pem())
        key_path.chmod(0o600)
        return cert_path, key_path

    def client(
        self,
        label: str,
        subject: x509.Name | str | None = None,
        *,
        issuer: cf.Issued | None = None,
        **options: object,
    ) -> ClientCert:
        """
        A client certificate, made on first use of C{label}: C{subject} is a
        name, a CN, or (C{None}) the CN C{label}; C{options} go to
        L{build_certificate} (sans, serial, not_before, not_after, eku).
        """

        def make() -> ClientCert:
            if subject is None:
                subj = name(cn(label))
            elif isinstance(subject, str):
                subj = name(cn(subject))
            else:
                subj = subject
            issued = build_certificate(issuer or self.pki.ca, subj, **options)  # type: ignore[arg-type]
            cert_path, key_path = self._write(label, issued.cert_pem(with_chain=False), issued)
            values = subj.get_attributes_for_oid(NameOID.COMMON_NAME)
            common = values[-1].value if values else None
            return ClientCert(label, common if isinstance(common, str) else None,
                              cert_path, key_path, issued)

        return self._once("client:" + label, make)  # type: ignore[return-value]

    def resigned_client(
        self, label: str, subject: x509.Name, old: bytes, new: bytes,
        sans: Sequence[x509.GeneralName] = (),
    ) -> tuple[ClientCert, bytes]:
        """
        A root-issued client whose TBS bytes C{old} are replaced by C{new}
        and signed again; returns the client and its DER.
        """

        def make() -> tuple[ClientCert, bytes]:
            issued = build_certificate(self.pki.ca, subject, sans=sans)
            der = resigned_der(issued.cert, old, new, self.pki.ca)
            cert_path, key_path = self._write(label, der_to_pem(der), issued)
            return ClientCert(label, None, cert_path, key_path, issued), der

        return self._once("resigned:" + label, make)  # type: ignore[return-value]

    def intermediate(self, label: str) -> cf.Issued:
        """An intermediate CA under the Pki's root."""
        return self._once(  # type: ignore[return-value]
            "ca:" + label,
            lambda: build_certificate(self.pki.ca, name(cn(f"extra {label} CA")), ca=True),
        )

    def crl(
        self,
        label: str,
        issuer: cf.Issued,
        revoked: Sequence[x509.Certificate] = (),
        last_update: datetime.datetime | None = None,
        next_update: datetime.datetime | None = None,
    ) -> Path:
        """A PEM CRL signed by C{issuer} listing C{revoked}, written once per label."""

        def make() -> Path:
            builder = (
                x509.CertificateRevocationListBuilder()
                .issuer_name(issuer.cert.subject)
                .last_update(last_update or NOW - datetime.timedelta(hours=1))
                .next_update(next_update or NOW + datetime.timedelta(days=7))
            )
            for cert in revoked:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(cert.serial_number)
                    .revocation_date(NOW - datetime.timedelta(minutes=5))
                    .build()
                )
            crl = builder.sign(issuer.key, hashes.SHA256())
            path = self.pki.dir / f"extra-{label}-crl.pem"
            path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
            return path

        return self._once("crl:" + label, make)  # type: ignore[return-value]

    def write(self, label: str, data: str | bytes) -> Path:
        """Any file (a TOML configuration, say) beside the certificates."""
        path = self.pki.dir / f"extra-{label}"
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path


_extras: dict[int, Extra] = {}
_extras_lock = threading.Lock()


def extra_for(pki: Pki) -> Extra:
    """The one L{Extra} of this Pki (the Pki fixture lives for the session)."""
    with _extras_lock:
        if id(pki) not in _extras:
            _extras[id(pki)] = Extra(pki)
        return _extras[id(pki)]
