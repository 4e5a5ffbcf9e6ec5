"""
Certificate, key, keystore, truststore and CRL files -> cryptography objects.

This module is pure: it reads files and parses them, nothing else.  It exists
so that every way a file can be wrong ends as one L{CertificateLoadError}
naming the option, the file and the problem in an operator's words, instead
of a raw cryptography or OpenSSL exception at start-up or, worse, on reload.

Trust is only ever what the operator configured: an empty CA file is an error
(an empty trust list must never mean "trust everyone", Traefik CVE-2022-46153)
and the system trust store is never consulted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from .config import Config
from .errors import CertificateLoadError

#: The private key types a TLS 1.2/1.3 server can sign its handshake with
#: (DSA is left out: no TLS 1.3 support and no DSS suite in L{tls}'s list).
ServerKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
_SERVER_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)
_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


@dataclass(frozen=True)
class ServerIdentity:
    """
    What the server presents: its private key, its certificate and the
    intermediate certificates sent after it (issuer first).
    """

    key: ServerKey
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()


def _read(option: str, path: Path) -> bytes:
    """Read a whole file, turning the usual OS errors into operator words."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateLoadError(option, str(path), "no such file") from None
    except PermissionError:
        raise CertificateLoadError(option, str(path), "permission denied") from None
    except IsADirectoryError:
        raise CertificateLoadError(option, str(path), "is a directory, not a file") from None
    except OSError as e:
        raise CertificateLoadError(option, str(path), f"cannot read: {e.strerror or e}") from None


def _describe(cert: x509.Certificate) -> str:
    """A short name for a certificate in messages: its subject."""
    return cert.subject.rfc4514_string() or "(empty subject)"


def _pem_certificates(option: str, path: Path, data: bytes) -> list[x509.Certificate]:
    """
    Every C{CERTIFICATE} block of a PEM file, in file order.

    Other PEM blocks (a key in a combined file) are skipped.  A file that is
    not PEM at all is an error; a PEM or empty file without certificates gives
    an empty list, so that each caller can say why that matters.
    """
    blocks = _PEM_CERT.findall(data)
    if not blocks and data.strip() and b"-----BEGIN" not in data:
        try:
            x509.load_der_x509_certificate(data)
        except ValueError:
            raise CertificateLoadError(option, str(path), "not a PEM certificate") from None
        raise CertificateLoadError(
            option,
            str(path),
            "not a PEM certificate (it is DER; convert it with "
            "'openssl x509 -inform DER -in FILE -out FILE.pem')",
        )
    certs = []
    for number, block in enumerate(blocks, start=1):
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError as e:
            raise CertificateLoadError(
                option, str(path), f"certificate #{number} is not a valid PEM certificate ({e})"
            ) from None
    return certs


def _check_key_matches(
    option: str, path: Path, key: ServerKey, cert: x509.Certificate, cert_path: Path
) -> None:
    """Refuse a key that is not the one the certificate was issued for."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    try:
        cert_public = cert.public_key().public_bytes(der, spki)
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateLoadError(
            option, str(cert_path), "certificate has a public key type that is not supported"
        ) from None
    if key.public_key().public_bytes(der, spki) != cert_public:
        where = "" if cert_path == path else f" {cert_path}"
        raise CertificateLoadError(
            option,
            str(path),
            f"private key does not match certificate{where} ({_describe(cert)})",
        )


def _server_key(option: str, path: Path, key: object) -> ServerKey:
    """Narrow a loaded private key to the types a TLS server can sign with."""
    if not isinstance(key, _SERVER_KEY_TYPES):
        raise CertificateLoadError(
            option, str(path), f"{type(key).__name__} keys cannot be used for a TLS server"
        )
    return key


def _order_chain(
    leaf: x509.Certificate, others: Iterable[x509.Certificate]
) -> tuple[x509.Certificate, ...]:
    """
    Put the chain in the order TLS wants (each certificate's issuer next).

    PKCS#12 files do not promise any order for their extra certificates;
    certificates that do not fit the path are kept, at the end.
    """
    remaining = [c for c in others if c != leaf]
    ordered: list[x509.Certificate] = []
    current = leaf
    while current.issuer != current.subject:
        issuer = next((c for c in remaining if c.subject == current.issuer), None)
        if issuer is None:
            break
        remaining.remove(issuer)
        ordered.append(issuer)
        current = issuer
    return (*ordered, *remaining)


def _load_pkcs12(
    option: str, path: Path, data: bytes, password: bytes | None, what: str
) -> pkcs12.PKCS12KeyAndCertificates:
    """
    Open a PKCS#12 file.  Without a configured password, try none and then the
    empty one, which is what C{openssl pkcs12 -passout pass:} writes.
    """
    for attempt in (password,) if password is not None else (None, b""):
        try:
            return pkcs12.load_pkcs12(data, attempt)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    hint = "" if password is not None else f" (no password was given for {option})"
    raise CertificateLoadError(
        option, str(path), f"wrong {what} password or not a PKCS#12 file{hint}"
    )


def _load_keystore(config: Config, path: Path) -> ServerIdentity:
    option = "--keystore"
    store = _load_pkcs12(option, path, _read(option, path), config.keystore_password, "keystore")
    if store.key is None:
        raise CertificateLoadError(option, str(path), "holds no private key")
    if store.cert is None:
        raise CertificateLoadError(option, str(path), "holds no certificate for its private key")
    key = _server_key(option, path, store.key)
    cert = store.cert.certificate
    _check_key_matches(option, path, key, cert, path)
    chain = _order_chain(cert, (c.certificate for c in store.additional_certs))
    return ServerIdentity(key, cert, chain)


def _load_pem_identity(cert_path: Path, key_path: Path) -> ServerIdentity:
    certs = _pem_certificates("--cert", cert_path, _read("--cert", cert_path))
    if not certs:
        raise CertificateLoadError("--cert", str(cert_path), "holds no certificate")
    data = _read("--key", key_path)
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography's way of saying "this key is encrypted".
        raise CertificateLoadError(
            "--key",
            str(key_path),
            "encrypted private keys are not supported; decrypt it "
            "('openssl pkey -in KEY -out KEY.plain') or use --keystore with a password",
        ) from None
    except UnsupportedAlgorithm:
        raise CertificateLoadError(
            "--key", str(key_path), "private key type is not supported"
        ) from None
    except ValueError:
        raise CertificateLoadError("--key", str(key_path), "not a PEM private key") from None
    key = _server_key("--key", key_path, loaded)
    _check_key_matches("--key", key_path, key, certs[0], cert_path)
    return ServerIdentity(key, certs[0], tuple(certs[1:]))


def load_server_identity(config: Config) -> ServerIdentity:
    """
    Load the server's key and certificate chain from C{--cert}/C{--key} (PEM)
    or from C{--keystore} (PKCS#12), and check that the key fits the certificate.

    @raise CertificateLoadError: naming the option and file that is wrong.
    """
    if config.keystore is not None:
        return _load_keystore(config, config.keystore)
    if config.cert is None or config.key is None:
        raise CertificateLoadError("--cert", "(none)", "give --cert and --key, or --keystore")
    return _load_pem_identity(config.cert, config.key)


def _check_is_ca(option: str, path: Path, certs: Sequence[x509.Certificate]) -> None:
    """
    Refuse a trust list holding a certificate that says it is not a CA.

    Such a file is almost always a mistake (the client's or server's own
    certificate given as C{--ca}); OpenSSL would not accept it as an issuer.
    Certificates without basicConstraints are left alone: old roots lack it.
    """
    for cert in certs:
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            continue
        except ValueError as e:
            raise CertificateLoadError(
                option, str(path), f"certificate {_describe(cert)} has invalid extensions ({e})"
            ) from None
        if not constraints.ca:
            raise CertificateLoadError(
                option,
                str(path),
                f"certificate {_describe(cert)} is not a CA certificate "
                "(basicConstraints CA:FALSE); give the CA that issues client certificates",
            )


def load_client_cas(config: Config) -> tuple[x509.Certificate, ...]:
    """
    Load the CAs that client certificates must chain to, from C{--ca} (a PEM
    bundle) or C{--truststore} (PKCS#12, as written by C{keytool -importcert
    -storetype PKCS12}).

    @raise CertificateLoadError: if the file is unreadable, malformed, holds a
        non-CA certificate or holds no certificate at all.
    """
    if config.truststore is not None:
        option, path = "--truststore", config.truststore
        store = _load_pkcs12(
            option, path, _read(option, path), config.truststore_password, "truststore"
        )
        certs = [c.certificate for c in store.additional_certs]
        if store.cert is not None:
            certs.insert(0, store.cert.certificate)
    elif config.ca is not None:
        option, path = "--ca", config.ca
        certs = _pem_certificates(option, path, _read(option, path))
    else:
        raise CertificateLoadError("--ca", "(none)", "give --ca or --truststore")
    if not certs:
        raise CertificateLoadError(
            option, str(path), "holds no certificate; refusing to trust everyone"
        )
    _check_is_ca(option, path, certs)
    return tuple(certs)


def _load_crl_file(path: Path) -> list[x509.CertificateRevocationList]:
    data = _read("--crl", path)
    blocks = _PEM_CRL.findall(data)
    try:
        if blocks:
            return [x509.load_pem_x509_crl(block) for block in blocks]
        if b"-----BEGIN" in data:
            labels = b", ".join(sorted(set(_PEM_LABEL.findall(data)))).decode("ascii")
            raise CertificateLoadError("--crl", str(path), f"holds no CRL (found {labels})")
        if not data.strip():
            raise CertificateLoadError("--crl", str(path), "is empty; it holds no CRL")
        return [x509.load_der_x509_crl(data)]
    except ValueError as e:
        raise CertificateLoadError(
            "--crl", str(path), f"not a PEM or DER certificate revocation list ({e})"
        ) from None


def load_crls(paths: Iterable[Path]) -> tuple[x509.CertificateRevocationList, ...]:
    """
    Load certificate revocation lists, PEM (one or more per file) or DER.

    @raise CertificateLoadError: naming C{--crl} and the file.
    """
    crls: list[x509.CertificateRevocationList] = []
    for path in paths:
        crls.extend(_load_crl_file(path))
    return tuple(crls)
