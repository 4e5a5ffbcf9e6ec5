"""
Pure: which client-sent headers reach the backend, and which backend headers reach the client.

Two rules make the identity header trustworthy: every header a client could use
to pose as the proxy is dropped whatever its case and whether it is spelled
with C{-} or C{_} (WSGI and CGI map both to the same variable), and the
C{Connection} header can only remove headers the client sent, never the ones
the proxy adds afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..identity import reserved_extra_names

Headers = list[tuple[bytes, bytes]]

#: Headers only the proxy may set (compared after lower-casing and "_" -> "-"):
#: the identity headers (with RFC 9440's Client-Cert and Client-Cert-Chain,
#: whatever --forward-cert says) and every forwarding header, with the ones
#: other proxies use to say who the client is (X-Real-IP, a bare X-Forwarded):
#: a backend that reads them must only ever see what a proxy wrote.
_RESERVED_EXACT = frozenset({b"forwarded", b"x-forwarded", b"x-real-ip"}) | reserved_extra_names()
_RESERVED_PREFIXES = (b"x-client-cert", b"x-forwarded-")

#: Hop-by-hop headers (RFC 9110 section 7.6.1), handled per connection;
#: compared after "_" -> "-", as backends that read both spellings would.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)


def normalise(name: bytes) -> bytes:
    """The form two spellings of a header share: lower case, C{_} read as C{-}."""
    return name.lower().replace(b"_", b"-")


def is_reserved(name: bytes) -> bool:
    """True for headers that only mtlsproxy may send to the backend."""
    return _is_reserved_lower(name.lower())


def _is_reserved_lower(lower: bytes) -> bool:
    n = lower.replace(b"_", b"-")
    return n.startswith(_RESERVED_PREFIXES) or n in _RESERVED_EXACT


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The lower-cased options of every C{Connection} header, e.g. C{close}, C{keep-alive}."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    tokens.add(token)
    return frozenset(tokens)


#: Never removable through the Connection header: the request's own routing
#: and framing, which the proxy checked and re-frames itself.
_NOT_NAMEABLE = frozenset({b"host", b"content-length"})


#: httpoxy (CVE-2016-5385): CGI turns a request's C{Proxy} header into
#: C{HTTP_PROXY}, which HTTP client libraries take as their proxy; no client
#: has a reason to send it (nginx and Apache advise dropping it).
_HTTPOXY = b"proxy"


def _is_hop_by_hop(lower: bytes, normal: bytes, named: frozenset[bytes]) -> bool:
    """C{lower}: the name lower-cased; C{normal}: that with C{_} read as C{-}."""
    return (
        normal in _HOP_BY_HOP
        or normal.startswith(b"proxy-")
        or (lower in named and lower not in _NOT_NAMEABLE)
    )


def request_headers_for_backend(
    headers: Iterable[tuple[bytes, bytes]], connection: frozenset[bytes]
) -> Headers:
    """
    The client's end-to-end headers, minus everything reserved for the proxy.

    C{Expect} is dropped too: the proxy answers C{100-continue} itself;
    C{Content-Length}, which the proxy writes itself in canonical form (one
    field, no leading zeros) so the backend reads exactly the length checked;
    and C{Proxy} (httpoxy).
    """
    kept: Headers = []
    for name, value in headers:
        lower = name.lower()
        normal = lower.replace(b"_", b"-")
        if (
            _is_hop_by_hop(lower, normal, connection)
            or lower in (b"expect", b"content-length")
            or normal == _HTTPOXY
            or normal.startswith(_RESERVED_PREFIXES)
            or normal in _RESERVED_EXACT
        ):
            continue
        kept.append((name, value))
    return kept


def response_headers_for_client(
    headers: Iterable[tuple[bytes, bytes]], connection: frozenset[bytes]
) -> Headers:
    """The backend's end-to-end headers; framing is redone by the proxy for the client hop."""
    kept: Headers = []
    for name, value in headers:
        lower = name.lower()
        normal = lower.replace(b"_", b"-") if b"_" in lower else lower
        if lower != b"content-length" and not _is_hop_by_hop(lower, normal, connection):
            kept.append((name, value))
    return kept


#: RFC 9110 7.8: protocol = protocol-name ["/" protocol-version], both tokens
_PROTOCOL = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:/[!#$%&'*+\-.^_`|~0-9A-Za-z]+)?")


def upgrade_protocols(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """
    The protocols of every C{Upgrade} field, checked and joined (C{websocket},
    C{h2c, foo/2}); C{None} without any.  Raises C{ValueError} for anything
    that is not a list of RFC 9110 protocols: the value is forwarded on a hop
    where the proxy writes the field itself, so only what was checked goes.
    """
    protocols: list[bytes] = []
    seen = False
    for name, value in headers:
        if name.lower() != b"upgrade":
            continue
        seen = True
        for element in value.split(b","):
            element = element.strip(b" \t")
            if not element:
                continue
            if not _PROTOCOL.fullmatch(element):
                raise ValueError(f"invalid Upgrade protocol {element.decode('latin-1')!r}")
            protocols.append(element)
    if not seen:
        return None
    if not protocols:
        raise ValueError("empty Upgrade header")
    for protocol in protocols:
        if protocol.lower() not in TUNNELLED_PROTOCOLS:
            raise ValueError(
                f"upgrade to {protocol.decode('latin-1')!r} is not proxied (only websocket)"
            )
    return b", ".join(protocols)


#: The protocols a client may switch to through the proxy.  Not h2c above all:
#: a backend that accepts it then reads HTTP/2 requests straight from the
#: client, past the proxy's access rules and identity headers ("h2c
#: smuggling", Bishop Fox 2020).  Envoy also tunnels only the upgrade types
#: it is configured for.
TUNNELLED_PROTOCOLS = frozenset({b"websocket"})
