"""
The certificate workflow behind ``mtlsproxy pki``: a private CA in one directory.

The seed's recipe was a page of C{openssl} and C{keytool} commands that had to
be typed in the right order, made slow 4096-bit RSA keys, left private keys
world-readable and forgot subjectAltName, which every modern TLS client
requires.  This module does the same job in one step, with a certificate
profile that OpenSSL, Java, browsers and service-identity all accept:

  - a CA (basicConstraints CA:TRUE and keyUsage keyCertSign+cRLSign, both
    critical; ten years by default);
  - server certificates with subjectAltName, extendedKeyUsage serverAuth and
    at most 398 days of validity by default (the CA/Browser Forum limit that
    browsers and Apple platforms enforce);
  - client certificates with extendedKeyUsage clientAuth only, so that a
    stolen client certificate cannot impersonate a server;
  - random serials, subject and authority key identifiers, SHA-256 signatures
    and a notBefore a few minutes in the past to absorb clock skew;
  - optionally, PKCS#12 keystores and truststores that Java's keytool reads,
    with random passwords in C{*.pass} files;
  - a CRL (C{crl.pem}) for revocation and an index (C{index.json}) listing
    what was issued.

Everything is done with C{cryptography}; no external program is run.  Every
expected failure raises L{PkiError} whose message is one line naming the file
and telling the operator what to do.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import MtlsProxyError

try:  # POSIX only; without it two concurrent runs could lose an index update.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CRL_FILE",
    "INDEX_FILE",
    "KEY_TYPES",
    "CertificateAuthority",
    "IndexEntry",
    "IssueResult",
    "Kind",
    "KeyType",
    "PkiError",
    "CrlResult",
    "RevokeResult",
    "Status",
    "generate_key",
    "init_pki",
    "issue",
    "keystore_bytes",
    "list_certificates",
    "load_ca",
    "parse_server_name",
    "refresh_crl",
    "revoke",
    "serial_hex",
    "truststore_bytes",
]


class PkiError(MtlsProxyError):
    """A ``pki`` operation cannot be done; the message says which file and why."""


KeyType = Literal["ec", "rsa2048", "rsa4096"]
#: The key types C{--key-type} accepts; C{ec} (P-256) is the default because
#: it is generated instantly, while 4096-bit RSA takes seconds.
KEY_TYPES: tuple[KeyType, ...] = get_args(KeyType)
Kind = Literal["ca", "server", "client"]
Status = Literal["valid", "expired", "revoked"]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CRL_FILE = "crl.pem"
INDEX_FILE = "index.json"

CA_DAYS = 3650
#: The longest validity browsers and Apple platforms accept for a server
#: certificate (CA/Browser Forum, since 2020): also the default.
SERVER_MAX_DAYS = 398
SERVER_DAYS = SERVER_MAX_DAYS
CLIENT_DAYS = 398
CRL_DAYS = 30
#: notBefore is set this far in the past so that a peer whose clock is a little
#: behind does not reject a certificate made a second ago as "not yet valid".
CLOCK_SKEW = datetime.timedelta(minutes=5)


def _not_after(now: datetime.datetime, days: int) -> datetime.datetime:
    """
    The end of a validity period of exactly C{days} days from the backdated
    notBefore: RFC 5280 periods include both ends, so one second less, and a
    398-day certificate is not the 398 days and 5 minutes that CA/Browser
    Forum checks (testssl.sh's "lifespan") count as too long.
    """
    return now - CLOCK_SKEW + datetime.timedelta(days=days, seconds=-1)


DEFAULT_SERVER_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
DEFAULT_CLIENT_NAME = "client"
#: PBKDF2 rounds for PKCS#12 files: keytool's own default is 10000; more is
#: fine for keytool and for OpenSSL 3.
PKCS12_KDF_ROUNDS = 50000

_INDEX_VERSION = 1
#: The PKCS#12 files and passwords ``init --p12`` writes.
_INIT_P12_FILES = tuple(
    f"{side}-{store}.{ext}"
    for side in ("server", "client")
    for store in ("keystore", "truststore")
    for ext in ("p12", "pass")
)
# NAME becomes part of a file name: no slashes, no leading dot or dash, nothing
# a shell would need quoting for.
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_@+][A-Za-z0-9._@+:-]{0,127}$")
_DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


# --- small helpers -------------------------------------------------------------------------


def _now() -> datetime.datetime:
    """Now in UTC, whole seconds: X.509 times have no fractions, and the index must agree."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _iso(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(value: str) -> datetime.datetime:
    return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def serial_hex(serial: int) -> str:
    """A serial as OpenSSL prints it (upper-case hex, even number of digits), for grepping."""
    text = f"{serial:X}"
    return text if len(text) % 2 == 0 else "0" + text


def generate_key(key_type: KeyType) -> PrivateKey:
    """A new private key: P-256 for C{ec}, else RSA of the given size with exponent 65537."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type in ("rsa2048", "rsa4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    raise PkiError(f"unknown key type {key_type!r} (choose one of {', '.join(KEY_TYPES)})")


def _signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    """SHA-256, except for Ed25519/Ed448 CA keys (made by hand): they sign without a hash."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: the proxy reads it without a prompt; mode 0600 protects it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _public_der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _pkcs12_encryption(password: bytes) -> serialization.KeySerializationEncryption:
    """
    PBES2 with AES-256-CBC and a SHA-256 MAC: what keytool (Java 8u301+/11+)
    writes and reads, unlike cryptography's legacy RC2/3DES default which
    OpenSSL 3 refuses without its legacy provider.
    """
    return (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(PKCS12_KDF_ROUNDS)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password)
    )


def _new_password() -> str:
    return secrets.token_urlsafe(24)


def keystore_bytes(
    friendly_name: str,
    key: PrivateKey,
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    password: bytes,
) -> bytes:
    """
    A PKCS#12 keystore: one PrivateKeyEntry named C{friendly_name} (keytool's
    alias, the browser's label) with the CA in its chain.
    """
    return pkcs12.serialize_key_and_certificates(
        friendly_name.encode("utf-8"), key, cert, [ca_cert], _pkcs12_encryption(password)
    )


def truststore_bytes(ca_cert: x509.Certificate, password: bytes) -> bytes:
    """
    A PKCS#12 truststore with the CA as a keytool C{trustedCertEntry}.

    A plain certificate bag is not enough for Java: without Oracle's
    "trusted key usage" attribute keytool lists no entry at all and a JVM
    trusts nothing.  cryptography 45 added L{pkcs12.serialize_java_truststore}
    for exactly this, which is why setup.cfg requires it.
    """
    entry = pkcs12.PKCS12Certificate(ca_cert, b"ca")
    return pkcs12.serialize_java_truststore([entry], _pkcs12_encryption(password))


# --- files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Output:
    """One file to write: its name in the CA directory, content, and whether it is secret."""

    name: str
    data: bytes
    secret: bool = False

    @property
    def mode(self) -> int:
        return 0o600 if self.secret else 0o644


def _check_overwrite(directory: Path, names: Sequence[str], force: bool) -> None:
    """Refuse before anything is written, so that a refused run leaves the directory as it was."""
    if force:
        return
    existing = [directory / n for n in names if os.path.lexists(directory / n)]
    if existing:
        listed = ", ".join(str(p) for p in existing[:3])
        if len(existing) > 3:
            listed += f" and {len(existing) - 3} more"
        raise PkiError(f"refusing to overwrite {listed} (use --force to replace)")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """
    Create C{path} with C{mode} from the start (O_EXCL), never chmod later:
    a private key must not exist, even for a moment, with looser permissions.
    """
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    except FileExistsError:
        raise PkiError(f"refusing to overwrite {path} (use --force to replace)") from None
    except OSError as e:
        raise PkiError(f"{path}: cannot create: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise PkiError(f"{path}: cannot write: {e.strerror}") from None


def _write_replace(path: Path, data: bytes, mode: int) -> None:
    """
    Write a temporary file (created with C{mode}) beside C{path}, then rename it
    over C{path}: readers (a running proxy re-reading C{crl.pem}) see the old or
    the new content, never half a file, and the new file never inherits the
    old one's permissions.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    _write_new(tmp, data, mode)
    try:
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise PkiError(f"{path}: cannot replace: {e.strerror}") from None


def _write_outputs(directory: Path, outputs: Sequence[_Output], force: bool) -> list[Path]:
    _check_overwrite(directory, [o.name for o in outputs], force)
    written = []
    for output in outputs:
        path = directory / output.name
        if force:
            _write_replace(path, output.data, output.mode)
        else:
            _write_new(path, output.data, output.mode)
        written.append(path)
    return written


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """
    Hold an exclusive lock on the CA directory itself while the index is read,
    changed and written, so two concurrent runs cannot lose each other's entries.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- the index -----------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexEntry:
    """
    One certificate this CA issued, as recorded in C{index.json}.

    @ivar serial: the certificate's serial number.
    @ivar subject: the subject as an RFC 4514 string (C{CN=client}).
    @ivar kind: C{ca}, C{server} or C{client}.
    @ivar file: the certificate's file name, relative to the CA directory when inside it.
    @ivar not_after: expiry (UTC).
    @ivar revoked_at: when it was revoked, or C{None}.
    """

    serial: int
    subject: str
    kind: Kind
    file: str
    not_after: datetime.datetime
    revoked_at: datetime.datetime | None = None

    @property
    def serial_hex(self) -> str:
        return serial_hex(self.serial)

    def status(self, now: datetime.datetime | None = None) -> Status:
        """Revoked wins over expired: a revoked certificate must never look fine."""
        if self.revoked_at is not None:
            return "revoked"
        if self.not_after <= (now or _now()):
            return "expired"
        return "valid"

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": self.serial_hex,
            "subject": self.subject,
            "kind": self.kind,
            "file": self.file,
            "not_after": _iso(self.not_after),
            "revoked_at": None if self.revoked_at is None else _iso(self.revoked_at),
        }

    @classmethod
    def from_json(cls, data: Any) -> IndexEntry:
        if not isinstance(data, dict):
            raise ValueError("entry is not an object")
        kind = data["kind"]
        if kind not in get_args(Kind):
            raise ValueError(f"unknown kind {kind!r}")
        revoked = data.get("revoked_at")
        return cls(
            serial=int(data["serial"], 16),
            subject=str(data["subject"]),
            kind=kind,
            file=str(data["file"]),
            not_after=_parse_iso(data["not_after"]),
            revoked_at=None if revoked is None else _parse_iso(revoked),
        )

    @classmethod
    def for_certificate(cls, cert: x509.Certificate, kind: Kind, file: str) -> IndexEntry:
        return cls(
            serial=cert.serial_number,
            subject=cert.subject.rfc4514_string(),
            kind=kind,
            file=file,
            not_after=cert.not_valid_after_utc,
        )


@dataclass
class _Index:
    entries: list[IndexEntry] = field(default_factory=list)
    crl_number: int = 0

    def find(self, serial: int) -> int | None:
        for i, entry in enumerate(self.entries):
            if entry.serial == serial:
                return i
        return None

    def add(self, entry: IndexEntry) -> None:
        if self.find(entry.serial) is None:
            self.entries.append(entry)


def _load_index(directory: Path) -> _Index:
    path = directory / INDEX_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return _Index()
    except OSError as e:
        raise PkiError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("version") != _INDEX_VERSION:
            raise ValueError(f"not a version {_INDEX_VERSION} mtlsproxy index")
        entries = [IndexEntry.from_json(e) for e in data["certificates"]]
        crl_number = int(data.get("crl_number", 0))
    except (ValueError, KeyError, TypeError) as e:
        raise PkiError(f"{path}: damaged index ({e}); fix or remove it") from None
    return _Index(entries, crl_number)


def _save_index(directory: Path, index: _Index) -> None:
    data = {
        "version": _INDEX_VERSION,
        "crl_number": index.crl_number,
        "certificates": [e.to_json() for e in index.entries],
    }
    text = json.dumps(data, indent=2) + "\n"
    _write_replace(directory / INDEX_FILE, text.encode("utf-8"), 0o644)


# --- the CA --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA directory's certificate and private key, checked to belong together."""

    directory: Path
    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes

    def authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        """From the CA's own subjectKeyIdentifier when it has one, so that both always agree."""
        try:
            ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)

    def issued(self, cert: x509.Certificate) -> bool:
        """Whether C{cert} names this CA as issuer and carries its valid signature."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PkiError(f"{path}: is a directory, expected {what}") from None
    except OSError as e:
        raise PkiError(f"{path}: cannot read: {e.strerror}") from None


def _load_cert_file(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file (a chain is fine) or a DER file."""
    data = _read(path, "a certificate")
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)[0]
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise PkiError(f"{path}: not a PEM or DER certificate") from None


def load_ca(directory: Path) -> CertificateAuthority:
    """
    Load and check the CA in C{directory} before anything is issued with it.

    @raise PkiError: the directory or a CA file is missing, unreadable or not
        what it should be, the key does not belong to the certificate, or the
        CA has expired.
    """
    directory = Path(directory)
    hint = f"create one with: mtlsproxy pki init {directory}"
    if not directory.exists():
        raise PkiError(f"{directory}: no such CA directory ({hint})")
    if not directory.is_dir():
        raise PkiError(f"{directory}: not a directory")
    cert_path = directory / CA_CERT
    key_path = directory / CA_KEY
    for path in (cert_path, key_path):
        if not path.exists():
            raise PkiError(f"{directory}: not a CA directory, {path.name} is missing ({hint})")
    cert = _load_cert_file(cert_path)
    data = _read(key_path, "a private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PkiError(
            f"{key_path}: the CA key is encrypted; mtlsproxy pki needs it unencrypted "
            "(protect the directory instead: mode 0700, key 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise PkiError(f"{key_path}: not a PEM private key") from None
    if not isinstance(
        key,
        ec.EllipticCurvePrivateKey
        | rsa.RSAPrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise PkiError(f"{key_path}: unsupported CA key type {type(key).__name__}")
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise PkiError(
            f"{key_path}: does not match {cert_path} (the key belongs to another certificate)"
        )
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise PkiError(f"{cert_path}: not a CA certificate (no basicConstraints CA:TRUE)")
    if cert.not_valid_after_utc <= _now():
        raise PkiError(
            f"{cert_path}: the CA expired on {_iso(cert.not_valid_after_utc)} "
            f"(make a new one with: mtlsproxy pki init --force {directory})"
        )
    return CertificateAuthority(directory, cert, key)


# --- certificate profiles ------------------------------------------------------------------


def _key_usage(
    *, digital_signature: bool = False, key_encipherment: bool = False, ca: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _common_name(value: str, option: str) -> x509.Name:
    if not 1 <= len(value) <= 64:
        raise PkiError(f"{option}: {value!r} must be 1 to 64 characters (X.509 commonName limit)")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])


def _build_ca(
    common_name: str, key: PrivateKey, days: int, now: datetime.datetime
) -> x509.Certificate:
    name = _common_name(common_name, "--ca-name")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(_not_after(now, days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def parse_server_name(name: str, option: str = "--server-name") -> x509.GeneralName:
    """
    An IP address becomes an iPAddress SAN, anything else a dNSName: TLS
    clients match an address only against iPAddress entries, so the choice
    decides whether C{https://127.0.0.1/} works.

    A name made only of numbers and dots (C{1.2.3.999}, C{10.1}, C{010.1.2.3})
    is refused rather than taken as a DNS name: it was meant as an address,
    and clients parse it as one (or fail to), so a dNSName for it would never
    match anything.

    @param option: the command-line option the name came from, for the message.
    @raise PkiError: neither a usable DNS name nor an IP address.
    """
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
            raise PkiError(
                f"{option}: {name!r} has a zone index (%{address.scope_id}); certificates "
                "cannot name one, give the address without it"
            )
        return x509.IPAddress(address)
    try:
        ascii_name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        ascii_name = ""
    labels = ascii_name.rstrip(".").split(".")
    if ascii_name and all(label.isdigit() for label in labels):
        raise PkiError(
            f"{option}: {name!r} looks like an IPv4 address but is not a valid one "
            "(four numbers 0-255 without leading zeros, like 192.0.2.7)"
        )
    if labels and labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]
    if (
        not ascii_name
        or len(ascii_name) > 253
        or not all(_DNS_LABEL_RE.match(label) for label in labels)
    ):
        raise PkiError(f"{option}: {name!r} is neither a DNS name nor an IP address")
    return x509.DNSName(ascii_name.rstrip(".").lower())


def _server_sans(names: Sequence[str], options: Sequence[str] = ()) -> list[x509.GeneralName]:
    """
    The subjectAltName entries for C{names}, in order, each once; C{options[i]}
    names the option C{names[i]} came from (C{--server-name} when not given).
    """
    sans: list[x509.GeneralName] = []
    for i, name in enumerate(names):
        option = options[i] if i < len(options) else "--server-name"
        san = parse_server_name(name, option)
        if san not in sans:
            sans.append(san)
    return sans


def _build_leaf(
    ca: CertificateAuthority,
    kind: Literal["server", "client"],
    common_name: str,
    name_option: str,
    sans: Sequence[x509.GeneralName],
    key: PrivateKey,
    days: int,
    now: datetime.datetime,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_common_name(common_name, name_option))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(_not_after(now, days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(ca.authority_key_identifier(), critical=False)
    )
    if kind == "server":
        # keyEncipherment only matters for RSA key exchange, which only RSA keys can do.
        builder = builder.add_extension(
            _key_usage(digital_signature=True, key_encipherment=isinstance(key, rsa.RSAPrivateKey)),
            critical=True,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    else:
        builder = builder.add_extension(
            _key_usage(digital_signature=True), critical=True
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(ca.key, _signature_hash(ca.key))


def _validity_warnings(
    ca: CertificateAuthority, kind: str, days: int, now: datetime.datetime
) -> list[str]:
    warnings = []
    if kind == "server" and days > SERVER_MAX_DAYS:
        warnings.append(
            f"warning: server certificate valid for {days} days; browsers and many TLS "
            f"clients refuse server certificates valid for more than {SERVER_MAX_DAYS} days"
        )
    if now + datetime.timedelta(days=days) > ca.cert.not_valid_after_utc:
        warnings.append(
            f"warning: the {kind} certificate outlives the CA, which expires on "
            f"{_iso(ca.cert.not_valid_after_utc)}; it stops working then"
        )
    return warnings


def _kind_of(cert: x509.Certificate) -> Kind:
    """Guess the kind of a certificate not in the index (issued by hand) from its extensions."""
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "ca"
    except x509.ExtensionNotFound:
        pass
    try:
        ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "client"
    if ExtendedKeyUsageOID.SERVER_AUTH in ekus and ExtendedKeyUsageOID.CLIENT_AUTH not in ekus:
        return "server"
    return "client"


def _ca_entry(ca: CertificateAuthority) -> IndexEntry:
    return IndexEntry.for_certificate(ca.cert, "ca", CA_CERT)


def _positive_days(days: int, option: str) -> int:
    if days < 1:
        raise PkiError(f"{option}: must be at least 1, got {days}")
    return days


# --- operations ----------------------------------------------------------------------------


@dataclass
class IssueResult:
    """
    What L{init_pki} or L{issue} did.

    @ivar written: the files written, in order.
    @ivar removed: files deleted because they belonged to what was replaced.
    @ivar removed_why: why, for the operator (the same for every removed file).
    @ivar certificates: index entries of the certificates made.
    @ivar warnings: lines for stderr (already prefixed with C{warning:}).
    """

    written: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    certificates: list[IndexEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    removed_why: str = "it belonged to the replaced CA"


def _leaf_outputs(
    ca: CertificateAuthority,
    *,
    kind: Literal["server", "client"],
    file_stem: str,
    common_name: str,
    name_option: str,
    sans: Sequence[x509.GeneralName],
    key_type: KeyType,
    days: int,
    p12: bool,
    friendly_name: str,
    now: datetime.datetime,
) -> tuple[list[_Output], x509.Certificate]:
    key = generate_key(key_type)
    cert = _build_leaf(ca, kind, common_name, name_option, sans, key, days, now)
    outputs = [
        _Output(f"{file_stem}-cert.pem", _cert_pem(cert)),
        _Output(f"{file_stem}-key.pem", _key_pem(key), secret=True),
    ]
    if p12:
        password = _new_password()
        outputs += [
            _Output(
                f"{file_stem}-keystore.p12",
                keystore_bytes(friendly_name, key, cert, ca.cert, password.encode("ascii")),
                secret=True,
            ),
            _Output(f"{file_stem}-keystore.pass", (password + "\n").encode("ascii"), secret=True),
        ]
    return outputs, cert


def _truststore_outputs(ca_cert: x509.Certificate, stem: str) -> list[_Output]:
    password = _new_password()
    return [
        _Output(f"{stem}-truststore.p12", truststore_bytes(ca_cert, password.encode("ascii"))),
        _Output(f"{stem}-truststore.pass", (password + "\n").encode("ascii"), secret=True),
    ]


def init_pki(
    directory: Path,
    *,
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    client_name: str = DEFAULT_CLIENT_NAME,
    ca_name: str | None = None,
    key_type: KeyType = "ec",
    days: int | None = None,
    ca_days: int = CA_DAYS,
    p12: bool = False,
    force: bool = False,
) -> IssueResult:
    """
    Make a new CA with one server and one client certificate in C{directory}.

    C{directory} is created (mode 0700) if missing.  Nothing is written if any
    target file exists and C{force} is false.  With C{force}, the previous
    CA's C{crl.pem} and any PKCS#12 files this run does not rewrite are
    removed: they belong to a CA key that no longer exists here.

    @param server_names: subjectAltNames of the server certificate, DNS names
        or IP addresses; the first is also its commonName.
    @param client_name: commonName of the client certificate.
    @param ca_name: commonName of the CA; by default C{mtlsproxy CA} and a
        random suffix, so that CAs made on different machines are told apart.
    @param days: validity of the server and client certificates (default 398).
    @param p12: also write PKCS#12 keystores and truststores with C{.pass} files.
    """
    directory = Path(directory)
    if not server_names:
        raise PkiError("--server-name: at least one name is needed")
    sans = _server_sans(server_names)
    ca_days = _positive_days(ca_days, "--ca-days")
    server_days = _positive_days(days if days is not None else SERVER_DAYS, "--days")
    client_days = _positive_days(days if days is not None else CLIENT_DAYS, "--days")
    _common_name(client_name, "--client-name")
    if directory.exists() and not directory.is_dir():
        raise PkiError(f"{directory}: exists and is not a directory")

    now = _now()
    ca_key = generate_key(key_type)
    ca_cert = _build_ca(ca_name or f"mtlsproxy CA {secrets.token_hex(4)}", ca_key, ca_days, now)
    ca = CertificateAuthority(directory, ca_cert, ca_key)
    outputs = [
        _Output(CA_CERT, _cert_pem(ca_cert)),
        _Output(CA_KEY, _key_pem(ca_key), secret=True),
    ]
    server_outputs, server_cert = _leaf_outputs(
        ca,
        kind="server",
        file_stem="server",
        common_name=server_names[0],
        name_option="--server-name",
        sans=sans,
        key_type=key_type,
        days=server_days,
        p12=p12,
        friendly_name="server",
        now=now,
    )
    client_outputs, client_cert = _leaf_outputs(
        ca,
        kind="client",
        file_stem="client",
        common_name=client_name,
        name_option="--client-name",
        sans=[],
        key_type=key_type,
        days=client_days,
        p12=p12,
        friendly_name="client",
        now=now,
    )
    outputs += server_outputs + client_outputs
    if p12:
        outputs += _truststore_outputs(ca_cert, "server") + _truststore_outputs(ca_cert, "client")

    index = _Index()
    for entry in (
        _ca_entry(ca),
        IndexEntry.for_certificate(server_cert, "server", "server-cert.pem"),
        IndexEntry.for_certificate(client_cert, "client", "client-cert.pem"),
    ):
        index.add(entry)
    result = IssueResult(certificates=list(index.entries))
    result.warnings += _validity_warnings(ca, "server", server_days, now)
    result.warnings += _validity_warnings(ca, "client", client_days, now)

    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise PkiError(f"{directory}: cannot create: {e.strerror}") from None
    with _locked(directory):
        _check_overwrite(directory, [o.name for o in outputs] + [INDEX_FILE, CRL_FILE], force)
        # Files of the replaced CA that this run does not rewrite would contradict
        # the new one: its CRL, and its PKCS#12 files when this run has no --p12.
        written_names = {o.name for o in outputs}
        for name in (CRL_FILE, *_INIT_P12_FILES) if force else ():
            stale = directory / name
            if name not in written_names and os.path.lexists(stale):
                stale.unlink()
                result.removed.append(stale)
        result.written = _write_outputs(directory, outputs, force)
        _save_index(directory, index)
        result.written.append(directory / INDEX_FILE)
    return result


def _check_file_name(name: str, option: str) -> None:
    if not _FILE_NAME_RE.match(name):
        hint = ""
        if option == "--server":
            hint = (
                "; give the server a NAME that is, and add the name it needs with "
                "--server-name (for example --server web --server-name NAME)"
            )
        raise PkiError(
            f"{option}: {name!r} cannot be used as a file name, and NAME names the files "
            f"(NAME-cert.pem, NAME-key.pem): letters, digits and . _ - @ + : only, not "
            f"starting with . or -{hint}"
        )
    if name == "ca":
        raise PkiError(f"{option}: 'ca' is reserved for the CA's own files")


def _file_stem(kind: Literal["server", "client"], name: str) -> str:
    """
    The NAME part of C{NAME-cert.pem}: NAME itself, except that a server's IPv6
    address is written in its short form with C{_} for C{:} (C{::1} gives
    C{__1-cert.pem}).  A colon at the start is not a safe file name, and one
    anywhere breaks C{curl --cert FILE:PASSWORD} and C{scp}.
    """
    if kind == "server":
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            return str(address).replace(":", "_")
    return name


def _truststore_pair_is_current(directory: Path, stem: str, ca_cert: x509.Certificate) -> bool:
    """
    Whether C{STEM-truststore.p12} opens with the password in C{STEM-truststore.pass}
    and holds exactly this CA: then it must be left alone (deployed clients use it).
    """
    try:
        password = (directory / f"{stem}-truststore.pass").read_bytes().rstrip(b"\r\n")
        store = pkcs12.load_pkcs12((directory / f"{stem}-truststore.p12").read_bytes(), password)
    except (OSError, ValueError):
        return False
    return [c.certificate for c in store.additional_certs] == [ca_cert]


def _missing_truststore_outputs(
    directory: Path, ca_cert: x509.Certificate, force: bool
) -> list[_Output]:
    """
    The server and client truststores ``issue --p12`` must add: those missing,
    so that a CA made without C{--p12} gets them too.  A complete store of this
    CA is never rewritten, not even with C{force} (a new password would break
    every client configured with the old one); a broken or foreign one, or half
    a pair, is replaced only with C{force}.  Call with the directory locked.
    """
    outputs: list[_Output] = []
    for stem in ("server", "client"):
        names = (f"{stem}-truststore.p12", f"{stem}-truststore.pass")
        present = [n for n in names if os.path.lexists(directory / n)]
        if not present:
            outputs += _truststore_outputs(ca_cert, stem)
        elif not _truststore_pair_is_current(directory, stem, ca_cert):
            if not force:
                p12_path, pass_path = (directory / n for n in names)
                raise PkiError(
                    f"{p12_path}: missing, not opened by the password in {pass_path}, or not "
                    f"holding this CA; refusing to overwrite (use --force to write both anew)"
                )
            outputs += _truststore_outputs(ca_cert, stem)
    return outputs


def issue(
    directory: Path,
    kind: Literal["server", "client"],
    name: str,
    *,
    server_names: Sequence[str] = (),
    key_type: KeyType = "ec",
    days: int | None = None,
    p12: bool = False,
    force: bool = False,
) -> IssueResult:
    """
    Issue one more server or client certificate from the CA in C{directory}.

    Files are C{NAME-cert.pem} and C{NAME-key.pem} (and C{NAME-keystore.p12}
    with C{NAME-keystore.pass} when C{p12}; the keystore's alias is NAME).
    For a server, NAME is the first subjectAltName and C{server_names} adds
    more; for a client, NAME is the commonName.  A server NAME may be an IP
    address; an IPv6 one is written with C{_} for C{:} in the file names.

    With C{p12}, the CA's C{server-truststore.p12} and C{client-truststore.p12}
    (with C{.pass} files) are also written when missing, so that a CA made
    without C{--p12} can still serve Java clients and C{--truststore}.

    Replacing a certificate with C{force} does not revoke the old one: revoke
    it first (or by serial).  It does remove C{NAME-keystore.p12} and its
    C{.pass} when this run writes no keystore: they hold the old certificate.

    @raise PkiError: the CA is missing or broken, NAME is not usable, or a
        file exists and C{force} is false.
    """
    directory = Path(directory)
    option = f"--{kind}"
    if kind == "client" and server_names:
        raise PkiError("--server-name: only for --server certificates")
    sans = _server_sans((name, *server_names), (option,)) if kind == "server" else []
    stem = _file_stem(kind, name)
    _check_file_name(stem, option)
    default_days = SERVER_DAYS if kind == "server" else CLIENT_DAYS
    leaf_days = _positive_days(days if days is not None else default_days, "--days")
    ca = load_ca(directory)
    now = _now()
    outputs, cert = _leaf_outputs(
        ca,
        kind=kind,
        file_stem=stem,
        common_name=name,
        name_option=option,
        sans=sans,
        key_type=key_type,
        days=leaf_days,
        p12=p12,
        friendly_name=name,
        now=now,
    )
    entry = IndexEntry.for_certificate(cert, kind, f"{stem}-cert.pem")
    warnings = _validity_warnings(ca, kind, leaf_days, now)
    result = IssueResult(
        certificates=[entry], warnings=warnings, removed_why="it held the replaced certificate"
    )
    with _locked(directory):
        if p12:
            outputs += _missing_truststore_outputs(directory, ca.cert, force)
        _check_overwrite(directory, [o.name for o in outputs], force)
        # A keystore of the replaced certificate would still hand out the old
        # certificate (and key) to whoever is configured with it.
        stale_names = () if p12 or not force else (f"{stem}-keystore.p12", f"{stem}-keystore.pass")
        for stale in (directory / n for n in stale_names):
            if os.path.lexists(stale):
                stale.unlink()
                result.removed.append(stale)
        index = _load_index(directory)
        index.add(_ca_entry(ca))
        result.written = _write_outputs(directory, outputs, force)
        index.add(entry)
        _save_index(directory, index)
    return result


@dataclass
class RevokeResult:
    """
    What L{revoke} did.

    @ivar entry: the revoked certificate's index entry (with C{revoked_at}).
    @ivar already_revoked: it was revoked before; the CRL was only re-signed.
    @ivar crl: the CRL file written.
    @ivar crl_number: the new CRL's number.
    @ivar next_update: when relying parties should stop trusting this CRL.
    """

    entry: IndexEntry
    already_revoked: bool
    crl: Path
    crl_number: int
    next_update: datetime.datetime


def _load_existing_crl(ca: CertificateAuthority) -> x509.CertificateRevocationList | None:
    path = ca.directory / CRL_FILE
    if not path.exists():
        return None
    data = _read(path, "a CRL")
    try:
        crl = (
            x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
        )
    except ValueError:
        raise PkiError(f"{path}: not a CRL; remove it to start a new one") from None
    if crl.issuer != ca.cert.subject or not crl.is_signature_valid(ca.cert.public_key()):  # type: ignore[arg-type]
        raise PkiError(f"{path}: not signed by this CA; remove it to start a new one")
    return crl


def revoke(
    directory: Path,
    cert_file: Path | None = None,
    *,
    serial: int | None = None,
    crl_days: int = CRL_DAYS,
) -> RevokeResult:
    """
    Revoke a certificate this CA issued and write a new signed C{crl.pem}.

    Give the certificate file, or its serial when the file is gone (it was
    replaced with C{issue --force}).  The new CRL lists everything revoked so
    far (from the index and the previous CRL), has lastUpdate now, nextUpdate
    C{crl_days} later, the next CRL number and the CA's authority key
    identifier.  Revoking a revoked certificate again just re-signs the CRL
    (as L{refresh_crl} does).

    @raise PkiError: the certificate was not issued by this CA, is the CA
        itself, or the serial is unknown.
    """
    directory = Path(directory)
    if (cert_file is None) == (serial is None):
        raise PkiError("revoke: give either a certificate file or --serial")
    crl_days = _positive_days(crl_days, "--crl-days")
    ca = load_ca(directory)
    cert: x509.Certificate | None = None
    if cert_file is not None:
        cert = _load_cert_file(cert_file)
        if not ca.issued(cert):
            raise PkiError(
                f"{cert_file}: not issued by this CA ({ca.cert.subject.rfc4514_string()}); "
                f"its issuer is {cert.issuer.rfc4514_string()}"
            )
        if cert.serial_number == ca.cert.serial_number:
            raise PkiError(
                f"{cert_file}: is the CA itself; to replace the CA run: "
                f"mtlsproxy pki init --force {directory}"
            )
    now = _now()
    with _locked(directory):
        index = _load_index(directory)
        index.add(_ca_entry(ca))
        if cert is not None:
            serial = cert.serial_number
            if index.find(serial) is None:
                assert cert_file is not None
                try:
                    file = str(Path(cert_file).resolve().relative_to(directory.resolve()))
                except ValueError:
                    file = str(cert_file)
                index.add(IndexEntry.for_certificate(cert, _kind_of(cert), file))
        assert serial is not None
        position = index.find(serial)
        if position is None:
            raise PkiError(
                f"--serial: no certificate with serial {serial_hex(serial)} in "
                f"{directory / INDEX_FILE} (see: mtlsproxy pki list {directory})"
            )
        entry = index.entries[position]
        if entry.kind == "ca":
            raise PkiError(
                f"--serial: {serial_hex(serial)} is the CA itself; to replace the CA run: "
                f"mtlsproxy pki init --force {directory}"
            )
        already = entry.revoked_at is not None
        if not already:
            entry = replace(entry, revoked_at=now)
            index.entries[position] = entry

        crl_path, number, next_update = _sign_crl(ca, index, now, crl_days)
    return RevokeResult(entry, already, crl_path, number, next_update)


def _sign_crl(
    ca: CertificateAuthority, index: _Index, now: datetime.datetime, crl_days: int
) -> tuple[Path, int, datetime.datetime]:
    """
    Write a new C{crl.pem} listing every revocation in the index and in the
    previous CRL, then save the index with the new CRL number.  Call with the
    directory locked.
    """
    revoked: dict[int, datetime.datetime] = {}
    previous = _load_existing_crl(ca)
    previous_number = 0
    if previous is not None:
        for r in previous:
            revoked[r.serial_number] = r.revocation_date_utc
        try:
            previous_number = previous.extensions.get_extension_for_class(
                x509.CRLNumber
            ).value.crl_number
        except x509.ExtensionNotFound:
            pass
    for e in index.entries:
        if e.revoked_at is not None:
            revoked.setdefault(e.serial, e.revoked_at)
    number = max(previous_number, index.crl_number) + 1
    next_update = now + datetime.timedelta(days=crl_days)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(ca.authority_key_identifier(), critical=False)
    )
    for revoked_serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(revoked_serial)
            .revocation_date(when)
            .build()
        )
    crl = builder.sign(ca.key, _signature_hash(ca.key))
    crl_path = ca.directory / CRL_FILE
    # The CRL first: if the index write failed, the next run still finds the
    # revocation in the CRL and keeps it.
    _write_replace(crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    index.crl_number = number
    _save_index(ca.directory, index)
    return crl_path, number, next_update


@dataclass
class CrlResult:
    """
    What L{refresh_crl} did.

    @ivar crl: the CRL file written.
    @ivar crl_number: its number.
    @ivar next_update: when relying parties should stop trusting it.
    @ivar revoked: how many certificates it lists.
    """

    crl: Path
    crl_number: int
    next_update: datetime.datetime
    revoked: int


def refresh_crl(directory: Path, *, crl_days: int = CRL_DAYS) -> CrlResult:
    """
    Re-sign C{crl.pem} (or write a first, empty one) without revoking anything.

    A CRL past its nextUpdate makes OpenSSL refuse I{every} client, so run
    this from cron well within C{crl_days}; an empty CRL also lets the proxy
    start with C{--crl} before anything was revoked.
    """
    directory = Path(directory)
    crl_days = _positive_days(crl_days, "--crl-days")
    ca = load_ca(directory)
    with _locked(directory):
        index = _load_index(directory)
        index.add(_ca_entry(ca))
        path, number, next_update = _sign_crl(ca, index, _now(), crl_days)
    crl = x509.load_pem_x509_crl(path.read_bytes())
    return CrlResult(path, number, next_update, len(list(crl)))


def list_certificates(directory: Path) -> list[IndexEntry]:
    """
    The certificates recorded in C{directory}'s index, the CA first.

    A CA made by hand (no index yet) still lists its own certificate.
    """
    directory = Path(directory)
    ca = _load_ca_certificate(directory)
    index = _load_index(directory)
    if index.find(ca.serial_number) is None:
        index.entries.insert(0, IndexEntry.for_certificate(ca, "ca", CA_CERT))
    return sorted(index.entries, key=lambda e: e.kind != "ca")


def _load_ca_certificate(directory: Path) -> x509.Certificate:
    """The CA certificate, for read-only commands that must work without reading the key."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PkiError(
            f"{directory}: no such CA directory (create one with: mtlsproxy pki init {directory})"
        )
    path = directory / CA_CERT
    if not path.exists():
        raise PkiError(
            f"{directory}: not a CA directory, {CA_CERT} is missing "
            f"(create one with: mtlsproxy pki init {directory})"
        )
    return _load_cert_file(path)
