"""
What the backend learns about a client, against the running daemon
(docs/identity.md, "Identity headers"): the eight X-Client-Cert-* headers and
their exact values (checked against cryptography's own reading of the
certificate), C{--forward-headers}, the certificate itself with
C{--forward-cert pem | xfcc | rfc9440}, the stripping of every client-sent
copy whatever the mode, and the same identity on a resumed TLS session.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re
import ssl
from collections.abc import Sequence
from urllib.parse import unquote, unquote_to_bytes

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from .extra_certs import (
    NOW,
    A,
    Extra,
    cn,
    der_of,
    extra_for,
    is_printable_ascii,
    name,
    parse_xfcc,
    pem_of,
    sf_binary,
)
from .harness import ClientCert, Echo, Pki, Proxy, canonical

pytestmark = pytest.mark.e2e

#: docs/identity.md: "All eight are sent by default, always in this order."
DEFAULT_HEADERS = [
    "X-Client-Cert-CN",
    "X-Client-Cert-Subject",
    "X-Client-Cert-Issuer",
    "X-Client-Cert-Serial",
    "X-Client-Cert-Fingerprint",
    "X-Client-Cert-SAN",
    "X-Client-Cert-Not-Before",
    "X-Client-Cert-Not-After",
]
CERT_HEADERS = ["X-Client-Cert", "X-Forwarded-Client-Cert", "Client-Cert", "Client-Cert-Chain"]
ALL_IDENTITY = [canonical(h) for h in DEFAULT_HEADERS + CERT_HEADERS]

SERIAL = 0x0123456789ABCDEF  # 15 hex digits: sent as whole bytes, 0123456789ABCDEF
URI = "spiffe://example.com/ns/prod/sa/alice"


@pytest.fixture(scope="module")
def extra(pki: Pki) -> Extra:
    return extra_for(pki)


@pytest.fixture(scope="module")
def alice(extra: Extra) -> ClientCert:
    """The documentation's alice: O, OU, CN, four kinds of SAN (and one left out), a set serial."""
    return extra.client(
        "details-alice",
        name(
            A(NameOID.ORGANIZATION_NAME, "Example Corp"),
            A(NameOID.ORGANIZATIONAL_UNIT_NAME, "platform"),
            cn("alice"),
        ),
        sans=[
            x509.DNSName("alice.example.com"),
            x509.UniformResourceIdentifier(URI),
            x509.RFC822Name("alice@example.com"),
            x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
            x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4")),
        ],
        serial=SERIAL,
        not_before=NOW - datetime.timedelta(days=2, hours=3),
        not_after=NOW + datetime.timedelta(days=40, minutes=7),
    )


@pytest.fixture(scope="module")
def chained(extra: Extra) -> ClientCert:
    """A client issued by an intermediate CA under the trusted root."""
    return extra.client("details-chained", issuer=extra.intermediate("details"),
                        sans=[x509.DNSName("chained.example.com")])


def echo_of(proxy: Proxy, client: ClientCert | str | None,
            headers: Sequence[tuple[str, str]] = ()) -> Echo:
    with proxy.tls(client) as conn:
        return conn.request("GET", "/echo/identity", list(headers)).echo()


def identity_of(echo: Echo) -> list[tuple[str, str]]:
    """The identity headers the backend got (X-Client-Cert*, XFCC, Client-Cert*), in order."""
    return [(n, v) for n, v in echo.headers if canonical(n) in ALL_IDENTITY
            or canonical(n).startswith("x-client-cert")]


def only(echo: Echo, header: str) -> str:
    values = echo.values(header)
    assert len(values) == 1, (header, echo.headers)
    return values[0]


def rfc3339(value: datetime.datetime) -> str:
    return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expected_headers(client: ClientCert, san: str | None) -> list[tuple[str, str]]:
    """The eight headers as docs/identity.md defines them, computed with cryptography."""
    cert = client.issued.cert
    serial = f"{cert.serial_number:X}"
    serial = "0" * (len(serial) % 2) + serial
    values = [
        ("X-Client-Cert-CN", client.cn),
        ("X-Client-Cert-Subject", cert.subject.rfc4514_string()),
        ("X-Client-Cert-Issuer", cert.issuer.rfc4514_string()),
        ("X-Client-Cert-Serial", serial),
        ("X-Client-Cert-Fingerprint", cert.fingerprint(hashes.SHA256()).hex()),
        ("X-Client-Cert-SAN", san),
        ("X-Client-Cert-Not-Before", rfc3339(cert.not_valid_before_utc)),
        ("X-Client-Cert-Not-After", rfc3339(cert.not_valid_after_utc)),
    ]
    return [(n, v) for n, v in values if v is not None]


def test_default_identity_headers_each_once_in_order(proxy, alice):
    """
    By default the backend gets the eight X-Client-Cert-* headers, each
    exactly once, in the documented order: CN, Subject and Issuer in RFC 4514
    (most specific first), the serial in upper-case hex whole bytes, the
    SHA-256 fingerprint of the DER, the typed SANs (DNS, URI, email, IP; a
    registeredID left out), the validity in RFC 3339 UTC; every value is
    printable ASCII; and no certificate header (--forward-cert is none).
    """
    echo = echo_of(proxy, alice)
    got = identity_of(echo)
    want = expected_headers(
        alice, f"DNS:alice.example.com, URI:{URI}, email:alice@example.com, IP:192.0.2.7"
    )
    assert got == want
    cert = alice.issued.cert
    by_name = dict(got)
    assert by_name["X-Client-Cert-Subject"] == "CN=alice,OU=platform,O=Example Corp"
    assert by_name["X-Client-Cert-Issuer"] == "CN=mtlsproxy e2e CA"
    assert by_name["X-Client-Cert-Serial"] == "0123456789ABCDEF"
    assert by_name["X-Client-Cert-Fingerprint"] == hashlib.sha256(der_of(cert)).hexdigest()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", by_name["X-Client-Cert-Not-After"])
    assert datetime.datetime.fromisoformat(by_name["X-Client-Cert-Not-Before"]) == (
        cert.not_valid_before_utc
    )
    assert all(is_printable_ascii(v) for _, v in got), got
    for header in CERT_HEADERS:
        assert echo.values(header) == [], echo.headers


def test_chained_client_has_the_intermediate_as_issuer(proxy, chained):
    """A client issued by an intermediate: Issuer is the intermediate's subject."""
    echo = echo_of(proxy, chained)
    assert identity_of(echo) == expected_headers(chained, "DNS:chained.example.com")
    assert only(echo, "X-Client-Cert-Issuer") == "CN=extra details CA"


def test_forward_headers_cn_sends_only_the_cn(start_proxy, alice):
    """--forward-headers cn: X-Client-Cert-CN is the only identity header."""
    proxy = start_proxy("--forward-headers", "cn")
    assert identity_of(echo_of(proxy, alice)) == [("X-Client-Cert-CN", "alice")]


def test_forward_headers_choice_keeps_documented_order(start_proxy, alice):
    """
    --forward-headers fingerprint --forward-headers X-Client-Cert-CN,san
    (short names and header names, repeated and comma-separated): exactly
    those three, in the documented order CN, Fingerprint, SAN.
    """
    proxy = start_proxy(
        "--forward-headers", "fingerprint", "--forward-headers", "X-Client-Cert-CN,san"
    )
    got = identity_of(echo_of(proxy, alice))
    assert [n for n, _ in got] == [
        "X-Client-Cert-CN", "X-Client-Cert-Fingerprint", "X-Client-Cert-SAN"
    ]
    assert dict(got)["X-Client-Cert-Fingerprint"] == (
        alice.issued.cert.fingerprint(hashes.SHA256()).hex()
    )


def test_forward_headers_empty_list_sends_none(start_proxy, extra, alice):
    """
    forward-headers = [] in the --config file: no identity header at all,
    while the X-Forwarded-* headers are still sent.
    """
    config = extra.write("no-identity-headers.toml", "forward-headers = []\n")
    proxy = start_proxy("--config", str(config))
    echo = echo_of(proxy, alice)
    assert identity_of(echo) == []
    assert echo.values("X-Forwarded-Proto") == ["https"]


def test_forward_cert_pem_is_the_url_encoded_pem(start_proxy, alice, chained):
    """
    --forward-cert pem: X-Client-Cert, once, holds only A-Z a-z 0-9 - . _ ~
    and %XX, and URL-decodes to the client's own PEM certificate (the leaf
    only, also for a chained client), besides the eight default headers.
    """
    proxy = start_proxy("--forward-cert", "pem")
    for client in (alice, chained):
        echo = echo_of(proxy, client)
        value = only(echo, "X-Client-Cert")
        assert re.fullmatch(r"[A-Za-z0-9._~%-]+", value), value
        assert value.startswith("-----BEGIN%20CERTIFICATE-----%0A")
        assert unquote_to_bytes(value).decode("ascii") == pem_of(client.issued.cert)
        assert [n for n, _ in identity_of(echo)] == [*DEFAULT_HEADERS, "X-Client-Cert"]


def test_forward_cert_xfcc_is_envoys_format(start_proxy, alice):
    """
    --forward-cert xfcc: X-Forwarded-Client-Cert, once, is
    Hash=<SHA-256 hex of the DER>;Cert="<URL-encoded PEM>";Subject="<RFC 4514>";
    URI=...;DNS=..., printable ASCII, without By or Chain.
    """
    proxy = start_proxy("--forward-cert", "xfcc")
    value = only(echo_of(proxy, alice), "X-Forwarded-Client-Cert")
    assert is_printable_ascii(value)
    cert = alice.issued.cert
    assert value.startswith(f"Hash={cert.fingerprint(hashes.SHA256()).hex()};")
    pairs = parse_xfcc(value)
    assert [k for k, _ in pairs] == ["Hash", "Cert", "Subject", "URI", "DNS"]
    fields = dict(pairs)
    assert fields["Hash"] == hashlib.sha256(der_of(cert)).hexdigest()
    assert unquote(fields["Cert"]) == pem_of(cert)
    assert fields["Subject"] == "CN=alice,OU=platform,O=Example Corp"
    assert fields["URI"] == URI
    assert fields["DNS"] == "alice.example.com"


def test_subject_names_are_openssls_in_every_header(start_proxy, extra):
    """
    A subject with emailAddress, serialNumber, GN, SN, title and an
    attribute type OpenSSL has no name for: X-Client-Cert-Subject and the
    XFCC Subject write them as OpenSSL (so nginx and Envoy) does
    (emailAddress=, never 1.2.840.113549.1.9.1=...), the unnamed one as
    its dotted OID with #hex of the DER value (RFC 4514 2.4).
    """
    client = extra.client(
        "details-names",
        name(
            A(NameOID.ORGANIZATION_NAME, "Example Corp"),
            A(NameOID.TITLE, "Dr"),
            A(NameOID.SURNAME, "Smith"),
            A(NameOID.GIVEN_NAME, "Alice"),
            A(NameOID.SERIAL_NUMBER, "4711"),
            A(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), "x"),
            A(NameOID.EMAIL_ADDRESS, "alice@example.com"),
            cn("alice"),
        ),
    )
    subject = (
        "CN=alice,emailAddress=alice@example.com,1.3.6.1.4.1.55555.1=#0C0178,"
        "serialNumber=4711,GN=Alice,SN=Smith,title=Dr,O=Example Corp"
    )
    proxy = start_proxy("--forward-cert", "xfcc")
    echo = echo_of(proxy, client)
    assert only(echo, "X-Client-Cert-Subject") == subject
    assert dict(parse_xfcc(only(echo, "X-Forwarded-Client-Cert")))["Subject"] == subject


def test_forward_cert_rfc9440_cert_and_chain(start_proxy, pki, alice, chained, extra):
    """
    --forward-cert rfc9440: Client-Cert is :BASE64(DER): of the client's
    certificate; Client-Cert-Chain lists the verified chain above it, issuer
    first and trust anchor included: intermediate then root for a chained
    client, the root alone for a client the root issued.
    """
    proxy = start_proxy("--forward-cert", "rfc9440")
    root = der_of(pki.ca.cert)
    intermediate = der_of(extra.intermediate("details").cert)
    for client, chain in ((chained, [intermediate, root]), (alice, [root])):
        echo = echo_of(proxy, client)
        assert sf_binary(only(echo, "Client-Cert")) == der_of(client.issued.cert)
        items = [i.strip() for i in only(echo, "Client-Cert-Chain").split(",")]
        assert [sf_binary(i) for i in items] == chain
        assert echo.values("X-Client-Cert") == [] and echo.values("X-Forwarded-Client-Cert") == []


SPOOFED = [
    ("Client-Cert", ":U1BPT0Y=:"),
    ("client-cert", ":U1BPT0Y=:"),
    ("CLIENT_CERT", ":U1BPT0Y=:"),
    ("Client-Cert-Chain", ":U1BPT0Y=:, :U1BPT0Y=:"),
    ("client_cert_chain", ":U1BPT0Y=:"),
    ("X-Client-Cert", "-----BEGIN%20CERTIFICATE-----%0ASPOOF"),
    ("x_client_cert", "SPOOF"),
    ("X-Client-Cert-Fingerprint", "SPOOF"),
    ("X-Client-Cert-Chain", "SPOOF"),
    ("X-Forwarded-Client-Cert", "Hash=SPOOF;Subject=\"CN=admin\""),
]

MODE_HEADERS = {
    "none": [],
    "pem": ["X-Client-Cert"],
    "xfcc": ["X-Forwarded-Client-Cert"],
    "rfc9440": ["Client-Cert", "Client-Cert-Chain"],
}


@pytest.mark.parametrize("mode", sorted(MODE_HEADERS))
def test_client_sent_certificate_headers_are_always_stripped(start_proxy, chained, mode):
    """
    Whatever --forward-cert says, a client's own Client-Cert,
    Client-Cert-Chain, X-Client-Cert(-*) and X-Forwarded-Client-Cert, in any
    case and with - or _, never reach the backend: it gets exactly the
    headers the proxy made for this mode, once each; and a client without a
    certificate (--client-auth optional) gets none at all.
    """
    proxy = start_proxy("--forward-cert", mode, "--client-auth", "optional")
    echo = echo_of(proxy, chained, SPOOFED)
    assert not any("SPOOF" in v.upper() for _, v in echo.headers), echo.headers
    got = [n for n, _ in identity_of(echo)]
    assert got == [*DEFAULT_HEADERS, *MODE_HEADERS[mode]]
    if mode == "rfc9440":
        assert sf_binary(only(echo, "Client-Cert")) == der_of(chained.issued.cert)
    anonymous = echo_of(proxy, None, SPOOFED)
    assert identity_of(anonymous) == [], anonymous.headers
    assert not any("SPOOF" in v.upper() for _, v in anonymous.headers), anonymous.headers


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLSv1.2", "TLSv1.3"]
)
def test_resumed_session_keeps_every_identity_header(start_proxy, chained, version):
    """
    A resumed TLS session (Python ssl reusing the first connection's session;
    the proxy reports it reused) carries the same identity as the full
    handshake: the same Subject, Fingerprint and every other identity header,
    including Client-Cert-Chain, which OpenSSL does not keep in the session.
    """
    proxy = start_proxy("--forward-cert", "rfc9440")
    context = proxy.context(chained, min_version=version, max_version=version)
    with proxy.tls(context=context) as first:
        full = identity_of(first.request("GET", "/echo/full").echo())
        session = first.session
        assert not first.session_reused
    assert session is not None
    with proxy.tls(context=context, session=session) as second:
        assert second.session_reused, "the proxy did not resume the TLS session"
        resumed = identity_of(second.request("GET", "/echo/resumed").echo())
    assert resumed == full
    names = [n for n, _ in resumed]
    assert names == [*DEFAULT_HEADERS, "Client-Cert", "Client-Cert-Chain"]
    assert dict(resumed)["X-Client-Cert-Fingerprint"] == (
        chained.issued.cert.fingerprint(hashes.SHA256()).hex()
    )
    assert dict(resumed)["X-Client-Cert-Subject"] == "CN=details-chained"
