"""Certificate -> identity -> header value: the encoding rules, without a reactor."""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from mtlsproxy.identity import (
    ClientIdentity,
    encode_header_value,
    identity_from_certificate,
    identity_headers,
)

from . import certfactory


def test_printable_ascii_is_kept() -> None:
    """Ordinary names pass through untouched, spaces included."""
    assert encode_header_value("alice smith-01.example") == b"alice smith-01.example"


def test_control_characters_are_percent_encoded() -> None:
    """CR, LF, NUL and TAB cannot end the header line: they become %XX."""
    assert encode_header_value("a\r\nX-Evil: 1\x00\t") == b"a%0D%0AX-Evil: 1%00%09"


def test_percent_itself_is_encoded() -> None:
    """A literal % is escaped, so decoding gives back exactly the CN."""
    assert encode_header_value("100%") == b"100%25"


def test_non_ascii_is_utf8_percent_encoded() -> None:
    """Non-ASCII text is sent as percent-encoded UTF-8."""
    assert encode_header_value("Jürgen ☃") == b"J%C3%BCrgen %E2%98%83"


@given(st.text())
def test_any_string_gives_a_safe_reversible_header_value(value: str) -> None:
    """Whatever a CA signed, the value is printable ASCII and decodes back to the original."""
    from urllib.parse import unquote_to_bytes

    encoded = encode_header_value(value)
    assert all(0x20 <= b < 0x7F for b in encoded)
    assert unquote_to_bytes(encoded) == value.encode("utf-8", "surrogatepass")


def test_identity_from_certificate_takes_the_cn() -> None:
    """The subject CN becomes the identity."""
    cert = certfactory.make_client(certfactory.make_ca(), "alice").cert
    assert identity_from_certificate(cert) == ClientIdentity(cn="alice")


def test_certificate_without_cn_gives_no_header() -> None:
    """A subject without a CN yields an identity with no CN, and no header."""
    ca = certfactory.make_ca()
    cert = certfactory.make_client(
        ca, None, attributes=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Org")]
    ).cert
    identity = identity_from_certificate(cert)
    assert identity.cn is None
    assert identity_headers(identity) == []


def test_several_cns_take_the_last() -> None:
    """With several CNs, the last (most specific) one is the identity."""
    ca = certfactory.make_ca()
    cert = certfactory.make_client(
        ca, "second", attributes=[x509.NameAttribute(NameOID.COMMON_NAME, "first")]
    ).cert
    assert identity_from_certificate(cert).cn == "second"


def test_anonymous_client_has_no_identity_headers() -> None:
    """With --client-auth optional and no certificate, nothing is added."""
    assert identity_headers(None) == []


def test_identity_header_is_exactly_one() -> None:
    """One X-Client-Cert-CN, encoded."""
    assert identity_headers(ClientIdentity(cn="a\nb")) == [(b"X-Client-Cert-CN", b"a%0Ab")]
