"""Header hygiene as pure functions: what reaches the backend and the client."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtlsproxy.http.headers import (
    connection_tokens,
    is_reserved,
    request_headers_for_backend,
    response_headers_for_client,
)

RESERVED = [
    b"X-Client-Cert-CN",
    b"x-client-cert-cn",
    b"X_CLIENT_CERT_CN",
    b"X-Client-Cert",
    b"X-Client-Cert-Subject",
    b"x-client-cert_fingerprint",
    b"X-Forwarded-Client-Cert",
    b"X-Forwarded-For",
    b"x_forwarded_for",
    b"X-Forwarded-Proto",
    b"X-FORWARDED-HOST",
    b"Forwarded",
]


@pytest.mark.parametrize("name", RESERVED)
def test_reserved_names_in_every_spelling(name: bytes) -> None:
    """Identity and forwarding headers are reserved whatever their case and separator."""
    assert is_reserved(name)
    assert request_headers_for_backend([(name, b"x")], frozenset()) == []


@given(st.sampled_from(RESERVED), st.lists(st.booleans(), min_size=30, max_size=30))
def test_reserved_survives_any_case_and_separator_mix(name: bytes, flips: list[bool]) -> None:
    """Any mix of upper and lower case, '-' and '_' is still recognised."""
    text = name.decode()
    mixed = "".join(
        ("_" if c in "-_" else c.upper()) if flip else ("-" if c in "-_" else c.lower())
        for c, flip in zip(text, flips, strict=False)
    ) + text[len(flips):]
    assert is_reserved(mixed.encode())


def test_ordinary_headers_are_kept_in_order_with_repeats() -> None:
    """End-to-end headers pass unchanged, repeated ones included, in their order."""
    headers = [(b"Accept", b"a"), (b"Cookie", b"x=1"), (b"Cookie", b"y=2"), (b"X-Custom", b"v")]
    assert request_headers_for_backend(headers, frozenset()) == headers


def test_connection_named_headers_are_removed() -> None:
    """Headers named in Connection are hop-by-hop and removed."""
    headers = [(b"Connection", b"close, X-Foo"), (b"X-Foo", b"1"), (b"X-Bar", b"2")]
    tokens = connection_tokens(headers)
    assert tokens == {b"close", b"x-foo"}
    assert request_headers_for_backend(headers, tokens) == [(b"X-Bar", b"2")]


def test_expect_is_not_forwarded() -> None:
    """The proxy answers Expect: 100-continue itself."""
    assert request_headers_for_backend([(b"Expect", b"100-continue")], frozenset()) == []


def test_response_framing_headers_are_dropped() -> None:
    """Content-Length, Transfer-Encoding and Connection are redone for the client hop."""
    headers = [
        (b"Content-Length", b"5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"keep-alive"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Set-Cookie", b"a=1"),
    ]
    assert response_headers_for_client(headers, connection_tokens(headers)) == [
        (b"Set-Cookie", b"a=1")
    ]


@pytest.mark.parametrize(
    "name",
    [b"Proxy", b"proxy", b"PROXY", b"Proxy_Connection", b"proxy_authorization", b"Keep_Alive",
     b"KEEP_ALIVE", b"Transfer_Encoding", b"Upgrade", b"x-forwarded", b"X_Forwarded",
     b"X-Real-IP", b"x_real_ip"],
)
def test_httpoxy_underscore_hop_by_hop_and_client_address_headers_are_dropped(
    name: bytes,
) -> None:
    """
    Proxy (httpoxy, CVE-2016-5385), hop-by-hop names spelled with '_', and
    the headers other proxies use to name the client never reach the backend.
    """
    headers = [(b"Accept", b"a"), (name, b"http://evil:1"), (b"X-Kept", b"k")]
    assert request_headers_for_backend(headers, frozenset()) == [
        (b"Accept", b"a"), (b"X-Kept", b"k")
    ]


@pytest.mark.parametrize(
    "name", [b"Proxyish", b"X-Proxy", b"X-Forwarded2", b"X-Real-IPs", b"Real-IP"]
)
def test_names_merely_like_the_dropped_ones_are_kept(name: bytes) -> None:
    """Only the exact names (in any spelling) are dropped, not names that contain them."""
    assert request_headers_for_backend([(name, b"v")], frozenset()) == [(name, b"v")]


def test_response_hop_by_hop_names_spelled_with_underscore_are_dropped() -> None:
    headers = [(b"Keep_Alive", b"timeout=5"), (b"Proxy_Connection", b"close"), (b"ETag", b"x")]
    assert response_headers_for_client(headers, frozenset()) == [(b"ETag", b"x")]
