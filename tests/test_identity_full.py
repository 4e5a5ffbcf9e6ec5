"""
The full client identity and every header made from it, including the
hostile certificates of docs/identity.md: each row of that table is a test here.

Pure: certificates are built with cryptography; the few real handshakes run
OpenSSL over memory BIOs, without sockets or a reactor.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import re
import shutil
import subprocess
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from OpenSSL.crypto import FILETYPE_ASN1, load_certificate
from OpenSSL.crypto import Error as OpenSSLError

from mtlsproxy import tls
from mtlsproxy.certs import ServerIdentity
from mtlsproxy.config import Backend, Config
from mtlsproxy.http.headers import is_reserved, normalise
from mtlsproxy.identity import (
    CN_HEADER,
    DEFAULT_FORWARD_HEADERS,
    HEADER_NAMES,
    ClientIdentity,
    HeaderSettings,
    IdentityCache,
    UnreadableCertificate,
    _xfcc_quote,  # the guard itself, for values xfcc_value never makes
    encode_header_value,
    identity_from_certificate,
    identity_from_connection,
    identity_from_der,
    identity_headers,
    parse_header_names,
    reserved_extra_names,
    xfcc_value,
)

from . import certfactory
from .certfactory import Issued
from .e2e.extra_certs import parse_xfcc

A = x509.NameAttribute
ALL = HeaderSettings()

# -- builders -------------------------------------------------------------


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


_ECDSA_SHA256 = _tlv(0x30, _tlv(0x06, bytes.fromhex("2a8648ce3d040302")))


def resigned(cert: x509.Certificate, old: bytes, new: bytes, issuer: Issued) -> bytes:
    """
    C{cert} with C{old} replaced by C{new} (same length) in its to-be-signed
    part, signed again by C{issuer}: how a test gets a correctly signed
    certificate holding bytes that cryptography's builder refuses to write
    (half a surrogate pair in a BMPString, invalid UTF-8).
    """
    tbs = cert.tbs_certificate_bytes
    assert tbs.count(old) == 1 and len(old) == len(new)
    tbs = tbs.replace(old, new)
    assert isinstance(issuer.key, ec.EllipticCurvePrivateKey)
    signature = issuer.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _tlv(0x30, tbs + _ECDSA_SHA256 + _tlv(0x03, b"\x00" + signature))


def client(
    cn: str | None = "alice",
    *,
    attributes: Sequence[x509.NameAttribute] = (),
    sans: Sequence[x509.GeneralName] = (),
    ou: str | None = None,
    issuer: Issued | None = None,
) -> Issued:
    return certfactory.make_client(
        issuer or certfactory.make_ca(), cn, attributes=attributes, sans=sans, ou=ou
    )


def headers_of(identity: ClientIdentity, settings: HeaderSettings = ALL) -> dict[bytes, bytes]:
    return dict(identity_headers(identity, settings))


def assert_safe(headers: list[tuple[bytes, bytes]]) -> None:
    """Every header value is printable ASCII without surrounding blanks: one line, one value."""
    for name, value in headers:
        assert all(0x20 <= b < 0x7F for b in value), (name, value)
        assert value == value.strip(), (name, value)
        assert re.fullmatch(rb"[A-Za-z0-9-]+", name)


# -- the identity ---------------------------------------------------------


def test_full_identity_is_read_from_leaf_and_chain() -> None:
    """Every field comes from the client certificate; the chain drops the leaf it starts with."""
    root = certfactory.make_ca("Root")
    intermediate = certfactory.make_intermediate(root, "Issuing CA")
    issued = client(
        "alice",
        ou="eng",
        attributes=[A(NameOID.ORGANIZATIONAL_UNIT_NAME, "ops"), A(NameOID.ORGANIZATION_NAME, "Ex")],
        sans=[
            x509.DNSName("alice.example.com"),
            x509.UniformResourceIdentifier("spiffe://example.com/alice"),
            x509.RFC822Name("alice@example.com"),
            x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
            x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4")),
        ],
        issuer=intermediate,
    )
    identity = identity_from_certificate(issued.cert, [issued.cert, intermediate.cert, root.cert])
    assert identity.cn == "alice"
    assert identity.ous == ("ops", "eng")
    assert identity.subject == "CN=alice,OU=eng,O=Ex,OU=ops"
    assert identity.issuer == "CN=Issuing CA"
    assert identity.fingerprint == issued.cert.fingerprint(hashes.SHA256()).hex()
    assert identity.sans == (
        "DNS:alice.example.com",
        "URI:spiffe://example.com/alice",
        "email:alice@example.com",
        "IP:192.0.2.7",
    )
    assert identity.not_after == issued.cert.not_valid_after_utc
    assert identity.cert_der == issued.cert.public_bytes(Encoding.DER)
    assert identity.chain_der == (
        intermediate.cert.public_bytes(Encoding.DER),
        root.cert.public_bytes(Encoding.DER),
    )
    assert identity.problems == ()


@pytest.mark.parametrize(
    ("serial", "text"),
    [(1, "01"), (0x0A1B, "0A1B"), (0xABC, "0ABC"), (2**159 - 1, "7F" + "FF" * 19)],
)
def test_serial_is_whole_bytes_upper_hex(serial: int, text: str) -> None:
    """The serial is printed as OpenSSL and nginx print it: upper-case hex, whole bytes."""
    ca = certfactory.make_ca()
    key = certfactory.new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([A(NameOID.COMMON_NAME, "s")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(certfactory.days_ago(1))
        .not_valid_after(certfactory.days_ahead(1))
        .sign(ca.key, hashes.SHA256())
    )
    assert identity_from_certificate(cert).serial == text


def test_identity_equality_is_by_cn_as_before() -> None:
    """A hand-made ClientIdentity(cn=...) still equals one read from a certificate."""
    assert identity_from_certificate(client("alice").cert) == ClientIdentity(cn="alice")


def test_pem_properties_round_trip() -> None:
    """cert_pem and chain_pem load back to the same certificates."""
    root = certfactory.make_ca()
    inter = certfactory.make_intermediate(root)
    issued = client(issuer=inter)
    identity = identity_from_certificate(issued.cert, [issued.cert, inter.cert])
    assert identity.cert_pem is not None
    assert x509.load_pem_x509_certificate(identity.cert_pem.encode()) == issued.cert
    assert x509.load_pem_x509_certificates(identity.chain_pem.encode()) == [inter.cert]


def test_identity_from_der_matches_identity_from_certificate() -> None:
    """DER in, the same identity out, chain included."""
    root = certfactory.make_ca()
    inter = certfactory.make_intermediate(root)
    issued = client(issuer=inter)
    der = issued.cert.public_bytes(Encoding.DER)
    identity = identity_from_der(der, [inter.cert.public_bytes(Encoding.DER)])
    assert identity.fingerprint == identity_from_certificate(issued.cert).fingerprint
    assert identity.chain_der == (inter.cert.public_bytes(Encoding.DER),)


# -- header selection -----------------------------------------------------


def test_default_settings_send_the_eight_headers_cn_first() -> None:
    """By default: CN, Subject, Issuer, Serial, Fingerprint, SAN, Not-Before, Not-After."""
    identity = identity_from_certificate(client("alice", sans=[x509.DNSName("a.example")]).cert)
    names = [name for name, _ in identity_headers(identity, ALL)]
    assert names == list(HEADER_NAMES.values())
    assert names[0] == CN_HEADER
    assert DEFAULT_FORWARD_HEADERS == tuple(HEADER_NAMES)


def test_without_settings_only_the_cn_is_sent() -> None:
    """identity_headers(identity) keeps its first behaviour: X-Client-Cert-CN only."""
    identity = identity_from_certificate(client("alice").cert)
    assert identity_headers(identity) == [(CN_HEADER, b"alice")]


def test_header_values_have_the_documented_forms() -> None:
    """Each header's value as docs/identity.md shows it."""
    ca = certfactory.make_ca("Example CA")
    issued = certfactory.make_client(
        ca,
        "alice",
        ou="eng",
        sans=[x509.DNSName("alice.example.com"), x509.RFC822Name("alice@example.com")],
        not_before=datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    )
    headers = headers_of(identity_from_certificate(issued.cert))
    assert headers[b"X-Client-Cert-CN"] == b"alice"
    assert headers[b"X-Client-Cert-Subject"] == b"CN=alice,OU=eng"
    assert headers[b"X-Client-Cert-Issuer"] == b"CN=Example CA"
    assert re.fullmatch(rb"([0-9A-F]{2})+", headers[b"X-Client-Cert-Serial"])
    assert re.fullmatch(rb"[0-9a-f]{64}", headers[b"X-Client-Cert-Fingerprint"])
    assert headers[b"X-Client-Cert-SAN"] == b"DNS:alice.example.com, email:alice@example.com"
    assert headers[b"X-Client-Cert-Not-Before"] == b"2025-01-02T03:04:05Z"
    assert headers[b"X-Client-Cert-Not-After"] == b"2026-01-02T03:04:05Z"


def test_chosen_headers_only() -> None:
    """forward-headers picks headers; the order stays the documented one."""
    identity = identity_from_certificate(client("alice").cert)
    settings = HeaderSettings(headers=parse_header_names(["fingerprint", "X-Client-Cert-CN"]))
    assert [n for n, _ in identity_headers(identity, settings)] == [
        b"X-Client-Cert-CN",
        b"X-Client-Cert-Fingerprint",
    ]
    assert identity_headers(identity, HeaderSettings(headers=())) == []


@pytest.mark.parametrize(
    ("values", "names"),
    [
        (["cn,subject"], ("cn", "subject")),
        (["Not-After", "x-client-cert-not_before"], ("not-before", "not-after")),
        (["SAN", " serial ", ""], ("serial", "san")),
        ([], ()),
    ],
)
def test_parse_header_names(values: list[str], names: tuple[str, ...]) -> None:
    """Short names or header names, any case, comma-separated or repeated."""
    assert parse_header_names(values) == names


def test_unknown_header_name_is_refused() -> None:
    """A typo is named, with the list of valid names."""
    with pytest.raises(ValueError, match="unknown header 'subjekt' .*cn, subject"):
        parse_header_names(["cn,subjekt"])


def test_header_settings_refuse_unknown_values() -> None:
    """HeaderSettings checks its own fields."""
    with pytest.raises(ValueError):
        HeaderSettings(headers=("cn", "bogus"))
    with pytest.raises(ValueError):
        HeaderSettings(forward_cert="der")  # type: ignore[arg-type]


def test_anonymous_client_gets_nothing_in_any_mode() -> None:
    """No certificate, no identity headers, whatever is configured."""
    for mode in ("none", "pem", "xfcc", "rfc9440"):
        assert identity_headers(None, HeaderSettings(forward_cert=mode)) == []  # type: ignore[arg-type]


# -- the certificate itself -----------------------------------------------


def test_forward_cert_pem_is_nginx_escaped_cert() -> None:
    """X-Client-Cert is the PEM URL-encoded like nginx's $ssl_client_escaped_cert."""
    issued = client()
    identity = identity_from_certificate(issued.cert)
    value = headers_of(identity, HeaderSettings(headers=(), forward_cert="pem"))[b"X-Client-Cert"]
    assert value.startswith(b"-----BEGIN%20CERTIFICATE-----%0A")
    assert value.endswith(b"-----END%20CERTIFICATE-----%0A")
    assert re.fullmatch(rb"[A-Za-z0-9%._~-]+", value)
    assert x509.load_pem_x509_certificate(unquote_to_bytes(value)) == issued.cert


def test_forward_cert_rfc9440() -> None:
    """Client-Cert is :base64 DER:, Client-Cert-Chain a list of those, issuer first."""
    root = certfactory.make_ca()
    inter = certfactory.make_intermediate(root)
    issued = client(issuer=inter)
    identity = identity_from_certificate(issued.cert, [issued.cert, inter.cert, root.cert])
    headers = headers_of(identity, HeaderSettings(headers=(), forward_cert="rfc9440"))
    cert = headers[b"Client-Cert"]
    assert cert.startswith(b":") and cert.endswith(b":")
    assert x509.load_der_x509_certificate(base64.b64decode(cert[1:-1])) == issued.cert
    items = headers[b"Client-Cert-Chain"].split(b", ")
    assert [x509.load_der_x509_certificate(base64.b64decode(i.strip(b":"))) for i in items] == [
        inter.cert,
        root.cert,
    ]


def test_rfc9440_without_chain_sends_no_chain_header() -> None:
    """Client-Cert-Chain only when a chain is known (RFC 9440 2.3: never alone)."""
    identity = identity_from_certificate(client().cert)
    headers = headers_of(identity, HeaderSettings(headers=(), forward_cert="rfc9440"))
    assert list(headers) == [b"Client-Cert"]


def test_forward_cert_xfcc_is_envoy_format() -> None:
    """Hash, Cert, Subject, URI and DNS keys, as Envoy writes them."""
    issued = client(
        "alice",
        sans=[
            x509.DNSName("a.example"),
            x509.DNSName("b.example"),
            x509.UniformResourceIdentifier("spiffe://example.com/alice"),
        ],
    )
    identity = identity_from_certificate(issued.cert)
    value = headers_of(identity, HeaderSettings(headers=(), forward_cert="xfcc"))[
        b"X-Forwarded-Client-Cert"
    ].decode()
    assert value.startswith(f'Hash={identity.fingerprint};Cert="-----BEGIN%20CERTIFICATE')
    pairs = parse_xfcc(value)
    assert [k for k, _ in pairs] == ["Hash", "Cert", "Subject", "URI", "DNS", "DNS"]
    fields = dict(pairs)
    assert x509.load_pem_x509_certificate(unquote(fields["Cert"]).encode()) == issued.cert
    assert fields["Subject"] == "CN=alice"
    assert fields["URI"] == "spiffe://example.com/alice"
    assert [v for k, v in pairs if k == "DNS"] == ["a.example", "b.example"]


def test_xfcc_quotes_what_would_split_it() -> None:
    """
    Quotes, commas, semicolons, = and backslashes in a subject or URI stay
    inside one quoted value.  The Subject is the RFC 4514 string between
    quotes, byte for byte as Envoy writes OpenSSL's (RFC 4514 has escaped
    the quote and the backslash already, nothing is escaped twice); a URI
    has its quote and backslash percent-encoded, so it needs no escape.
    """
    issued = client(
        'a"b,c;d=e\\f',
        sans=[x509.UniformResourceIdentifier('spiffe://x/a;b=c,d"e\\g')],
    )
    identity = identity_from_certificate(issued.cert)
    value = xfcc_value(identity)
    assert value is not None
    assert b';Subject="CN=a\\"b\\,c\\;d=e\\\\f";URI="spiffe://x/a;b=c,d%22e%5Cg"' in value
    pairs = parse_xfcc(value.decode())
    assert [k for k, _ in pairs] == ["Hash", "Cert", "Subject", "URI"]
    fields = dict(pairs)
    assert fields["Subject"] == identity.subject == 'CN=a\\"b\\,c\\;d=e\\\\f'
    assert fields["URI"] == "spiffe://x/a;b=c,d%22e%5Cg"


def test_a_subject_ending_in_a_backslash_still_ends_its_quotes() -> None:
    """
    CN "x\\" is RFC 4514 C{CN=x\\\\}: the closing quote after it is not
    escaped, so a URI SAN after it that looks like another key stays a URI.
    """
    issued = client("x\\", sans=[x509.UniformResourceIdentifier('spiffe://a;URI="spiffe://admin')])
    value = xfcc_value(identity_from_certificate(issued.cert))
    assert value is not None
    pairs = parse_xfcc(value.decode())
    assert pairs[2:] == [("Subject", "CN=x\\\\"), ("URI", "spiffe://a;URI=%22spiffe://admin")]


@pytest.mark.parametrize(
    ("raw", "quoted"),
    [
        ("plain", "plain"),
        ("a;b", '"a;b"'),
        ('CN=a\\"b', '"CN=a\\"b"'),
        ("CN=a\\\\", '"CN=a\\\\"'),
        ('a"b', '"a\\"b"'),
        ("a\\", '"a\\\\"'),
        ('a\\\\"b', '"a\\\\\\\\\\"b"'),
    ],
)
def test_xfcc_quoting_is_verbatim_only_when_that_is_safe(raw: str, quoted: str) -> None:
    """
    A value that is already a valid quoted-string body (every quote escaped,
    no dangling backslash) is quoted verbatim, as Envoy does; anything else
    (never produced by xfcc_value, guarded all the same) gets RFC 9110
    escapes, so no value can end its quotes early.
    """
    assert _xfcc_quote(raw) == quoted
    pairs = parse_xfcc("K=" + quoted)
    assert len(pairs) == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=30),
    st.text(st.characters(max_codepoint=0x7F), max_size=30),
)
def test_xfcc_element_never_splits(cn: str, uri_tail: str) -> None:
    """
    Whatever the CN (any text) and URI SAN (any ASCII, as cryptography
    allows) hold, quotes, commas, semicolons, =, backslashes and controls
    included: one element, printable ASCII, exactly
    the keys Hash, Cert, Subject, URI, and the Subject is the RFC 4514 text.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        attribute = A(NameOID.COMMON_NAME, cn, _validate=False)
    issued = client(None, attributes=[attribute],
                    sans=[x509.UniformResourceIdentifier("spiffe://x/" + uri_tail)])
    identity = identity_from_certificate(issued.cert)
    value = xfcc_value(identity)
    assert value is not None and all(0x20 <= b < 0x7F for b in value)
    pairs = parse_xfcc(value.decode())
    assert [k for k, _ in pairs] == ["Hash", "Cert", "Subject", "URI"]
    assert identity.subject is not None
    assert dict(pairs)["Subject"] == rfc4514_ascii(identity.subject)


def rfc4514_ascii(dn: str) -> str:
    """docs/identity.md: non-ASCII and controls as RFC 4514 \\XX UTF-8 escapes."""
    return "".join(
        ch if 0x20 <= ord(ch) < 0x7F else "".join(f"\\{b:02X}" for b in ch.encode("utf-8"))
        for ch in dn
    )


# -- subject and issuer: RFC 4514 as OpenSSL writes it ---------------------

O = x509.ObjectIdentifier  # noqa: E741

#: Every attribute docs/identity.md names, with what X-Client-Cert-Subject shows.
NAMED_ATTRIBUTES = [
    (A(NameOID.COUNTRY_NAME, "DE"), "C=DE"),
    (A(NameOID.STATE_OR_PROVINCE_NAME, "Bayern"), "ST=Bayern"),
    (A(NameOID.LOCALITY_NAME, "Munich"), "L=Munich"),
    (A(NameOID.STREET_ADDRESS, "Main St 1"), "street=Main St 1"),
    (A(NameOID.POSTAL_CODE, "80331"), "postalCode=80331"),
    (A(NameOID.ORGANIZATION_NAME, "Example"), "O=Example"),
    (A(NameOID.ORGANIZATIONAL_UNIT_NAME, "eng"), "OU=eng"),
    (A(NameOID.TITLE, "Dr"), "title=Dr"),
    (A(NameOID.SURNAME, "Smith"), "SN=Smith"),
    (A(NameOID.GIVEN_NAME, "Jo"), "GN=Jo"),
    (A(NameOID.INITIALS, "J"), "initials=J"),
    (A(NameOID.GENERATION_QUALIFIER, "III"), "generationQualifier=III"),
    (A(NameOID.DN_QUALIFIER, "q1"), "dnQualifier=q1"),
    (A(NameOID.PSEUDONYM, "ps"), "pseudonym=ps"),
    (A(NameOID.SERIAL_NUMBER, "123"), "serialNumber=123"),
    (A(NameOID.BUSINESS_CATEGORY, "Private Organization"),
     "businessCategory=Private Organization"),
    (A(NameOID.JURISDICTION_COUNTRY_NAME, "DE"), "jurisdictionC=DE"),
    (A(NameOID.JURISDICTION_STATE_OR_PROVINCE_NAME, "BY"), "jurisdictionST=BY"),
    (A(NameOID.JURISDICTION_LOCALITY_NAME, "Munich"), "jurisdictionL=Munich"),
    (A(NameOID.DOMAIN_COMPONENT, "com"), "DC=com"),
    (A(NameOID.USER_ID, "u1"), "UID=u1"),
    (A(NameOID.ORGANIZATION_IDENTIFIER, "VATDE-1"), "organizationIdentifier=VATDE-1"),
    (A(NameOID.UNSTRUCTURED_NAME, "un"), "unstructuredName=un"),
    (A(NameOID.POSTAL_ADDRESS, "pa"), "postalAddress=pa"),
    (A(O("2.5.4.13"), "descr"), "description=descr"),
    (A(O("2.5.4.72"), "role"), "role=role"),
    (A(NameOID.EMAIL_ADDRESS, "alice@example.com"), "emailAddress=alice@example.com"),
    (A(NameOID.COMMON_NAME, "alice"), "CN=alice"),
]
#: Types OpenSSL has no name for: dotted OID and #hex of the value's DER (RFC 4514 2.4).
UNNAMED_ATTRIBUTES = [
    (A(O("1.2.3.4.5"), 'x,"y'), "1.2.3.4.5=#0C04782C2279"),
    (A(O("1.2.3.4.6"), "J\u00fc", _type=_ASN1Type.BMPString), "1.2.3.4.6=#1E04004A00FC"),
    (A(O("1.2.3.4.7"), "a", _type=_ASN1Type.PrintableString), "1.2.3.4.7=#130161"),
    (A(O("1.2.3.4.8"), "x" * 200), "1.2.3.4.8=#0C81C8" + "78" * 200),
]


def test_subject_uses_openssls_names_and_hex_for_unknown_types() -> None:
    """
    emailAddress=, serialNumber=, GN=, SN=, title=, jurisdictionC= and the
    rest as OpenSSL prints them (not 1.2.840.113549.1.9.1=a@b.c, which
    RFC 4514 does not allow), most specific first; an attribute type without
    a name is its dotted OID with #hex of the DER value, its string type kept.
    """
    attributes = [a for a, _ in NAMED_ATTRIBUTES + UNNAMED_ATTRIBUTES]
    identity = identity_from_certificate(client(None, attributes=attributes).cert)
    expected = [text for _, text in reversed(NAMED_ATTRIBUTES + UNNAMED_ATTRIBUTES)]
    assert identity.subject == ",".join(expected)
    assert "1.2.840.113549" not in headers_of(identity)[b"X-Client-Cert-Subject"].decode()


def test_issuer_uses_the_same_names() -> None:
    """The issuer's emailAddress is written the same way."""
    ca = certfactory.make_ca("Example CA")
    inter = certfactory.make_intermediate(ca, "Issuing CA")
    issued = client(issuer=inter)
    assert identity_from_certificate(issued.cert).issuer == "CN=Issuing CA"
    key = certfactory.new_key()
    name = x509.Name([A(NameOID.EMAIL_ADDRESS, "ca@example.com"), A(NameOID.COMMON_NAME, "CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([A(NameOID.COMMON_NAME, "s")]))
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(certfactory.days_ago(1))
        .not_valid_after(certfactory.days_ahead(1))
        .sign(key, hashes.SHA256())
    )
    assert identity_from_certificate(cert).issuer == "CN=CA,emailAddress=ca@example.com"


def test_multi_valued_rdn_is_written_in_openssls_order() -> None:
    """OU=s+CN=j in an RDN is written as OpenSSL's XN_FLAG_RFC2253 writes it, reversed too."""
    name = x509.Name([
        x509.RelativeDistinguishedName([A(NameOID.ORGANIZATIONAL_UNIT_NAME, "s"),
                                        A(NameOID.COMMON_NAME, "j")]),
        x509.RelativeDistinguishedName([A(NameOID.ORGANIZATION_NAME, "o")]),
    ])
    key = certfactory.new_key()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(certfactory.days_ago(1)).not_valid_after(certfactory.days_ahead(1))
        .sign(key, hashes.SHA256())
    )
    reparsed = x509.load_der_x509_certificate(cert.public_bytes(Encoding.DER))
    assert identity_from_certificate(reparsed).subject == "O=o,OU=s+CN=j"


def _openssl_subject(cert: x509.Certificate, tmp_path: Path) -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    path = tmp_path / "cert.pem"
    path.write_bytes(cert.public_bytes(Encoding.PEM))
    result = subprocess.run(
        [openssl, "x509", "-in", str(path), "-noout", "-subject", "-nameopt", "RFC2253"],
        capture_output=True, check=True,
    )
    out = result.stdout.decode("ascii")
    assert out.startswith("subject=") and out.endswith("\n")
    return out[len("subject="):-1]


OPENSSL_SUBJECTS = {
    "every named attribute": [a for a, _ in NAMED_ATTRIBUTES],
    "unnamed types": [a for a, _ in UNNAMED_ATTRIBUTES] + [A(NameOID.COMMON_NAME, "x")],
    "escapes": [A(NameOID.COMMON_NAME, 'a"b,c;d=e\\f<g>+h#'),
                A(NameOID.EMAIL_ADDRESS, "a\"b@c")],
    "edges": [A(NameOID.ORGANIZATION_NAME, " o "), A(NameOID.COMMON_NAME, "#x")],
    "controls": [A(NameOID.COMMON_NAME, "alice\x00.evil\r\nX: 1")],
    "non-ASCII": [A(NameOID.ORGANIZATIONAL_UNIT_NAME, "J\u00fcrgen \u2603",
                    _type=_ASN1Type.BMPString),
                  A(NameOID.COMMON_NAME, "\U0001d11e", _type=_ASN1Type.UniversalString)],
}


@pytest.mark.parametrize("label", sorted(OPENSSL_SUBJECTS))
def test_subject_is_what_openssl_prints(label: str, tmp_path: Path) -> None:
    """
    The reference: `openssl x509 -nameopt RFC2253` (what nginx and Envoy
    show) prints the same DN, once non-ASCII is written as \\XX as XFCC does.
    """
    cert = client(None, attributes=OPENSSL_SUBJECTS[label]).cert
    identity = identity_from_certificate(cert)
    assert identity.subject is not None
    assert rfc4514_ascii(identity.subject) == _openssl_subject(cert, tmp_path)


# -- header names ---------------------------------------------------------


def test_reserved_extra_names_cover_what_headers_py_misses() -> None:
    """
    Client-Cert and Client-Cert-Chain (RFC 9440) must be stripped from client
    requests; is_reserved does not know them yet, reserved_extra_names does,
    in the normalised spelling headers.normalise produces.
    """
    extra = reserved_extra_names()
    assert {normalise(b"Client-Cert"), normalise(b"CLIENT_CERT_CHAIN")} <= extra
    for name in (b"X-Client-Cert", b"X-Client-Cert-SAN", b"X-Forwarded-Client-Cert"):
        assert is_reserved(name)
    every_name_we_send = [*HEADER_NAMES.values(), b"X-Client-Cert", b"X-Forwarded-Client-Cert",
                          b"Client-Cert", b"Client-Cert-Chain"]
    for name in every_name_we_send:
        assert is_reserved(name) or normalise(name) in extra, name


# -- hostile certificates (docs/identity.md) ------------------------------


def big_cn(size: int) -> x509.NameAttribute:
    """A CN beyond X.520's 64 characters, which cryptography writes with a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return A(NameOID.COMMON_NAME, "x" * size, _validate=False)


@dataclass(frozen=True)
class Hostile:
    label: str
    attributes: tuple[x509.NameAttribute, ...] = ()
    sans: tuple[x509.GeneralName, ...] = ()
    cn: str | None = None
    #: what the backend gets in X-Client-Cert-CN (None: no header)
    cn_header: bytes | None = None
    subject_header: bytes | None = None
    san_header: bytes | None = None


HOSTILE = [
    Hostile("CR LF", cn="alice\r\nX-Admin: 1", cn_header=b"alice%0D%0AX-Admin: 1"),
    Hostile("NUL", cn="alice\x00.evil", cn_header=b"alice%00.evil",
            subject_header=b"CN=alice\\00.evil"),
    Hostile("quotes", cn="a\"b'c", cn_header=b"a\"b'c", subject_header=b"CN=a\\\"b'c"),
    Hostile("comma semicolon", cn="a,b;c", cn_header=b"a,b;c", subject_header=b"CN=a\\,b\\;c"),
    Hostile("percent", cn="%41", cn_header=b"%2541"),
    Hostile("blanks", cn=" alice ", cn_header=b"%20alice%20", subject_header=b"CN=\\ alice\\%20"),
    Hostile("UTF8String non-ASCII", cn="Jürgen ☃", cn_header=b"J%C3%BCrgen %E2%98%83"),
    Hostile("BMPString",
            attributes=(A(NameOID.COMMON_NAME, "Jürgen ☃", _type=_ASN1Type.BMPString),),
            cn_header=b"J%C3%BCrgen %E2%98%83"),
    Hostile("T61String", attributes=(A(NameOID.COMMON_NAME, "Jürgen", _type=_ASN1Type.T61String),),
            cn_header=b"J%C3%BCrgen"),
    Hostile("UniversalString",
            attributes=(A(NameOID.COMMON_NAME, "𝄞", _type=_ASN1Type.UniversalString),),
            cn_header=b"%F0%9D%84%9E"),
    Hostile("several CNs", attributes=(A(NameOID.COMMON_NAME, "admin"),), cn="alice",
            cn_header=b"alice", subject_header=b"CN=alice,CN=admin"),
    Hostile("no CN", attributes=(A(NameOID.ORGANIZATION_NAME, "Ex"),), cn_header=None,
            subject_header=b"O=Ex"),
    Hostile("OU with CR LF", attributes=(A(NameOID.ORGANIZATIONAL_UNIT_NAME, "eng\r\nX: 1"),),
            cn="alice", cn_header=b"alice", subject_header=b"CN=alice,OU=eng%0D%0AX: 1"),
    Hostile("DNS SAN with CR LF", cn="alice", sans=(x509.DNSName("a\r\nb.example"),),
            cn_header=b"alice", san_header=b"DNS:a%0D%0Ab.example"),
    Hostile("URI SAN with comma", cn="alice",
            sans=(x509.UniformResourceIdentifier("spiffe://x/a,b"), x509.DNSName("c.example")),
            cn_header=b"alice", san_header=b"URI:spiffe://x/a%2Cb, DNS:c.example"),
    Hostile("email SAN with quotes", cn="alice", sans=(x509.RFC822Name('"a b"@example.com'),),
            cn_header=b"alice", san_header=b'email:"a b"@example.com'),
    Hostile("8 KiB subject", attributes=(big_cn(8192),), cn_header=b"x" * 8192),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[h.label for h in HOSTILE])
@pytest.mark.parametrize("mode", ["none", "pem", "xfcc", "rfc9440"])
def test_hostile_certificate(case: Hostile, mode: str) -> None:
    """Never a crash, never an injected header: the documented value, percent-encoded."""
    issued = client(case.cn, attributes=case.attributes, sans=case.sans)
    identity = identity_from_certificate(issued.cert)
    headers = identity_headers(identity, HeaderSettings(forward_cert=mode))  # type: ignore[arg-type]
    assert_safe(headers)
    names = [n for n, _ in headers]
    assert len(names) == len(set(names))
    by_name = dict(headers)
    assert by_name.get(b"X-Client-Cert-CN") == case.cn_header
    if case.subject_header is not None:
        assert by_name[b"X-Client-Cert-Subject"] == case.subject_header
    assert by_name.get(b"X-Client-Cert-SAN") == case.san_header
    if case.cn_header is not None:
        assert unquote_to_bytes(case.cn_header).decode() == identity.cn


def test_eight_kib_subject_is_sent_whole() -> None:
    """An 8 KiB CN is neither cut nor dropped: a shortened identity would be another one."""
    identity = identity_from_certificate(client(None, attributes=[big_cn(8192)]).cert)
    assert len(headers_of(identity)[b"X-Client-Cert-Subject"]) == 8192 + 3


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40))
def test_any_cn_gives_safe_reversible_headers(cn: str) -> None:
    """Whatever UTF8String CN a CA signs: safe headers, and the CN decodes back exactly."""
    with warnings.catch_warnings():  # beyond X.520's 64 characters too
        warnings.simplefilter("ignore", UserWarning)
        attribute = A(NameOID.COMMON_NAME, cn, _validate=False)
    identity = identity_from_certificate(client(None, attributes=[attribute]).cert)
    for mode in ("none", "xfcc"):
        headers = identity_headers(identity, HeaderSettings(forward_cert=mode))  # type: ignore[arg-type]
        assert_safe(headers)
    cn_value = dict(identity_headers(identity))[CN_HEADER]
    assert unquote_to_bytes(cn_value).decode() == cn


@given(st.text())
def test_encoded_values_never_have_edge_blanks(value: str) -> None:
    """HTTP strips blanks around a value; encode_header_value leaves none to strip."""
    encoded = encode_header_value(value)
    assert encoded == encoded.strip()


def test_unreadable_bmpstring_is_refused() -> None:
    """Half a surrogate pair in a BMPString: cryptography cannot read it, no identity."""
    ca = certfactory.make_ca()
    cert = client(None, attributes=[A(NameOID.COMMON_NAME, "QZ", _type=_ASN1Type.BMPString)],
                  issuer=ca).cert
    der = resigned(cert, b"\x00Q\x00Z", b"\xd8\x00\x00Z", ca)
    with pytest.raises(UnreadableCertificate, match="BmpString"):
        identity_from_der(der)


def test_invalid_utf8_subject_is_refused() -> None:
    """Invalid UTF-8 in a UTF8String CN is only found when the subject is read: refused too."""
    ca = certfactory.make_ca()
    cert = client("QZQZ", issuer=ca).cert
    der = resigned(cert, b"QZQZ", b"\xff\xfe\xc3\x28", ca)
    with pytest.raises(UnreadableCertificate, match="subject unreadable"):
        identity_from_der(der)


def test_non_ascii_bytes_in_a_dns_san_are_encoded() -> None:
    """An IA5String DNS name holding UTF-8 and NUL: read, encoded, never a valid host name."""
    ca = certfactory.make_ca()
    cert = client("alice", sans=[x509.DNSName("QZQZ.example")], issuer=ca).cert
    identity = identity_from_der(resigned(cert, b"QZQZ", b"\xc3\xa9\x00Z", ca))
    assert headers_of(identity)[b"X-Client-Cert-SAN"] == b"DNS:%C3%A9%00Z.example"


# -- real handshakes: what OpenSSL lets through, and resumption -----------


def _pump(server: SSL.Connection, client: SSL.Connection) -> None:
    for _ in range(50):
        moved = False
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                data = a.bio_read(65536)
            except SSL.WantReadError:
                continue
            b.bio_write(data)
            moved = True
        if not moved:
            return


@dataclass
class MemoryTLS:
    """The proxy's real server context and a client, talking through memory BIOs."""

    ca: Issued
    server_context: SSL.Context

    @classmethod
    def make(cls, ca: Issued) -> MemoryTLS:
        server_ca = certfactory.make_ca("Server CA")
        server = certfactory.make_server(server_ca)
        config = Config(backend=Backend("http://127.0.0.1:1", "127.0.0.1", 1))
        context = tls.build_context(config, ServerIdentity(server.key, server.cert), [ca.cert], [])
        context.set_max_proto_version(SSL.TLS1_2_VERSION)  # session IDs: simplest to resume
        return cls(ca, context)

    @staticmethod
    def client_context(issued: Issued, cert_der: bytes | None = None) -> SSL.Context:
        """A client presenting C{issued}, or the DER C{cert_der} with C{issued}'s key."""
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        if cert_der is not None:
            # OpenSSL's own DER loader: cryptography could not parse it.
            context.use_certificate(load_certificate(FILETYPE_ASN1, cert_der))
        else:
            context.use_certificate(issued.cert)
        for extra in issued.chain:
            context.add_extra_chain_cert(extra)
        context.use_privatekey(issued.key)
        return context

    def connect(
        self, context: SSL.Context, session: SSL.Session | None = None
    ) -> tuple[SSL.Connection, SSL.Connection]:
        server = SSL.Connection(self.server_context, None)
        server.set_accept_state()
        client_conn = SSL.Connection(context, None)
        client_conn.set_connect_state()
        if session is not None:
            client_conn.set_session(session)
        _pump(server, client_conn)
        return server, client_conn


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL X509 objects is deprecated")
@pytest.mark.parametrize(
    ("string_type", "bad"),
    [
        (_ASN1Type.T61String, b"\xe9\x00\r\n"),
        (_ASN1Type.IA5String, b"\xff\x00\r\n"),
        (_ASN1Type.PrintableString, b"a\n\x00@"),
    ],
    ids=["T61String", "IA5String", "PrintableString"],
)
def test_openssl_accepts_what_cryptography_cannot_read_and_the_proxy_refuses_it(
    string_type: _ASN1Type, bad: bytes
) -> None:
    """
    OpenSSL does not check what a T61String, IA5String or PrintableString
    holds, so the handshake succeeds; cryptography refuses the bytes, so
    identity_from_connection raises UnreadableCertificate and the connection
    is to be refused ("unreadable certificate").
    """
    ca = certfactory.make_ca()
    issued = client(None, attributes=[A(NameOID.COMMON_NAME, "QZQZ", _type=string_type)],
                    issuer=ca)
    der = resigned(issued.cert, b"QZQZ", bad, ca)
    memory = MemoryTLS.make(ca)
    server, _ = memory.connect(memory.client_context(issued, cert_der=der))
    assert server.get_peer_certificate() is not None
    with pytest.raises(UnreadableCertificate):
        identity_from_connection(server)


@pytest.mark.parametrize(
    ("string_type", "old", "bad"),
    [
        (_ASN1Type.BMPString, b"\x00Q\x00Z", b"\xd8\x00\x00Z"),
        (_ASN1Type.UTF8String, b"QZQZ", b"\xff\xfe\xc3\x28"),
    ],
    ids=["BMPString surrogate", "invalid UTF-8"],
)
def test_openssl_itself_refuses_to_decode_broken_strings(
    string_type: _ASN1Type, old: bytes, bad: bytes
) -> None:
    """
    Half a surrogate pair in a BMPString or invalid UTF-8 in a UTF8String:
    OpenSSL's DER decoder refuses the certificate, so such a client never
    completes a handshake (its own OpenSSL will not even load it).
    """
    ca = certfactory.make_ca()
    issued = client(None, attributes=[A(NameOID.COMMON_NAME, old.decode("utf-16-be")
                                        if string_type == _ASN1Type.BMPString else "QZQZ",
                                        _type=string_type)], issuer=ca)
    der = resigned(issued.cert, old, bad, ca)
    with pytest.raises(OpenSSLError):
        load_certificate(FILETYPE_ASN1, der)


def test_no_certificate_is_no_identity() -> None:
    """A client without a certificate (optional mode) has no identity, not an empty one."""

    class NoPeer:
        def get_peer_certificate(self) -> None:
            return None

    assert identity_from_connection(NoPeer()) is None


def test_resumed_session_keeps_the_chain_through_the_cache() -> None:
    """
    OpenSSL forgets the verified chain when a session is resumed; the
    IdentityCache gives the resumed connection the identity of the full handshake.
    """
    root = certfactory.make_ca()
    inter = certfactory.make_intermediate(root)
    issued = client("alice", issuer=inter)
    memory = MemoryTLS.make(root)
    context = memory.client_context(issued)
    cache = IdentityCache()
    server, client_conn = memory.connect(context)
    first = identity_from_connection(server, cache)
    assert first is not None and len(first.chain_der) == 2
    session = client_conn.get_session()
    assert session is not None

    resumed_server, _ = memory.connect(context, session=session)
    assert resumed_server.get_verified_chain() is None  # what the cache is for
    again = identity_from_connection(resumed_server, cache)
    assert again is not None
    assert again.chain_der == first.chain_der and again.fingerprint == first.fingerprint

    without_cache = identity_from_connection(resumed_server)
    assert without_cache is not None and without_cache.chain_der == ()
    assert without_cache.fingerprint == first.fingerprint


def test_identity_cache_is_bounded() -> None:
    """The least recently used identity goes first."""
    cache = IdentityCache(size=2)
    identities = [identity_from_certificate(client(f"c{i}").cert) for i in range(3)]
    for identity in identities:
        cache.put(identity)
    assert len(cache) == 2
    assert identities[0].cert_der is not None and cache.get(identities[0].cert_der) is None
    assert identities[2].cert_der is not None and cache.get(identities[2].cert_der) is not None
