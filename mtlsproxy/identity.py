"""
Pure: the verified client certificate -> L{ClientIdentity} -> identity headers.

The backend trusts these headers blindly, so the encoding rules live here, in
one place, tested without a reactor: a CA can sign any string, and no string
may break the header block it is written into, forge a second value, or
become a different identity on the way (docs/identity.md has the table of
hostile certificates and what each one produces).
"""

from __future__ import annotations

import base64
import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID, ObjectIdentifier

# -- header names ---------------------------------------------------------

CN_HEADER = b"X-Client-Cert-CN"
SUBJECT_HEADER = b"X-Client-Cert-Subject"
ISSUER_HEADER = b"X-Client-Cert-Issuer"
SERIAL_HEADER = b"X-Client-Cert-Serial"
FINGERPRINT_HEADER = b"X-Client-Cert-Fingerprint"
SAN_HEADER = b"X-Client-Cert-SAN"
NOT_BEFORE_HEADER = b"X-Client-Cert-Not-Before"
NOT_AFTER_HEADER = b"X-Client-Cert-Not-After"
#: --forward-cert pem: nginx's $ssl_client_escaped_cert
PEM_HEADER = b"X-Client-Cert"
#: --forward-cert xfcc: Envoy's format
XFCC_HEADER = b"X-Forwarded-Client-Cert"
#: --forward-cert rfc9440
RFC9440_CERT_HEADER = b"Client-Cert"
RFC9440_CHAIN_HEADER = b"Client-Cert-Chain"

#: C{forward-headers} names -> header, in the order the headers are sent.
HEADER_NAMES: dict[str, bytes] = {
    "cn": CN_HEADER,
    "subject": SUBJECT_HEADER,
    "issuer": ISSUER_HEADER,
    "serial": SERIAL_HEADER,
    "fingerprint": FINGERPRINT_HEADER,
    "san": SAN_HEADER,
    "not-before": NOT_BEFORE_HEADER,
    "not-after": NOT_AFTER_HEADER,
}

#: What C{forward-headers} is when the operator says nothing: all of them.
DEFAULT_FORWARD_HEADERS: tuple[str, ...] = tuple(HEADER_NAMES)

ForwardCert = Literal["none", "pem", "xfcc", "rfc9440"]
FORWARD_CERT_MODES: tuple[ForwardCert, ...] = ("none", "pem", "xfcc", "rfc9440")


def reserved_extra_names() -> frozenset[bytes]:
    """
    Header names (lower case, C{-} spelling) that only mtlsproxy may send and
    that L{mtlsproxy.http.headers.is_reserved} does not already cover.

    Everything else mtlsproxy sets starts with C{X-Client-Cert} or is
    C{X-Forwarded-Client-Cert}, which are stripped already; the RFC 9440 names
    are not, and a backend that reads C{Client-Cert} must never see one a
    client wrote.  They are stripped whatever C{--forward-cert} says, as
    RFC 9440 section 4 asks.
    """
    return frozenset({b"client-cert", b"client-cert-chain"})


# -- value encoding -------------------------------------------------------

# Printable ASCII stays as it is, except "%" (the escape character itself).
_SAFE = frozenset(range(0x20, 0x7F)) - {ord("%")}
_ENCODED: tuple[bytes, ...] = tuple(
    bytes([b]) if b in _SAFE else b"%%%02X" % b for b in range(256)
)


def encode_header_value(value: str) -> bytes:
    """
    Percent-encode everything outside printable ASCII, and C{%}, as UTF-8.

    CR, LF and NUL become C{%0D}, C{%0A} and C{%00}, so the value can never end
    the header line or start a new header; non-ASCII text survives as UTF-8
    that the backend can decode with any URL-unquoting function.  A space at
    either end becomes C{%20}: HTTP parsers strip it, and C{" alice"} must not
    arrive as C{alice}.
    """
    encoded = b"".join([_ENCODED[b] for b in value.encode("utf-8", "surrogatepass")])
    if encoded.startswith(b" "):
        encoded = b"%20" + encoded[1:]
    if encoded.endswith(b" "):
        encoded = encoded[:-1] + b"%20"
    return encoded


def _encode_list_item(value: str) -> bytes:
    """L{encode_header_value}, plus C{,}: the item separator of list headers."""
    return encode_header_value(value).replace(b",", b"%2C")


def _rfc4514_ascii(dn: str) -> str:
    """
    An RFC 4514 string with every character outside printable ASCII written
    as C{\\XX} UTF-8 hex pairs (RFC 4514 section 2.4), as OpenSSL's
    C{XN_FLAG_RFC2253} and so Envoy and nginx do: still a valid DN, now ASCII.
    """
    out: list[str] = []
    for ch in dn:
        if 0x20 <= ord(ch) < 0x7F:
            out.append(ch)
        else:
            out.append("".join(f"\\{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
    return "".join(out)


#: Attribute names as OpenSSL prints them (C{OBJ_nid2sn}, which nginx's
#: C{$ssl_client_s_dn} and Envoy's XFCC Subject use), for the attributes
#: cryptography only knows by number.  cryptography already writes CN, L,
#: ST, O, OU, C, DC and UID the same way.
OPENSSL_SHORT_NAMES: dict[ObjectIdentifier, str] = {
    NameOID.STREET_ADDRESS: "street",
    NameOID.SURNAME: "SN",
    NameOID.GIVEN_NAME: "GN",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.TITLE: "title",
    NameOID.INITIALS: "initials",
    NameOID.GENERATION_QUALIFIER: "generationQualifier",
    NameOID.X500_UNIQUE_IDENTIFIER: "x500UniqueIdentifier",
    NameOID.DN_QUALIFIER: "dnQualifier",
    NameOID.PSEUDONYM: "pseudonym",
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.JURISDICTION_COUNTRY_NAME: "jurisdictionC",
    NameOID.JURISDICTION_STATE_OR_PROVINCE_NAME: "jurisdictionST",
    NameOID.JURISDICTION_LOCALITY_NAME: "jurisdictionL",
    NameOID.BUSINESS_CATEGORY: "businessCategory",
    NameOID.POSTAL_ADDRESS: "postalAddress",
    NameOID.POSTAL_CODE: "postalCode",
    NameOID.ORGANIZATION_IDENTIFIER: "organizationIdentifier",
    NameOID.UNSTRUCTURED_NAME: "unstructuredName",
    NameOID.INN: "INN",
    NameOID.OGRN: "OGRN",
    NameOID.SNILS: "SNILS",
    ObjectIdentifier("2.5.4.13"): "description",
    ObjectIdentifier("2.5.4.18"): "postOfficeBox",
    ObjectIdentifier("2.5.4.41"): "name",
    ObjectIdentifier("2.5.4.72"): "role",
    ObjectIdentifier("1.2.840.113549.1.9.8"): "unstructuredAddress",
}
_CRYPTOGRAPHY_NAMES = frozenset(
    {
        NameOID.COMMON_NAME,
        NameOID.LOCALITY_NAME,
        NameOID.STATE_OR_PROVINCE_NAME,
        NameOID.ORGANIZATION_NAME,
        NameOID.ORGANIZATIONAL_UNIT_NAME,
        NameOID.COUNTRY_NAME,
        NameOID.DOMAIN_COMPONENT,
        NameOID.USER_ID,
    }
)


def _der_content(der: bytes) -> tuple[bytes, bytes]:
    """The content of the first DER TLV of C{der}, and what follows it."""
    if len(der) < 2:
        raise ValueError("truncated DER")
    first = der[1]
    start = 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or len(der) < 2 + count:
            raise ValueError("bad DER length")
        length = int.from_bytes(der[2 : 2 + count], "big")
        start = 2 + count
    end = start + length
    if end > len(der):
        raise ValueError("truncated DER")
    return der[start:end], der[end:]


def _attribute_value_der(attribute: x509.NameAttribute[Any]) -> bytes:
    """
    The DER of one attribute value, string type and all: cryptography keeps
    the type, so a one-attribute name encoded by it holds exactly the
    certificate's value (Name / SET / SEQUENCE / type OID, value).
    """
    name = x509.Name([x509.RelativeDistinguishedName([attribute])])
    rdn, _ = _der_content(name.public_bytes())
    pair, _ = _der_content(rdn)
    pair_body, _ = _der_content(pair)
    _, value = _der_content(pair_body)
    return value


def _attribute_string(attribute: x509.NameAttribute[Any]) -> str:
    """
    One C{type=value} of an RFC 4514 string, as OpenSSL writes it: the short
    name where one is known, escaped text; else (an attribute type OpenSSL
    has no name for, or a value that is not a string) the dotted OID or
    name with C{#} and the hex of the value's DER, the only form RFC 4514
    section 2.4 allows there.
    """
    oid = attribute.oid
    name = OPENSSL_SHORT_NAMES.get(oid)
    known = name is not None or oid in _CRYPTOGRAPHY_NAMES
    if known and isinstance(attribute.value, str):
        return attribute.rfc4514_string(OPENSSL_SHORT_NAMES)
    try:
        der = _attribute_value_der(attribute)
    except (ValueError, TypeError):  # pragma: no cover - cryptography encodes what it decoded
        text = attribute.value
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        der = b"\x0c" + _der_length(len(raw)) + raw  # the same text as a UTF8String
    return f"{name or attribute.rfc4514_attribute_name}=#{der.hex().upper()}"


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def dn_string(name: x509.Name) -> str:
    """
    A distinguished name as RFC 4514 text, most specific first, exactly as
    OpenSSL's C{XN_FLAG_RFC2253} (so nginx and Envoy) writes it apart from
    non-ASCII, which stays text here: C{emailAddress=}, C{serialNumber=},
    C{GN=}, not the dotted OIDs with plain values cryptography writes, which
    RFC 4514 does not allow (a dotted type needs a C{#hex} BER value).  Like
    OpenSSL, the attributes of a multi-valued RDN are reversed too.

    @raise ValueError: if cryptography cannot decode a value.
    """
    return ",".join(
        "+".join(_attribute_string(attribute) for attribute in reversed(list(rdn)))
        for rdn in reversed(name.rdns)
    )


def _uri_ascii(value: str) -> str:
    """
    Percent-encode what may not appear in a URI (controls, space, non-ASCII,
    C{"}, C{\\}): what is left never needs escaping inside XFCC quotes.
    """
    return quote(value, safe="".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\'))


# -- the identity ---------------------------------------------------------


@dataclass(frozen=True)
class ClientIdentity:
    """
    What the proxy tells the backend about a verified client.

    Only C{cn} takes part in equality, so that an identity built by hand
    (C{ClientIdentity(cn="alice")}) still compares equal to one read from a
    certificate with that CN, as the first version promised; compare
    C{fingerprint} to tell two certificates apart.

    @ivar cn: the subject's common name, or C{None} when the subject has none.
        With several CNs, the last one (the most specific in the usual
        most-significant-first order) is taken.
    @ivar ous: every organizational unit of the subject, in certificate order.
    @ivar subject: the subject as an RFC 4514 string as OpenSSL writes it
        (C{CN=alice,emailAddress=alice@example.com,OU=eng,O=Example}; see
        L{dn_string}).
    @ivar issuer: the issuer, written the same way.
    @ivar serial: the serial number in upper-case hex, whole bytes (C{0A1B}),
        as OpenSSL and nginx print it; C{-} first for a (non-conforming)
        negative serial.
    @ivar fingerprint: SHA-256 of the DER certificate, lower-case hex.
    @ivar sans: the subjectAltNames of the kinds the policy and the headers
        understand, typed: C{DNS:x}, C{URI:spiffe://...}, C{email:a@b},
        C{IP:192.0.2.1}; other kinds are left out.
    @ivar not_before: start of validity (aware, UTC).
    @ivar not_after: end of validity (aware, UTC).
    @ivar cert_der: the client certificate, DER.
    @ivar chain_der: the verified chain above it, DER, issuer first, as OpenSSL
        built it (trust anchor included); empty when unknown, e.g. on a
        resumed TLS session (see L{IdentityCache}).
    @ivar problems: parts of the certificate that could not be read (their
        fields are left empty); for the log, never for the backend.
    """

    cn: str | None
    ous: tuple[str, ...] = field(default=(), compare=False)
    subject: str | None = field(default=None, compare=False)
    issuer: str | None = field(default=None, compare=False)
    serial: str | None = field(default=None, compare=False)
    fingerprint: str | None = field(default=None, compare=False)
    sans: tuple[str, ...] = field(default=(), compare=False)
    not_before: datetime | None = field(default=None, compare=False)
    not_after: datetime | None = field(default=None, compare=False)
    cert_der: bytes | None = field(default=None, compare=False, repr=False)
    chain_der: tuple[bytes, ...] = field(default=(), compare=False, repr=False)
    problems: tuple[str, ...] = field(default=(), compare=False)

    @property
    def cert_pem(self) -> str | None:
        """The client certificate in PEM, as C{openssl x509} writes it."""
        return None if self.cert_der is None else _pem(self.cert_der)

    @property
    def chain_pem(self) -> str:
        """The chain above the client certificate in PEM, issuer first."""
        return "".join(_pem(der) for der in self.chain_der)


def _pem(der: bytes) -> str:
    b64 = base64.b64encode(der).decode("ascii")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


class UnreadableCertificate(Exception):
    """
    OpenSSL verified a certificate that cryptography cannot parse (for
    example a BMPString CN holding half a UTF-16 surrogate pair).

    The proxy then knows nothing it could tell the backend or check a rule
    against, so the connection is refused ("unreadable certificate").
    """


def _text(value: str | bytes) -> str:
    """Attribute values are text except for a few binary types; show those as hex."""
    return value if isinstance(value, str) else "#" + value.hex()


def _serial_hex(serial: int) -> str:
    sign = "-" if serial < 0 else ""
    digits = f"{abs(serial):X}"
    if len(digits) % 2:
        digits = "0" + digits
    return sign + digits


def _typed_sans(general_names: Iterable[x509.GeneralName]) -> tuple[str, ...]:
    sans: list[str] = []
    for name in general_names:
        if isinstance(name, x509.DNSName):
            sans.append("DNS:" + name.value)
        elif isinstance(name, x509.UniformResourceIdentifier):
            sans.append("URI:" + name.value)
        elif isinstance(name, x509.RFC822Name):
            sans.append("email:" + name.value)
        elif isinstance(name, x509.IPAddress):
            sans.append(f"IP:{name.value}")
    return tuple(sans)


def identity_from_certificate(
    cert: x509.Certificate, chain: Sequence[x509.Certificate] = ()
) -> ClientIdentity:
    """
    Read the identity out of a certificate that OpenSSL has already verified.

    An extension cryptography cannot read (a malformed subjectAltName, say)
    leaves its field empty and is named in C{problems}: an empty field
    matches no C{allow-*} entry, so it can only narrow what the client may do.

    @param chain: the verified chain as C{get_verified_chain()} returns it,
        leaf first (the leaf is dropped here) and trust anchor last.
    @raise UnreadableCertificate: if the subject or issuer cannot be decoded
        (an invalid UTF8String, say): there is no identity to pass on.
    """
    problems: list[str] = []
    der = cert.public_bytes(Encoding.DER)

    # cryptography decodes names lazily: an invalid T61String or IA5String
    # surfaces only here.  Without a subject there is nothing to identify.
    # It also warns about values longer than X.520 allows (a CN over 64
    # characters), once per client; the length is no problem here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            cn = _text(values[-1].value) if values else None
            ous = tuple(
                _text(a.value)
                for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
            )
            subject = dn_string(cert.subject)
        except ValueError as e:
            raise UnreadableCertificate(f"subject unreadable: {e}") from None
        try:
            issuer = dn_string(cert.issuer)
        except ValueError as e:
            raise UnreadableCertificate(f"issuer unreadable: {e}") from None

    sans: tuple[str, ...] = ()
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        sans = _typed_sans(ext.value)
    except x509.ExtensionNotFound:
        pass
    except Exception as e:
        problems.append(f"extensions unreadable: {e}")

    serial: str | None = None
    try:
        serial = _serial_hex(cert.serial_number)
    except Exception as e:  # pragma: no cover - defensive
        problems.append(f"serial unreadable: {e}")

    not_before: datetime | None = None
    not_after: datetime | None = None
    try:
        not_before = cert.not_valid_before_utc
        not_after = cert.not_valid_after_utc
    except Exception as e:  # pragma: no cover - defensive
        problems.append(f"validity unreadable: {e}")

    chain_der = tuple(c.public_bytes(Encoding.DER) for c in chain)
    if chain_der and chain_der[0] == der:
        chain_der = chain_der[1:]

    return ClientIdentity(
        cn=cn,
        ous=ous,
        subject=subject,
        issuer=issuer,
        serial=serial,
        fingerprint=hashlib.sha256(der).hexdigest(),
        sans=sans,
        not_before=not_before,
        not_after=not_after,
        cert_der=der,
        chain_der=chain_der,
        problems=tuple(problems),
    )


def identity_from_der(leaf: bytes, chain: Sequence[bytes] = ()) -> ClientIdentity:
    """
    L{identity_from_certificate} for DER bytes.

    @raise UnreadableCertificate: if cryptography cannot parse C{leaf}.  An
        unparseable certificate in C{chain} only empties the chain.
    """
    try:
        cert = x509.load_der_x509_certificate(leaf)
    except ValueError as e:
        raise UnreadableCertificate(str(e)) from None
    parsed: list[x509.Certificate] = []
    problem: str | None = None
    try:
        parsed = [x509.load_der_x509_certificate(c) for c in chain]
    except ValueError as e:
        problem = f"chain unreadable: {e}"
    identity = identity_from_certificate(cert, parsed)
    if problem is not None:
        identity = _with(identity, problems=(*identity.problems, problem))
    return identity


def _with(identity: ClientIdentity, **changes: Any) -> ClientIdentity:
    return replace(identity, **changes)


class IdentityCache:
    """
    Identities by certificate fingerprint, least recently used dropped first.

    OpenSSL keeps the peer certificate in a TLS session but not the verified
    chain: on a resumed connection C{get_verified_chain()} is C{None}.  The
    interface promises that a resumed connection carries the same identity,
    so the identity built at the full handshake is kept here and found again
    from the leaf.  The cache is per process, like OpenSSL's session cache;
    a miss (a session from before a reload, a TLS 1.3 ticket made by another
    worker) rebuilds the identity from the leaf alone, without the chain.
    Intermediates are shared between entries, so an entry costs little more
    than its leaf.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, ClientIdentity] = OrderedDict()
        self._interned: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, leaf_der: bytes) -> ClientIdentity | None:
        key = hashlib.sha256(leaf_der).digest()
        identity = self._entries.get(key)
        if identity is not None:
            self._entries.move_to_end(key)
        return identity

    def put(self, identity: ClientIdentity) -> None:
        if identity.cert_der is None:
            return
        key = hashlib.sha256(identity.cert_der).digest()
        chain = tuple(self._interned.setdefault(der, der) for der in identity.chain_der)
        self._entries[key] = _with(identity, chain_der=chain)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        if len(self._interned) > 4 * self.size:  # pragma: no cover - many CAs
            self._interned.clear()


def identity_from_connection(
    conn: Any, cache: IdentityCache | None = None
) -> ClientIdentity | None:
    """
    The identity of the peer of a pyOpenSSL server connection after its handshake.

    @param conn: an C{OpenSSL.SSL.Connection} (anything with its
        C{get_peer_certificate()} and C{get_verified_chain()}).
    @param cache: where identities are remembered for resumed sessions.
    @return: C{None} for a client that sent no certificate.
    @raise UnreadableCertificate: the certificate was verified by OpenSSL but
        cannot be parsed; refuse the connection.
    """
    peer = conn.get_peer_certificate()
    if peer is None:
        return None
    try:
        leaf = peer.to_cryptography()
    except ValueError as e:
        raise UnreadableCertificate(str(e)) from None
    leaf_der = leaf.public_bytes(Encoding.DER)
    verified = conn.get_verified_chain()
    if not verified and cache is not None:
        remembered = cache.get(leaf_der)
        if remembered is not None:
            return remembered
    chain: list[x509.Certificate] = []
    problem: str | None = None
    try:
        chain = [c.to_cryptography() for c in verified or ()]
    except ValueError as e:
        problem = f"chain unreadable: {e}"
    identity = identity_from_certificate(leaf, chain)
    if problem is not None:
        identity = _with(identity, problems=(*identity.problems, problem))
    if cache is not None and verified:
        cache.put(identity)
    return identity


# -- headers --------------------------------------------------------------


def _header_key(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    if key.startswith("x-client-cert-"):
        key = key[len("x-client-cert-") :]
    return key


def parse_header_names(values: Iterable[str]) -> tuple[str, ...]:
    """
    C{forward-headers} values -> the canonical names, in sending order.

    Each value may hold several names separated by commas; a name is either
    the short one (C{subject}) or the header itself (C{X-Client-Cert-Subject}),
    in any case.

    @raise ValueError: naming the unknown entry and the valid ones.
    """
    chosen: set[str] = set()
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            key = _header_key(part)
            if key not in HEADER_NAMES:
                raise ValueError(
                    f"unknown header {part.strip()!r} (choose from {', '.join(HEADER_NAMES)})"
                )
            chosen.add(key)
    return tuple(name for name in HEADER_NAMES if name in chosen)


@dataclass(frozen=True)
class HeaderSettings:
    """
    Which identity headers the backend receives.

    @ivar headers: names from L{HEADER_NAMES}; sent in that table's order
        whatever the order here, so C{X-Client-Cert-CN} always comes first.
    @ivar forward_cert: also send the certificate itself: C{pem}
        (C{X-Client-Cert}, as nginx's C{$ssl_client_escaped_cert}), C{xfcc}
        (Envoy's C{X-Forwarded-Client-Cert}) or C{rfc9440} (C{Client-Cert} and
        C{Client-Cert-Chain}).
    """

    headers: tuple[str, ...] = DEFAULT_FORWARD_HEADERS
    forward_cert: ForwardCert = "none"

    def __post_init__(self) -> None:
        unknown = [h for h in self.headers if h not in HEADER_NAMES]
        if unknown:
            raise ValueError(f"unknown identity headers: {', '.join(unknown)}")
        if self.forward_cert not in FORWARD_CERT_MODES:
            raise ValueError(f"forward-cert must be one of {', '.join(FORWARD_CERT_MODES)}")


#: What C{identity_headers(identity)} sends without settings: the CN only,
#: as before C{forward-headers} existed.
CN_ONLY = HeaderSettings(headers=("cn",))


def _timestamp(value: datetime) -> str:
    """RFC 3339 in UTC with a C{Z}: sortable, and parsed by every date library."""
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def xfcc_value(identity: ClientIdentity) -> bytes | None:
    """
    Envoy's C{X-Forwarded-Client-Cert} element for this client.

    C{Hash=<sha256 hex>;Cert="<url-encoded PEM>";Subject="<RFC 4514>";URI=...;DNS=...}:
    keys as Envoy sends them.  The Subject is the RFC 4514 string between
    double quotes, verbatim, as Envoy writes OpenSSL's: RFC 4514 already
    escapes C{"} and C{\\} inside values (C{\\"}, C{\\\\}), so the text is a
    valid RFC 9110 quoted-string as it stands and a second escape would
    only make it differ from Envoy's.  Its non-ASCII characters are RFC 4514
    C{\\XX} escapes.  URIs and DNS names are percent-encoded where they hold
    something a URI may not (C{"} and C{\\} included) and quoted when they
    hold C{,}, C{;} or C{=}.  So the value is printable ASCII and the element
    cannot be split into two.
    """
    if identity.fingerprint is None or identity.cert_pem is None:
        return None
    parts = [
        "Hash=" + identity.fingerprint,
        "Cert=" + _xfcc_quote(quote(identity.cert_pem, safe=""), always=True),
    ]
    if identity.subject is not None:
        parts.append("Subject=" + _xfcc_quote(_rfc4514_ascii(identity.subject), always=True))
    for san in identity.sans:
        kind, _, value = san.partition(":")
        if kind == "URI":
            parts.append("URI=" + _xfcc_quote(_uri_ascii(value)))
    for san in identity.sans:
        kind, _, value = san.partition(":")
        if kind == "DNS":
            parts.append("DNS=" + _xfcc_quote(_uri_ascii(value)))
    return ";".join(parts).encode("ascii")


def _quoted_string_body(value: str) -> bool:
    """
    Whether C{value} between double quotes is a valid RFC 9110
    quoted-string already: every C{"} is escaped and no C{\\} is left
    dangling at the end.  True of every RFC 4514 string (which escapes
    C{"} and C{\\} in values) and of every percent-encoded URI.
    """
    escaped = False
    for c in value:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            return False
    return not escaped


def _xfcc_quote(value: str, always: bool = False) -> str:
    """
    Double-quote a value holding C{,}, C{;}, C{=}, C{"}, C{\\} or a space
    (C{always}: whatever it holds), verbatim as Envoy does when the text is
    already a valid quoted-string body; else (never for what L{xfcc_value}
    passes) with C{\\} before C{"} and C{\\}, so the element can never be
    split whatever the value.
    """
    if not always and not any(c in value for c in ',;=" \\'):
        return value
    if not _quoted_string_body(value):
        value = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + value + '"'


def identity_headers(
    identity: ClientIdentity | None, settings: HeaderSettings | None = None
) -> list[tuple[bytes, bytes]]:
    """
    The headers the backend receives for this client: none for an anonymous one.

    Every value is printable ASCII.  The C{X-Client-Cert-*} values are
    percent-encoded UTF-8 (decode with any URL-unquoting function); in
    C{X-Client-Cert-SAN} the items are separated by C{", "} and a C{,} inside
    an item is C{%2C}.  A header whose value the certificate does not have
    (no CN, no SAN, an empty subject) is left out rather than sent empty.

    @param settings: which headers; without it only C{X-Client-Cert-CN}.
    """
    if identity is None:
        return []
    if settings is None:
        settings = CN_ONLY
    wanted = set(settings.headers)
    headers: list[tuple[bytes, bytes]] = []

    def add(name: str, value: bytes | None) -> None:
        if name in wanted and value:
            headers.append((HEADER_NAMES[name], value))

    def text(value: str | None) -> bytes | None:
        return None if value is None else encode_header_value(value)

    add("cn", text(identity.cn))
    add("subject", text(identity.subject))
    add("issuer", text(identity.issuer))
    add("serial", text(identity.serial))
    add("fingerprint", text(identity.fingerprint))
    add("san", b", ".join(_encode_list_item(s) for s in identity.sans))
    if identity.not_before is not None:
        add("not-before", _timestamp(identity.not_before).encode("ascii"))
    if identity.not_after is not None:
        add("not-after", _timestamp(identity.not_after).encode("ascii"))

    mode = settings.forward_cert
    if mode == "pem" and identity.cert_pem is not None:
        headers.append((PEM_HEADER, quote(identity.cert_pem, safe="").encode("ascii")))
    elif mode == "xfcc":
        value = xfcc_value(identity)
        if value is not None:
            headers.append((XFCC_HEADER, value))
    elif mode == "rfc9440" and identity.cert_der is not None:
        headers.append((RFC9440_CERT_HEADER, _sf_binary(identity.cert_der)))
        if identity.chain_der:
            chain = b", ".join(_sf_binary(der) for der in identity.chain_der)
            headers.append((RFC9440_CHAIN_HEADER, chain))
    return headers


def _sf_binary(der: bytes) -> bytes:
    """A structured-field Byte Sequence (RFC 8941 section 3.3.5): C{:base64:}."""
    return b":" + base64.b64encode(der) + b":"
