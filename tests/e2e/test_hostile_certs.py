"""
Certificates built to cause trouble, presented to the running daemon
(docs/identity.md, "Hostile certificates").  For every row of the table that
a real TLS client can present:

  - never a header injection: the backend's header block is exactly the
    expected list of names, each identity value printable ASCII;
  - never a crash: no traceback in the proxy's log (the fixtures fail the
    test on one at teardown);
  - the documented result: forwarded with the documented encoded values (in
    every --forward-cert mode), or refused with the logged reason.

Two rows cannot be driven end to end: a BMPString with half a surrogate pair
and invalid UTF-8 in a UTF8String are refused by OpenSSL's DER decoder, so no
OpenSSL-based client (Python's ssl, curl, s_client) can even load such a
certificate to present it; tests/test_identity_full.py covers them in memory.
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote, unquote_to_bytes

import pytest
from cryptography import x509
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from .extra_certs import (
    A,
    Extra,
    cn,
    der_of,
    der_to_pem,
    doc_encode,
    extra_for,
    is_printable_ascii,
    name,
    parse_xfcc,
    sf_binary,
)
from .harness import Backend, ClientCert, Echo, Pki, Proxy, ProxyLauncher, canonical

pytestmark = [
    pytest.mark.e2e,
    # the 8 KiB CN is longer than X.520 allows, which cryptography warns about
    pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning"),
]

TLS_VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]
CN_OID = NameOID.COMMON_NAME
OU_OID = NameOID.ORGANIZATIONAL_UNIT_NAME

MODE_HEADERS = {
    "none": [],
    "pem": ["x-client-cert"],
    "xfcc": ["x-forwarded-client-cert"],
    "rfc9440": ["client-cert", "client-cert-chain"],
}
IDENTITY = [
    "x-client-cert-cn",
    "x-client-cert-subject",
    "x-client-cert-issuer",
    "x-client-cert-serial",
    "x-client-cert-fingerprint",
    "x-client-cert-san",
    "x-client-cert-not-before",
    "x-client-cert-not-after",
]


@pytest.fixture(scope="module")
def extra(pki: Pki) -> Extra:
    return extra_for(pki)


@dataclass(frozen=True)
class Hostile:
    """
    One row of the table: the certificate, and what docs/identity.md says the
    backend gets (C{None}: the header is left out).  C{subject_header} is the
    documented literal where the table gives one; otherwise the Subject is
    checked against the documented encoding of cryptography's RFC 4514 string.
    C{resign}: bytes of the TBS replaced after signing (what builders refuse).
    """

    label: str
    subject: x509.Name
    cn_header: str | None
    sans: tuple[x509.GeneralName, ...] = ()
    subject_header: str | None = None
    san_header: str | None = None
    resign: tuple[bytes, bytes] | None = None
    problem: str | None = None


ALICE = name(cn("alice"))

FORWARDED = [
    Hostile("crlf-cn", name(cn("alice\r\nX-Admin: 1")), "alice%0D%0AX-Admin: 1"),
    Hostile("nul-cn", name(cn("alice\x00.evil")), "alice%00.evil",
            subject_header="CN=alice\\00.evil"),
    Hostile("quotes-cn", name(cn("a\"b'c")), "a\"b'c", subject_header="CN=a\\\"b'c"),
    Hostile("comma-semicolon-cn", name(cn("a,b;c")), "a,b;c", subject_header="CN=a\\,b\\;c"),
    Hostile("percent-cn", name(cn("%41")), "%2541"),
    Hostile("blanks-cn", name(cn(" alice ")), "%20alice%20"),
    Hostile("utf8-cn", name(cn("J\u00fcrgen \u2603")), "J%C3%BCrgen %E2%98%83"),
    Hostile("bmpstring-cn",
            name(A(CN_OID, "J\u00fcrgen \u2603", _type=_ASN1Type.BMPString)),
            "J%C3%BCrgen %E2%98%83"),
    Hostile("t61string-cn", name(A(CN_OID, "J\u00fcrgen", _type=_ASN1Type.T61String)),
            "J%C3%BCrgen"),
    Hostile("universalstring-cn",
            name(A(CN_OID, "\U0001d11e", _type=_ASN1Type.UniversalString)), "%F0%9D%84%9E"),
    Hostile("several-cns", name(cn("admin"), cn("alice")), "alice",
            subject_header="CN=alice,CN=admin"),
    Hostile("no-cn", name(A(NameOID.ORGANIZATION_NAME, "Ex")), None, subject_header="O=Ex"),
    Hostile("crlf-ou", name(A(NameOID.ORGANIZATIONAL_UNIT_NAME, "eng\r\nX: 1"), cn("alice")),
            "alice", subject_header="CN=alice,OU=eng%0D%0AX: 1"),
    Hostile("quotes-ou", name(A(OU_OID, 'a"b\\c'), cn("alice")), "alice",
            subject_header='CN=alice,OU=a\\"b\\\\c'),
    Hostile("comma-ou", name(A(OU_OID, "eng,OU=admins"), cn("alice")), "alice",
            subject_header="CN=alice,OU=eng\\,OU=admins"),
    Hostile("nul-ou", name(A(OU_OID, "eng\x00admins"), cn("alice")), "alice",
            subject_header="CN=alice,OU=eng\\00admins"),
    Hostile("utf8-ou", name(A(OU_OID, "R\u00e9seau \u2603"), cn("alice")), "alice",
            subject_header="CN=alice,OU=R%C3%A9seau %E2%98%83"),
    Hostile("bmpstring-ou",
            name(A(OU_OID, "R\u00e9seau \u2603", _type=_ASN1Type.BMPString), cn("alice")),
            "alice", subject_header="CN=alice,OU=R%C3%A9seau %E2%98%83"),
    Hostile("crlf-dns-san", ALICE, "alice", sans=(x509.DNSName("a\r\nb.example"),),
            san_header="DNS:a%0D%0Ab.example"),
    Hostile("utf8-nul-dns-san", ALICE, "alice", sans=(x509.DNSName("QZQZ.example"),),
            resign=(b"QZQZ", b"\xc3\xa9\x00Z"), san_header="DNS:%C3%A9%00Z.example"),
    Hostile("comma-uri-san", ALICE, "alice",
            sans=(x509.UniformResourceIdentifier("spiffe://x/a,b"), x509.DNSName("c.example")),
            san_header="URI:spiffe://x/a%2Cb, DNS:c.example"),
    Hostile("quoted-email-san", ALICE, "alice", sans=(x509.RFC822Name('"a b"@example.com'),),
            san_header='email:"a b"@example.com'),
    Hostile("8k-cn", name(cn("x" * 8192)), "x" * 8192, subject_header="CN=" + "x" * 8192),
    Hostile("unreadable-san", ALICE, "alice", sans=(x509.DNSName("QZQZ.example"),),
            resign=(b"QZQZ", b"\xff\xfeQZ"), san_header=None, problem="extensions unreadable"),
]


@dataclass(frozen=True)
class Presented:
    client: ClientCert
    der: bytes
    cert: x509.Certificate


def present(extra: Extra, case: Hostile) -> Presented:
    """The certificate of a row, written for the harness's clients."""
    label = f"hostile-{case.label}"
    if case.resign is not None:
        client, der = extra.resigned_client(label, case.subject, *case.resign, sans=case.sans)
    else:
        client = extra.client(label, case.subject, sans=case.sans)
        der = der_of(client.issued.cert)
    return Presented(client, der, x509.load_der_x509_certificate(der))


def rfc4514_ascii(dn: str) -> str:
    """docs/identity.md, XFCC: non-ASCII (and controls) as RFC 4514 \\XX UTF-8 escapes."""
    return "".join(
        ch if 0x20 <= ord(ch) < 0x7F else "".join(f"\\{b:02X}" for b in ch.encode("utf-8"))
        for ch in dn
    )


def expected_names(case: Hostile, mode: str) -> list[str]:
    """The backend's whole header block, by name: nothing added, nothing split."""
    identity = [
        h for h in IDENTITY
        if (h != "x-client-cert-cn" or case.cn_header is not None)
        and (h != "x-client-cert-san" or case.san_header is not None)
    ]
    # rfc9440: the clients are root-issued, so Client-Cert-Chain (the root) is sent too
    return ["host", *identity, *MODE_HEADERS[mode],
            "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"]


@pytest.fixture(scope="module", params=sorted(MODE_HEADERS))
def mode_stack(
    request: pytest.FixtureRequest, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Backend, Proxy]]:
    """One backend and one proxy with --forward-cert MODE, for every mode."""
    mode = request.param
    workdir = tmp_path_factory.mktemp(f"hostile-{mode}")
    app = Backend.start(workdir / "backend")
    launch = ProxyLauncher(pki, workdir / "proxy", app.url)
    try:
        yield mode, app, launch.start("--forward-cert", mode)
    finally:
        problems = launch.stop_all()
        app.stop()
    if problems:
        pytest.fail("traceback in the proxy log:\n" + "\n\n".join(problems), pytrace=False)


def echo_on(proxy: Proxy, client: ClientCert, target: str) -> tuple[Echo, str]:
    with proxy.tls(client) as conn:
        response = conn.request("GET", target)
        assert response.status == 200, (target, response.status, response.body[:300])
        return response.echo(), conn.peer


def single(echo: Echo, header: str) -> str:
    values = echo.values(header)
    assert len(values) == 1, (header, echo.headers)
    return values[0]


@pytest.mark.parametrize("case", FORWARDED, ids=[c.label for c in FORWARDED])
def test_hostile_certificate_is_forwarded_safely(mode_stack, extra, case):
    """
    A verified certificate with a hostile subject or SAN is forwarded: the
    backend's header block holds exactly the expected header names (no
    injected or split line), every identity value is printable ASCII and the
    documented one (X-Client-Cert-CN, -Subject, -SAN, percent-encoded UTF-8
    that decodes back to the certificate's text), the --forward-cert header
    carries this very certificate, and the access-log line stays one line.
    """
    mode, _, proxy = mode_stack
    presented = present(extra, case)
    cert = presented.cert
    target = f"/echo/{case.label}"
    echo, peer = echo_on(proxy, presented.client, target)

    assert echo.names() == expected_names(case, mode), echo.headers
    for header_name, value in echo.identity_headers() + [
        (n, v) for n, v in echo.headers if canonical(n).startswith("client-cert")
    ]:
        assert is_printable_ascii(value), (header_name, value)
    assert "x-admin" not in echo.names() and "x" not in echo.names()

    cns = cert.subject.get_attributes_for_oid(CN_OID)
    if case.cn_header is None:
        assert cns == []
    else:
        value = single(echo, "X-Client-Cert-CN")
        assert value == case.cn_header
        assert unquote_to_bytes(value).decode("utf-8") == cns[-1].value
    subject = single(echo, "X-Client-Cert-Subject")
    assert subject == doc_encode(cert.subject.rfc4514_string())
    if case.subject_header is not None:
        assert subject == case.subject_header
    if case.san_header is None:
        assert echo.values("X-Client-Cert-SAN") == []
    else:
        assert single(echo, "X-Client-Cert-SAN") == case.san_header
    assert single(echo, "X-Client-Cert-Fingerprint") == hashlib.sha256(presented.der).hexdigest()

    if mode == "pem":
        pem = unquote_to_bytes(single(echo, "X-Client-Cert"))
        assert pem == der_to_pem(presented.der)
    elif mode == "xfcc":
        pairs = parse_xfcc(single(echo, "X-Forwarded-Client-Cert"))
        fields = dict(pairs)
        assert fields["Hash"] == hashlib.sha256(presented.der).hexdigest()
        assert unquote(fields["Cert"]).encode() == der_to_pem(presented.der)
        assert fields["Subject"] == rfc4514_ascii(cert.subject.rfc4514_string())
        elements = [k for k, _ in pairs]
        assert elements[:3] == ["Hash", "Cert", "Subject"]
        assert set(elements[3:]) <= {"URI", "DNS"}
        if case.san_header is None:
            assert elements[3:] == []
    elif mode == "rfc9440":
        assert sf_binary(single(echo, "Client-Cert")) == presented.der

    cn_logged = case.cn_header if case.cn_header is not None else "-"
    proxy.wait_for_log(
        rf'{re.escape(peer)} {re.escape(cn_logged)} "GET {re.escape(target)} HTTP/1\.1" 200 '
    )
    if case.problem is not None:
        proxy.wait_for_log(rf"client {re.escape(peer)}: {re.escape(case.problem)}")
    assert not re.search(r"(?mi)^\s*x-admin", proxy.log_text())
    assert not re.search(r"(?m)^X: 1", proxy.log_text())


def test_quotes_in_the_subject_stay_inside_one_xfcc_value(start_proxy, extra):
    """
    XFCC quotes a subject holding '"', ',', ';', '=' and '\\' as Envoy does:
    the RFC 4514 string verbatim between double quotes (RFC 4514 has
    escaped the quote and the backslash, so it cannot end the quotes); the
    element parses into exactly Hash, Cert, Subject, URI, and the text
    between the quotes is the exact RFC 4514 subject.
    """
    proxy = start_proxy("--forward-cert", "xfcc")
    client = extra.client(
        "hostile-xfcc-quoting", name(cn('a"b,c;d=e\\f')),
        sans=[x509.UniformResourceIdentifier('spiffe://x/a;b=c,d"e')],
    )
    echo, _ = echo_on(proxy, client, "/echo/xfcc-quoting")
    value = single(echo, "X-Forwarded-Client-Cert")
    assert ';Subject="CN=a\\"b\\,c\\;d=e\\\\f";URI="spiffe://x/a;b=c,d%22e"' in value
    pairs = parse_xfcc(value)
    assert [k for k, _ in pairs] == ["Hash", "Cert", "Subject", "URI"]
    fields = dict(pairs)
    assert fields["Subject"] == client.issued.cert.subject.rfc4514_string()
    assert fields["Subject"] == 'CN=a\\"b\\,c\\;d=e\\\\f'
    assert unquote(fields["URI"]) == 'spiffe://x/a;b=c,d"e'


# -- what they may do ---------------------------------------------------------------


def fetch_status(proxy: Proxy, client: ClientCert, target: str) -> tuple[int, str]:
    with proxy.tls(client) as conn:
        return conn.request("GET", target).status, conn.peer


def test_hostile_cns_match_allow_cn_only_by_their_exact_last_cn(start_proxy, backend, extra):
    """
    --allow-cn alice: a CN "alice\\r\\nX-Admin: 1", "alice\\0.evil" or
    " alice " does not match (403, logged percent-encoded on one line); a
    subject whose last CN is alice matches (the last CN is both forwarded and
    checked), one whose last CN is admin does not; a BMPString "alice" is
    the same text and matches.
    """
    proxy = start_proxy("--allow-cn", "alice")
    admitted = {
        "allow-last-cn-alice": name(cn("admin"), cn("alice")),
        "allow-bmp-alice": name(A(CN_OID, "alice", _type=_ASN1Type.BMPString)),
    }
    refused = {
        "allow-crlf": (name(cn("alice\r\nX-Admin: 1")), "CN alice%0D%0AX-Admin: 1"),
        "allow-nul": (name(cn("alice\x00.evil")), "CN alice%00.evil"),
        "allow-blanks": (name(cn(" alice ")), "CN %20alice%20"),
        "allow-last-cn-admin": (name(cn("alice"), cn("admin")), "CN admin"),
        "allow-percent": (name(cn("%61lice")), "CN %2561lice"),
        "allow-no-cn": (name(A(NameOID.ORGANIZATION_NAME, "alice")),
                        "a client certificate without CN"),
    }
    for label, subject in admitted.items():
        status, _ = fetch_status(proxy, extra.client(label, subject), f"/{label}")
        assert status == 200, label
    for label, (subject, who) in refused.items():
        status, peer = fetch_status(proxy, extra.client(label, subject), f"/{label}")
        assert status == 403, label
        proxy.wait_for_log(
            rf"(?m)refused {re.escape(peer)}: not allowed: {re.escape(who)} matches no "
            r"allow-cn, allow-ou or allow-san of the listener rule$"
        )
    assert backend.requests() == [f"GET /{label} HTTP/1.1" for label in admitted]
    assert not re.search(r"(?mi)^\s*x-admin", proxy.log_text())


HOSTILE_OUS = {
    "ou-quotes": 'a"b\\c',
    "ou-nul": "eng\x00admins",
    "ou-utf8": "R\u00e9seau \u2603",
    "ou-admins": "admins",
}


def test_hostile_ous_match_allow_ou_only_exactly(start_proxy, backend, extra):
    """
    allow-ou from a TOML file holding a quote and a backslash, a NUL,
    non-ASCII text, and "admins": a certificate with exactly one of those
    OUs is admitted (the non-ASCII one as a UTF8String and as a BMPString:
    the same text).  Refused with 403 and a "not allowed" line: an OU
    "eng,OU=admins" (a comma does not make a second OU), "eng" (a NUL does
    not end the string), the OU with its NUL dropped, part of the quoted
    one, and "admins " (no trimming).
    """
    toml = "allow-ou = [" + ", ".join(json.dumps(v) for v in HOSTILE_OUS.values()) + "]\n"
    proxy = start_proxy("--config", str(extra.write("hostile-ous.toml", toml)))

    def ou_client(label: str, ou: str, **kwargs: object) -> ClientCert:
        return extra.client(label, name(A(OU_OID, ou, **kwargs), cn(label)))  # type: ignore[arg-type]

    admitted = [ou_client(label, ou) for label, ou in HOSTILE_OUS.items()]
    admitted.append(ou_client("ou-bmp", HOSTILE_OUS["ou-utf8"], _type=_ASN1Type.BMPString))
    refused = [
        ou_client("ou-comma", "eng,OU=admins"),
        ou_client("ou-before-nul", "eng"),
        ou_client("ou-nul-dropped", "engadmins"),
        ou_client("ou-quote-only", 'a"b'),
        ou_client("ou-blank", "admins "),
    ]
    for client in admitted:
        status, _ = fetch_status(proxy, client, f"/{client.kind}")
        assert status == 200, client.kind
    for client in refused:
        status, peer = fetch_status(proxy, client, f"/{client.kind}")
        assert status == 403, client.kind
        proxy.wait_for_log(
            rf"(?m)refused {re.escape(peer)}: not allowed: CN {re.escape(client.kind)} matches "
            r"no allow-cn, allow-ou or allow-san of the listener rule$"
        )
    assert backend.requests() == [f"GET /{c.kind} HTTP/1.1" for c in admitted]


def test_hostile_dns_sans_never_match_a_dns_pattern(start_proxy, backend, extra):
    """
    --allow-san DNS:*.example.com: a DNS SAN holding CR LF, a blank, raw
    UTF-8 and NUL, or bytes cryptography cannot read, never matches (403);
    the unreadable SAN is named in the log as a problem.  The plain
    api.example.com still matches.
    """
    proxy = start_proxy("--allow-san", "DNS:*.example.com")
    plain = extra.client("san-plain", ALICE, sans=[x509.DNSName("api.example.com")])
    assert fetch_status(proxy, plain, "/plain")[0] == 200
    built = {
        "san-crlf": "a\r\nb.example.com",
        "san-blank": " api.example.com",
        "san-star-in-label": "a*.example.com",
    }
    clients = [extra.client(label, ALICE, sans=[x509.DNSName(dns)])
               for label, dns in built.items()]
    clients.append(extra.resigned_client(
        "san-utf8-nul", ALICE, b"QZQZ", b"\xc3\xa9\x00Z", sans=[x509.DNSName("QZQZ.example.com")]
    )[0])
    unreadable, _ = extra.resigned_client(
        "san-unreadable", ALICE, b"QZQZ", b"\xff\xfeQZ", sans=[x509.DNSName("QZQZ.example.com")]
    )
    clients.append(unreadable)
    for client in clients:
        status, peer = fetch_status(proxy, client, f"/{client.kind}")
        assert status == 403, client.kind
        proxy.wait_for_log(rf"refused {re.escape(peer)}: not allowed: CN alice matches no ")
        if client is unreadable:
            proxy.wait_for_log(rf"client {re.escape(peer)}: extensions unreadable")
    assert backend.requests() == ["GET /plain HTTP/1.1"]


# -- refused: what cannot be read cannot be forwarded ---------------------------------

UNREADABLE: list[tuple[str, _ASN1Type, bytes]] = [
    ("T61String", _ASN1Type.T61String, b"\xe9\x00\r\n"),
    ("IA5String", _ASN1Type.IA5String, b"\xff\x00\r\n"),
    ("PrintableString", _ASN1Type.PrintableString, b"a\n\x00@"),
]


@pytest.mark.parametrize(
    ("label", "string_type", "bad"), UNREADABLE, ids=[u[0] for u in UNREADABLE]
)
def test_forbidden_bytes_in_a_string_type_are_refused(proxy, backend, extra, label,
                                                      string_type, bad):
    """
    A T61String, IA5String or PrintableString CN holding bytes its type
    forbids (controls, NUL, bytes above 0x7F): OpenSSL verifies it, the
    proxy cannot read it, so the connection is closed after the handshake,
    over TLS 1.2 and 1.3, logged "unreadable certificate"; nothing reaches
    the backend, nothing crashes.
    """
    subject = name(A(CN_OID, "QZQZ", _type=string_type))
    client, _ = extra.resigned_client(f"hostile-bad-{label}", subject, b"QZQZ", bad)
    for version in TLS_VERSIONS:
        attempt = proxy.attempt(client, max_version=version)
        assert attempt.refused, (version, attempt)
        proxy.wait_for_log(rf"refused {re.escape(attempt.peer)}: unreadable certificate")
    assert backend.requests() == []
    assert proxy.running


def test_proxy_keeps_serving_after_hostile_clients(proxy, backend, extra):
    """
    After a round of hostile clients (forwarded and refused ones), the same
    proxy process still serves an ordinary client.
    """
    for case in FORWARDED:
        with proxy.tls(present(extra, case).client) as conn:
            assert conn.request("GET", f"/echo/{case.label}").status == 200
    for label, string_type, bad in UNREADABLE:
        client, _ = extra.resigned_client(
            f"hostile-bad-{label}", name(A(CN_OID, "QZQZ", _type=string_type)), b"QZQZ", bad
        )
        assert proxy.attempt(client).refused
    assert proxy.running
    assert proxy.curl("/echo/after").echo().values("X-Client-Cert-CN") == ["client"]
    assert len(backend.requests()) == len(FORWARDED) + 1
