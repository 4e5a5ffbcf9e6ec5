"""
Pure: the verified client certificate -> L{ClientIdentity} -> identity headers.

The backend trusts these headers blindly, so the encoding rules live here, in
one place, tested without a reactor: a CA can sign any string, and no string
may break the header block it is written into.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

CN_HEADER = b"X-Client-Cert-CN"

# Printable ASCII stays as it is, except "%" (the escape character itself).
_SAFE = frozenset(range(0x20, 0x7F)) - {ord("%")}
_ENCODED: tuple[bytes, ...] = tuple(
    bytes([b]) if b in _SAFE else b"%%%02X" % b for b in range(256)
)


@dataclass(frozen=True)
class ClientIdentity:
    """
    What the proxy tells the backend about a verified client.

    @ivar cn: the subject's common name, or C{None} when the subject has none.
        With several CNs, the last one (the most specific in the usual
        most-significant-first order) is taken.
    """

    cn: str | None


def identity_from_certificate(cert: x509.Certificate) -> ClientIdentity:
    """Read the identity out of a certificate that OpenSSL has already verified."""
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn: str | None = None
    if values:
        value = values[-1].value
        cn = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return ClientIdentity(cn=cn)


def encode_header_value(value: str) -> bytes:
    """
    Percent-encode everything outside printable ASCII, and C{%}, as UTF-8.

    CR, LF and NUL become C{%0D}, C{%0A} and C{%00}, so the value can never end
    the header line or start a new header; non-ASCII text survives as UTF-8
    that the backend can decode with any URL-unquoting function.
    """
    return b"".join([_ENCODED[b] for b in value.encode("utf-8", "surrogatepass")])


def identity_headers(identity: ClientIdentity | None) -> list[tuple[bytes, bytes]]:
    """The headers the backend receives for this client: none for an anonymous one."""
    if identity is None or identity.cn is None:
        return []
    return [(CN_HEADER, encode_header_value(identity.cn))]
