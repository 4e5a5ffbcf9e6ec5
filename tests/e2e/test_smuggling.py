"""
Request smuggling and message framing through the running daemon (RFC 9112).

The backend here is L{RawBackend}: it records every byte the proxy forwards
and splits the stream with its own strict parser, so each test can say what
the application received, byte for byte.  Before each test one ordinary
request warms the proxy's keep-alive pool, so that a request head the proxy
starts forwarding before it has finished checking the request would show: the
head goes out synchronously on a pooled connection.

What "safe" means, per case:

  - a malformed or ambiguous request head: the client gets 400 (431 when too
    large), the connection is closed, and the backend receives NOTHING;
  - a chunked body that turns out to be malformed after its head was
    forwarded (the proxy streams bodies): 400 and close for the client, and
    the backend never receives a complete request, nothing past the bad
    bytes, and its connection is torn down;
  - a valid request: the backend receives exactly one request, framed
    canonically: one C{Content-Length}, or C{Transfer-Encoding: chunked} with
    canonical chunks (upper-case hex sizes, no extensions, no trailers), never
    both, never the client's own framing fields in any spelling, and the body
    the client meant.
"""

from __future__ import annotations

import io
import re
import ssl
from collections.abc import Iterator
from pathlib import Path

import httptools
import pytest

from .harness import (
    ConnectionClosed,
    HttpResponse,
    Pki,
    Proxy,
    ProxyLauncher,
    TlsConnection,
    collect,
    read_response,
)
from .rawbackend import (
    DEFAULT_BODY,
    RawBackend,
    RawRequest,
    canonical_name,
    fixed_response,
    split_requests,
)

pytestmark = pytest.mark.e2e

HOST = b"Host: localhost"
#: a request that must never reach the backend as a request of its own
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: localhost\r\nX-Client-Cert-CN: admin\r\n\r\n"
#: the classic CL.TE / TE.CL body: the end of a chunked body, then a request
SMUGGLE_BODY = b"0\r\n\r\n" + SMUGGLED


def request(
    *fields: bytes,
    body: bytes = b"",
    method: bytes = b"POST",
    target: bytes = b"/",
    version: bytes = b"HTTP/1.1",
    host: bool = True,
) -> bytes:
    """Exact request bytes: the request line, Host unless told not to, C{fields} as given."""
    lines = [method + b" " + target + b" " + version]
    if host:
        lines.append(HOST)
    lines.extend(fields)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(*fields: bytes, chunks: bytes, **kwargs: bytes) -> bytes:
    """A chunked POST whose body (chunk lines and all) is C{chunks}."""
    return request(b"Transfer-Encoding: chunked", *fields, body=chunks, **kwargs)  # type: ignore[arg-type]


# -- the stack ---------------------------------------------------------------------


class Stack:
    """A raw backend and a proxy forwarding to it."""

    def __init__(self, raw: RawBackend, proxy: Proxy) -> None:
        self.raw = raw
        self.proxy = proxy

    def warm(self) -> None:
        """One ordinary request, so the pool holds an idle connection; then forget it."""
        with self.proxy.tls() as conn:
            response = conn.request("GET", "/warm-up")
            assert response.status == 200, response
        self.raw.wait_for(lambda raw: any(r.complete for r in raw.requests()))
        self.raw.wait_quiet(0.1)
        self.raw.reset()

    def tls(self) -> TlsConnection:
        return self.proxy.tls(timeout=10)


def _start_stack(pki: Pki, workdir: Path, raw: RawBackend, *extra: str) -> Iterator[Stack]:
    raw.start()
    launcher = ProxyLauncher(pki, workdir, raw.url)
    try:
        yield Stack(raw, launcher.start(*extra))
    finally:
        problems = launcher.stop_all()
        raw.stop()
    if problems:
        pytest.fail("traceback in the proxy log:\n" + "\n\n".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def shared_raw_stack(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from _start_stack(pki, tmp_path_factory.mktemp("smuggling"), RawBackend())


@pytest.fixture
def stack(shared_raw_stack: Stack) -> Stack:
    shared_raw_stack.warm()
    return shared_raw_stack


@pytest.fixture
def early_stack(pki: Pki, tmp_path: Path) -> Iterator[Stack]:
    """A backend that answers on the request head and then reads the body it was promised."""
    yield from _start_stack(pki, tmp_path / "early", RawBackend(respond_early=True))


# -- client side helpers -------------------------------------------------------------


def responses_in(data: bytes) -> list[HttpResponse]:
    """The complete responses in C{data}, in order."""
    stream = io.BytesIO(data)
    found = []
    while stream.tell() < len(data):
        try:
            found.append(read_response(stream))
        except ConnectionClosed:
            break
    return found


def send_raw(conn: TlsConnection, data: bytes) -> None:
    """Send, tolerating a proxy that closes before it has read everything."""
    try:
        conn.send(data)
    except (ssl.SSLError, ConnectionError, OSError):
        pass


# -- what the backend must (not) have seen -------------------------------------------------


def assert_nothing_forwarded(stack: Stack) -> None:
    stack.raw.wait_quiet()
    received = stack.raw.received()
    assert received == b"", f"the backend received {received!r}"


def assert_never_complete(stack: Stack) -> None:
    """
    A request whose body went wrong after its head was forwarded: the backend
    holds at most that one incomplete request, nothing of what followed the
    bad bytes, and its connection is closed so it can never be completed.
    """
    stack.raw.wait_quiet()
    for conn in stack.raw.connections():
        if not conn.data:
            continue
        requests, _, error = split_requests(bytes(conn.data))
        assert error is None, f"backend could not parse {bytes(conn.data)!r}: {error}"
        assert len(requests) <= 1 and not any(r.complete for r in requests), (
            f"the backend received a complete request: {bytes(conn.data)!r}"
        )
        assert b"/smuggled" not in conn.data
    stack.raw.wait_for(
        lambda raw: all(c.closed for c in raw.connections() if c.data),
        timeout=5,
    )


def framing_field_names(request: RawRequest) -> list[bytes]:
    """Every field of the request that a backend could read as framing, in any spelling."""
    return [
        n for n, _ in request.headers
        if canonical_name(n) in (b"content-length", b"transfer-encoding")
    ]


def assert_canonical(request: RawRequest, body: bytes) -> None:
    """One complete request, framed by exactly one canonical field, carrying C{body}."""
    assert request.complete, f"incomplete request at the backend: {request.raw!r}"
    assert len(framing_field_names(request)) <= 1, (
        f"more than one framing field (or a client-spelled one) reached the backend: "
        f"{request.head!r}"
    )
    if request.framing == "chunked":
        assert request.framing_fields == [(b"Transfer-Encoding", b"chunked")], request.head
        assert all(re.fullmatch(rb"[1-9A-F][0-9A-F]*", c) for c in request.chunks[:-1]), (
            f"chunk-size lines not canonical: {request.chunks!r}"
        )
        assert request.chunks[-1] == b"0" and request.trailers == b"", request.raw
    elif request.framing == "content-length":
        assert request.framing_fields == [(b"Content-Length", b"%d" % len(body))], request.head
    else:
        assert body == b"", f"body {body!r} forwarded without framing"
    assert request.body == body
    assert request.values("X-Client-Cert-CN") == [b"client"], request.head


def assert_rejected(
    stack: Stack, data: bytes, status: int = 400, body_level: bool = False
) -> None:
    """The client gets C{status} and a closed connection; the refusal is logged."""
    with stack.tls() as conn:
        send_raw(conn, data)
        received, closed = collect(conn)
        peer = conn.peer
    responses = responses_in(received)
    assert responses, f"no response at all (closed={closed}); proxy sent {received!r}"
    assert [r.status for r in responses] == [status], f"proxy answered {received!r}"
    assert responses[0].closes, f"no Connection: close on {received!r}"
    assert closed, "the connection was left open after the error"
    stack.proxy.wait_for_log(rf"refused {re.escape(peer)}: ")
    if body_level:
        assert_never_complete(stack)
    else:
        assert_nothing_forwarded(stack)


# == 1. Content-Length and Transfer-Encoding together (CL.TE, TE.CL)

BOTH = {
    "cl-te": request(b"Content-Length: %d" % len(SMUGGLE_BODY), b"Transfer-Encoding: chunked",
                     body=SMUGGLE_BODY),
    "te-cl": request(b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(SMUGGLE_BODY),
                     body=SMUGGLE_BODY),
    "te-cl-short": request(b"Transfer-Encoding: chunked", b"Content-Length: 3",
                           body=b"5\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
    "cl-0-te": request(b"Content-Length: 0", b"Transfer-Encoding: chunked", body=SMUGGLE_BODY),
    "cl-te-lowercase-names": request(b"content-length: 5", b"transfer-encoding: chunked",
                                     body=SMUGGLE_BODY),
    "cl-te-uppercase-value": request(b"Content-Length: 5", b"Transfer-Encoding: CHUNKED",
                                     body=SMUGGLE_BODY),
    "cl-te-http10": request(b"Content-Length: 5", b"Transfer-Encoding: chunked",
                            body=SMUGGLE_BODY, version=b"HTTP/1.0"),
    "cl-te-in-get": request(b"Content-Length: 5", b"Transfer-Encoding: chunked",
                            body=SMUGGLE_BODY, method=b"GET"),
    "cl-te-x-te": request(b"Content-Length: 5", b"Transfer-Encoding: chunked",
                          b"Transfer-Encoding: x", body=SMUGGLE_BODY),
}


@pytest.mark.parametrize("case", sorted(BOTH))
def test_content_length_with_transfer_encoding_is_rejected(stack: Stack, case: str) -> None:
    """
    RFC 9112 6.1/6.3: a request with both Content-Length and Transfer-Encoding
    is the CL.TE/TE.CL smuggling primitive; the proxy answers 400, closes, and
    forwards nothing (it must not pick one of the two and pass the other on).
    """
    assert_rejected(stack, BOTH[case])


# == 2. Content-Length: differing, duplicate, list-valued, malformed

BAD_LENGTHS = {
    "differing-duplicates": [b"Content-Length: 5", b"Content-Length: 6"],
    "equal-duplicates": [b"Content-Length: 5", b"Content-Length: 5"],
    "duplicate-with-zero": [b"Content-Length: 0", b"Content-Length: 5"],
    "list-equal": [b"Content-Length: 5, 5"],
    "list-differing": [b"Content-Length: 5, 6"],
    "list-trailing-comma": [b"Content-Length: 5,"],
    "plus-sign-cve-2022-24801": [b"Content-Length: +5"],
    "minus-sign": [b"Content-Length: -5"],
    "hex-0x": [b"Content-Length: 0x5"],
    "underscore": [b"Content-Length: 0_5"],
    "decimal-point": [b"Content-Length: 5.0"],
    "exponent": [b"Content-Length: 5e0"],
    "inner-space": [b"Content-Length: 5 5"],
    "letters": [b"Content-Length: abc"],
    "empty": [b"Content-Length: "],
    "arabic-indic-digit": ["Content-Length: \u0665".encode()],
    "fullwidth-digit": ["Content-Length: \uff15".encode()],
    "overflow": [b"Content-Length: 99999999999999999999999999"],
    "vertical-tab": [b"Content-Length:\x0b5"],
    "form-feed-suffix": [b"Content-Length: 5\x0c"],
    "nul-suffix": [b"Content-Length: 5\x00"],
    "space-before-colon": [b"Content-Length : 5"],
    "tab-before-colon": [b"Content-Length\t: 5"],
}


@pytest.mark.parametrize("case", sorted(BAD_LENGTHS))
def test_malformed_or_duplicate_content_length_is_rejected(stack: Stack, case: str) -> None:
    """
    RFC 9112 6.3 (5) and RFC 9110 8.6: Content-Length is 1*DIGIT, once; a
    list, a sign (Twisted's CVE-2022-24801), hex, other digits or a second
    field makes the length ambiguous.  400, closed, nothing forwarded.
    """
    assert_rejected(stack, request(*BAD_LENGTHS[case], body=b"hello" + SMUGGLED))


# == 3. Transfer-Encoding that is not exactly "chunked"

BAD_CODINGS = {
    "final-not-chunked": [b"Transfer-Encoding: chunked, gzip"],
    "gzip-then-chunked": [b"Transfer-Encoding: gzip, chunked"],
    "gzip": [b"Transfer-Encoding: gzip"],
    "identity": [b"Transfer-Encoding: identity"],
    "chunked-chunked": [b"Transfer-Encoding: chunked, chunked"],
    "two-fields-chunked": [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
    "two-fields-chunked-x": [b"Transfer-Encoding: chunked", b"Transfer-Encoding: x"],
    "two-fields-x-chunked": [b"Transfer-Encoding: x", b"Transfer-Encoding: chunked"],
    "xchunked": [b"Transfer-Encoding: xchunked"],
    "chunkedx": [b"Transfer-Encoding: chunkedx"],
    "chunk": [b"Transfer-Encoding: chunk"],
    "cow": [b"Transfer-encoding: cow"],
    "chunked-cow": [b"Transfer-Encoding: chunked, cow"],
    "cow-chunked": [b"Transfer-Encoding: cow, chunked"],
    "nested": [b"Transfer-Encoding: cow chunked bar"],
    "double-quoted": [b'Transfer-Encoding: "chunked"'],
    "single-quoted": [b"Transfer-Encoding: 'chunked'"],
    "parameter": [b"Transfer-Encoding: chunked;q=1"],
    "leading-comma": [b"Transfer-Encoding: ,chunked"],
    "trailing-comma": [b"Transfer-Encoding: chunked,"],
    "empty": [b"Transfer-Encoding: "],
    "vertical-tab-prefix": [b"Transfer-Encoding: \x0bchunked"],
    "form-feed-prefix": [b"Transfer-Encoding:\x0cchunked"],
    "nbsp-prefix": [b"Transfer-Encoding:\xa0chunked"],
    "ff-prefix": [b"Transfer-Encoding:\xffchunked"],
    "cr-suffix": [b"Transfer-Encoding: chunked\r"],
    "tab-suffix": [b"Transfer-Encoding: chunked\t"],
    "space-tab-suffix": [b"Transfer-Encoding: chunked \t"],
    "accented-value": [b"Transfer-Encoding: ch\x96nked"],
    "space-before-colon": [b"Transfer-Encoding : chunked"],
    "tab-around-colon": [b"Transfer-Encoding\t:\tchunked"],
    "cr-in-name": [b"Transfer\r-Encoding: chunked"],
    "accented-name": [b"Transf\x82r-Encoding: chunked"],
    "line-wrapped-value": [b"Transfer-Encoding:\r\n chunked"],
    "lf-wrapped-value": [b"Transfer-Encoding:\n chunked"],
    "obs-fold-second-coding": [b"Transfer-Encoding: chunked,\r\n chunked"],
    "leading-space-name": [b"X: y", b" Transfer-Encoding: chunked"],
    "in-http10": [b"Transfer-Encoding: chunked"],
}


@pytest.mark.parametrize("case", sorted(BAD_CODINGS))
def test_transfer_encoding_other_than_chunked_is_rejected(stack: Stack, case: str) -> None:
    """
    RFC 9112 6.3 (4): a Transfer-Encoding whose final coding is not chunked, or
    that a second parser could read differently (duplicates, odd whitespace,
    quotes, folding: the TE.TE obfuscations of PortSwigger's and defparam's
    scanners), gets 400 and a closed connection, with nothing forwarded, and
    so does Transfer-Encoding in HTTP/1.0 (RFC 9112 6.1).
    """
    version = b"HTTP/1.0" if case == "in-http10" else b"HTTP/1.1"
    assert_rejected(
        stack, request(*BAD_CODINGS[case], body=SMUGGLE_BODY, version=version)
    )


# == 4. Chunked bodies that are malformed (detected after the head went out)

BAD_CHUNKS = {
    "negative-size": b"-5\r\nhello\r\n0\r\n\r\n",
    "plus-size": b"+5\r\nhello\r\n0\r\n\r\n",
    "0x-size-cve-2022-24801": b"0x5\r\nhello\r\n0\r\n\r\n",
    "underscore-size-cve-2022-24801": b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
    "hex-overflow": b"FFFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n",
    "2-to-the-64": b"10000000000000000\r\nhello\r\n0\r\n\r\n",
    "space-before-size": b" 5\r\nhello\r\n0\r\n\r\n",
    "space-after-size": b"5 \r\nhello\r\n0\r\n\r\n",
    "tab-after-size": b"5\t\r\nhello\r\n0\r\n\r\n",
    "empty-size": b"\r\nhello\r\n0\r\n\r\n",
    "non-hex-size": b"g\r\nhello\r\n0\r\n\r\n",
    "size-bare-lf": b"5\nhello\r\n0\r\n\r\n",
    "size-bare-cr": b"5\rhello\r\n0\r\n\r\n",
    "last-chunk-bare-lf": b"5\r\nhello\r\n0\n\r\n",
    "data-bare-lf": b"5\r\nhello\n0\r\n\r\n",
    "data-longer-than-size": b"5\r\nhelloXX\r\n0\r\n\r\n",
    "data-no-crlf": b"5\r\nhello0\r\n\r\n",
    "ext-nul": b"5;\x00\r\nhello\r\n0\r\n\r\n",
    "ext-bare-lf-cve-2022-24801": b"5;a\nb\r\nhello\r\n0\r\n\r\n",
    "ext-bare-cr": b"5;a\rb\r\nhello\r\n0\r\n\r\n",
    "ext-ctl": b"5;a=\x01\r\nhello\r\n0\r\n\r\n",
    "ext-del": b"5;a=\x7f\r\nhello\r\n0\r\n\r\n",
    "ext-space-in-value": b"5;a=b c\r\nhello\r\n0\r\n\r\n",
    "ext-unterminated-quote": b'5;a="b\r\nhello\r\n0\r\n\r\n',
    "trailer-bare-lf": b"5\r\nhello\r\n0\r\nX: y\n\r\n",
    "trailer-obs-fold": b"5\r\nhello\r\n0\r\nX: y\r\n z\r\n\r\n",
    "trailer-content-length": b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n",
    "trailer-nul": b"5\r\nhello\r\n0\r\nX: a\x00b\r\n\r\n",
    "final-bare-lf": b"5\r\nhello\r\n0\r\n\n",
}


@pytest.mark.parametrize("case", sorted(BAD_CHUNKS))
def test_malformed_chunked_body_is_never_completed(stack: Stack, case: str) -> None:
    """
    RFC 9112 7.1: chunk-size is 1*HEXDIG (no sign, no 0x, no _, no
    whitespace, no overflow: Twisted's CVE-2022-24801), extensions are tokens
    or quoted strings, every line ends in CRLF.  The body is streamed, so the
    head may already be at the backend: the client gets 400 and a closed
    connection, and the backend never receives a complete request or
    anything past the bad bytes (its connection is aborted).
    """
    assert_rejected(stack, chunked(chunks=BAD_CHUNKS[case] + SMUGGLED), body_level=True)


LENIENT_EXTENSIONS = {
    "empty-name": b"5;=b",
    "empty-value": b"5;a=",
    "obs-text-in-quoted-value": b'5;a="\xff"',
}


@pytest.mark.parametrize("case", sorted(LENIENT_EXTENSIONS))
def test_chunk_extension_llhttp_tolerates_is_dropped(stack: Stack, case: str) -> None:
    """
    Chunk extensions that RFC 9112 7.1.1 does not allow but llhttp accepts
    (an empty name or value; obs-text in a quoted value): harmless only
    because extensions are never forwarded.  Either 400 with nothing
    complete at the backend, or the body forwarded with canonical chunks.
    """
    data = chunked(chunks=LENIENT_EXTENSIONS[case] + b"\r\nhello\r\n0\r\n\r\n")
    with stack.tls() as conn:
        send_raw(conn, data)
        received, _ = collect(conn, quiet=1.0)
    statuses = [r.status for r in responses_in(received)]
    if statuses == [400]:
        assert_never_complete(stack)
        return
    assert statuses == [200], received[:300]
    stack.raw.wait_quiet()
    requests = stack.raw.requests()
    assert len(requests) == 1, stack.raw.received()
    assert_canonical(requests[0], b"hello")


# == 5. Line endings, folding, whitespace and control characters in the head

BAD_HEADS = {
    "request-line-bare-lf": b"GET / HTTP/1.1\nHost: localhost\r\n\r\n",
    "header-bare-lf": b"GET / HTTP/1.1\r\nHost: localhost\nX: y\r\n\r\n",
    "end-bare-lf": b"GET / HTTP/1.1\r\nHost: localhost\r\n\n",
    "all-bare-lf": b"GET / HTTP/1.1\nHost: localhost\n\n",
    "request-line-bare-cr": b"GET / HTTP/1.1\rHost: localhost\r\n\r\n",
    "header-bare-cr": b"GET / HTTP/1.1\r\nHost: localhost\rX: y\r\n\r\n",
    "cr-cr-lf": b"GET / HTTP/1.1\r\nHost: localhost\r\r\n\r\n",
    "obs-fold-space": b"GET / HTTP/1.1\r\nHost: localhost\r\nX: a\r\n b\r\n\r\n",
    "obs-fold-tab": b"GET / HTTP/1.1\r\nHost: localhost\r\nX: a\r\n\tb\r\n\r\n",
    "space-before-first-field": b"GET / HTTP/1.1\r\n Host: localhost\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost : localhost\r\n\r\n",
    "tab-before-colon": b"GET / HTTP/1.1\r\nHost\t: localhost\r\n\r\n",
    "nul-in-name": b"GET / HTTP/1.1\r\nHost: localhost\r\nX\x00Y: a\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: localhost\r\nX: a\x00b\r\n\r\n",
    "cr-in-name": b"GET / HTTP/1.1\r\nHost: localhost\r\nX\rY: a\r\n\r\n",
    "cr-in-value": b"GET / HTTP/1.1\r\nHost: localhost\r\nX: a\rb\r\n\r\n",
    "lf-in-value": b"GET / HTTP/1.1\r\nHost: localhost\r\nX: a\nb: c\r\n\r\n",
    "ctl-in-value": b"GET / HTTP/1.1\r\nHost: localhost\r\nX: a\x01b\r\n\r\n",
    "del-in-value": b"GET / HTTP/1.1\r\nHost: localhost\r\nX: a\x7fb\r\n\r\n",
    "space-in-name": b"GET / HTTP/1.1\r\nHost: localhost\r\nX Y: a\r\n\r\n",
    "empty-name": b"GET / HTTP/1.1\r\nHost: localhost\r\n: a\r\n\r\n",
    "no-colon": b"GET / HTTP/1.1\r\nHost: localhost\r\nfoo\r\n\r\n",
    "separator-in-name": b"GET / HTTP/1.1\r\nHost: localhost\r\nX(Y): a\r\n\r\n",
    "tab-separated-request-line": b"GET\t/\tHTTP/1.1\r\nHost: localhost\r\n\r\n",
    "space-in-target": b"GET /a b HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "ctl-in-target": b"GET /a\x01b HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "del-in-target": b"GET /a\x7fb HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "nul-in-target": b"GET /a\x00b HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "empty-target": b"GET  HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "bad-method-char": b"G(T / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "no-host-http11": b"GET / HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: localhost\r\nHost: evil\r\n\r\n",
    "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(BAD_HEADS))
def test_malformed_head_is_rejected(stack: Stack, case: str) -> None:
    """
    RFC 9112 2.2, 5.1, 5.2 and RFC 9110 5.5: bare CR or LF line ends,
    obs-fold, whitespace between a field name and its colon, NUL/CR/LF and
    other controls in names or values, and malformed request lines (and
    RFC 9112 3.2's Host rules) get 400, a closed connection, nothing forwarded.
    """
    assert_rejected(stack, BAD_HEADS[case] + SMUGGLED)


# == 6. HTTP versions

BAD_VERSIONS = {
    "http-0.9-request": b"GET /\r\n\r\n",
    "http-0.9-explicit": b"GET / HTTP/0.9\r\nHost: localhost\r\n\r\n",
    "http-1.2": b"GET / HTTP/1.2\r\nHost: localhost\r\n\r\n",
    "http-2.0-as-text": b"GET / HTTP/2.0\r\nHost: localhost\r\n\r\n",
    "http-3.0": b"GET / HTTP/3.0\r\nHost: localhost\r\n\r\n",
    "http-1.10": b"GET / HTTP/1.10\r\nHost: localhost\r\n\r\n",
    "http-01.1": b"GET / HTTP/01.1\r\nHost: localhost\r\n\r\n",
    "http-1": b"GET / HTTP/1\r\nHost: localhost\r\n\r\n",
    "http-11": b"GET / HTTP/11\r\nHost: localhost\r\n\r\n",
    "lower-case-http": b"GET / http/1.1\r\nHost: localhost\r\n\r\n",
    "trailing-space": b"GET / HTTP/1.1 \r\nHost: localhost\r\n\r\n",
    "rtsp": b"GET / RTSP/1.0\r\nHost: localhost\r\n\r\n",
    "rtsp-method": b"DESCRIBE / RTSP/1.0\r\nHost: localhost\r\n\r\n",
    "ice": b"GET / ICE/1.0\r\nHost: localhost\r\n\r\n",
    "ice-source": b"SOURCE / ICE/1.0\r\nHost: localhost\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(BAD_VERSIONS))
def test_unsupported_http_version_is_rejected(stack: Stack, case: str) -> None:
    """
    Only HTTP/1.0 and HTTP/1.1 are forwarded (docs/design.md): HTTP/0.9
    (no headers, no framing), HTTP/1.2, HTTP/2.0 or 3.0 written as text,
    malformed version strings and other protocols (RTSP and Icecast request
    lines, which llhttp accepts as version 1.0) get 400, closed, nothing forwarded.
    """
    assert_rejected(stack, BAD_VERSIONS[case] + SMUGGLED)


# == 7. Size limits


@pytest.mark.parametrize("where", ["target", "method", "header-value", "many-headers"])
def test_oversized_request_head_gets_431(stack: Stack, where: str) -> None:
    """
    A request line or head above --max-header-bytes (65536 by default): the
    documented 431, connection closed, nothing forwarded.  The bytes sent stop
    just past the limit, so the 431 is not lost to a reset.
    """
    over = 65536 + 100
    if where == "target":
        data = b"GET /" + b"a" * over + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
    elif where == "method":
        data = b"A" * over + b" / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    elif where == "header-value":
        data = request(b"X-Big: " + b"b" * over, method=b"GET")
    else:
        data = request(*[b"X-H%d: %s" % (i, b"c" * 60) for i in range(over // 60)], method=b"GET")
    status = 400 if where == "method" else 431  # llhttp may stop a long method earlier
    with stack.tls() as conn:
        send_raw(conn, data)
        received, closed = collect(conn)
    responses = responses_in(received)
    assert responses and responses[0].status in (status, 431), received[:300]
    assert closed
    assert_nothing_forwarded(stack)


# == 8. The public scanners' mutations (defparam smuggler, PortSwigger HTTP Request Smuggler)


def _scanner_mutations() -> dict[str, bytes]:
    """
    The Transfer-Encoding header mutations of defparam's smuggler (configs/
    default.py) and PortSwigger's HTTP Request Smuggler, as header lines.
    """
    named = {
        "nameprefix1": b" Transfer-Encoding: chunked",
        "tabprefix1": b"Transfer-Encoding:\tchunked",
        "tabprefix2": b"Transfer-Encoding\t:\tchunked",
        "spacejoin1": b"Transfer Encoding: chunked",
        "underjoin1": b"Transfer_Encoding: chunked",
        "smashed": b"Transfer Encoding:chunked",
        "space1": b"Transfer-Encoding : chunked",
        "valueprefix1": b"Transfer-Encoding:  chunked",
        "vertprefix1": b"Transfer-Encoding:\x0bchunked",
        "commaCow": b"Transfer-Encoding: chunked, cow",
        "cowComma": b"Transfer-Encoding: cow, chunked",
        "contentEnc": b"Content-Encoding: chunked",
        "linewrapped1": b"Transfer-Encoding:\n chunked",
        "quoted": b'Transfer-Encoding: "chunked"',
        "aposed": b"Transfer-Encoding: 'chunked'",
        "lazygrep": b"Transfer-Encoding: chunk",
        "sarcasm": b"TrAnSFer-EnCODinG: cHuNkeD",
        "yelling": b"TRANSFER-ENCODING: CHUNKED",
        "0dsuffix": b"Transfer-Encoding: chunked\r",
        "tabsuffix": b"Transfer-Encoding: chunked\t",
        "revdualchunk": b"Transfer-Encoding: cow\r\nTransfer-Encoding: chunked",
        "dualchunk": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: cow",
        "0dspam": b"Transfer\r-Encoding: chunked",
        "nested": b"Transfer-Encoding: cow chunked bar",
        "spaceFF": b"Transfer-Encoding:\xffchunked",
        "accentTE": b"Transf\x82r-Encoding: chunked",
        "accentCH": b"Transfer-Encoding: ch\x96nked",
        "unispace": b"Transfer-Encoding:\xa0chunked",
        "connection": b"Connection: Transfer-Encoding\r\nTransfer-Encoding: chunked",
        "x-te-underscore-lower": b"transfer_encoding: chunked",
    }
    for c in (0x01, 0x04, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1F, 0x20, 0x7F, 0xA0, 0xFF):
        ch = bytes([c])
        named[f"midspace-{c:02x}"] = b"Transfer-Encoding:" + ch + b"chunked"
        named[f"postspace-{c:02x}"] = b"Transfer-Encoding" + ch + b": chunked"
        named[f"prespace-{c:02x}"] = ch + b"Transfer-Encoding: chunked"
        named[f"endspace-{c:02x}"] = b"Transfer-Encoding: chunked" + ch
        named[f"xprespace-{c:02x}"] = b"X: X" + ch + b"Transfer-Encoding: chunked"
        named[f"endspacex-{c:02x}"] = b"Transfer-Encoding: chunked" + ch + b"X: X"
        named[f"rxprespace-{c:02x}"] = b"X: X\r" + ch + b"Transfer-Encoding: chunked"
        named[f"xnprespace-{c:02x}"] = b"X: X" + ch + b"\nTransfer-Encoding: chunked"
        named[f"endspacerx-{c:02x}"] = b"Transfer-Encoding: chunked\r" + ch + b"X: X"
        named[f"endspacexn-{c:02x}"] = b"Transfer-Encoding: chunked" + ch + b"\nX: X"
    return named


SCANNER = _scanner_mutations()


def llhttp_messages(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(method, target, body) of each request llhttp completes in C{data}, until its first error."""

    class Collect:
        def __init__(self) -> None:
            self.messages: list[tuple[bytes, bytes, bytes]] = []
            self.url = b""
            self.body = b""

        def on_message_begin(self) -> None:
            self.url, self.body = b"", b""

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            self.messages.append((parser.get_method(), self.url, self.body))

    collector = Collect()
    parser = httptools.HttpRequestParser(collector)
    try:
        parser.feed_data(data)
    except httptools.HttpParserError:
        pass
    return collector.messages


@pytest.mark.parametrize("framing", ["cl-te", "te-cl"])
@pytest.mark.parametrize("mutation", sorted(SCANNER))
def test_scanner_mutation_is_rejected_or_forwarded_canonically(
    stack: Stack, mutation: str, framing: str
) -> None:
    """
    Each Transfer-Encoding mutation of the public smuggling scanners, sent as
    their CL.TE probe (Content-Length first) and TE.CL probe (mutated TE
    first), with a smuggled request after the chunked terminator.  Whatever
    the proxy makes of the mutation, it must be safe: either 400 + close +
    nothing forwarded, or every forwarded request is complete, canonically
    framed (one framing field, no client spelling of Content-Length or
    Transfer-Encoding in any case or with "_"), carries the client's own
    identity only, and has the body the proxy's own parse gave it.
    """
    length = b"Content-Length: %d" % len(SMUGGLE_BODY)
    mutated = SCANNER[mutation]
    fields = [length, mutated] if framing == "cl-te" else [mutated, length]
    data = request(*fields, body=SMUGGLE_BODY)
    with stack.tls() as conn:
        send_raw(conn, data)
        received, closed = collect(conn)
    responses = responses_in(received)
    statuses = [r.status for r in responses]
    stack.raw.wait_quiet()
    forwarded = [r for c in stack.raw.connections() for r in c.requests()]
    if 400 in statuses:
        assert statuses[-1] == 400 and closed, f"after a 400 the connection stays open: {statuses}"
    if not forwarded:
        assert statuses == [400], f"nothing forwarded but the client got {received[:300]!r}"
        return
    expected = llhttp_messages(data)
    assert len(forwarded) <= len(expected), (
        f"the backend received {len(forwarded)} requests, the proxy parsed {len(expected)}: "
        f"{stack.raw.received()!r}"
    )
    for got, (method, target, body) in zip(forwarded, expected, strict=False):
        assert (got.method, got.target) == (method, target)
        assert_canonical(got, body)
    assert statuses.count(200) == len(forwarded)


# == 9. Valid requests: one request, re-framed canonically

VALID = {
    "content-length": (request(b"Content-Length: 5", body=b"hello"), b"hello"),
    "content-length-zero": (request(b"Content-Length: 0"), b""),
    "content-length-leading-zeros": (request(b"Content-Length: 005", body=b"hello"), b"hello"),
    "content-length-ows": (request(b"Content-Length:   5  ", body=b"hello"), b"hello"),
    "content-length-on-get": (request(b"Content-Length: 5", body=b"hello", method=b"GET"),
                              b"hello"),
    "content-length-http10": (request(b"Content-Length: 5", body=b"hello", version=b"HTTP/1.0"),
                              b"hello"),
    "chunked": (chunked(chunks=b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), b"hello world"),
    "chunked-upper-case-coding": (request(b"Transfer-Encoding: CHUNKED",
                                          body=b"5\r\nhello\r\n0\r\n\r\n"), b"hello"),
    "chunked-leading-tab": (request(b"Transfer-Encoding:\tchunked",
                                    body=b"5\r\nhello\r\n0\r\n\r\n"), b"hello"),
    "chunked-trailing-space": (request(b"Transfer-Encoding: chunked ",
                                       body=b"5\r\nhello\r\n0\r\n\r\n"), b"hello"),
    "chunked-leading-zeros": (chunked(chunks=b"0005\r\nhello\r\n000\r\n\r\n"), b"hello"),
    "chunked-lower-hex": (chunked(chunks=b"a\r\n0123456789\r\n0\r\n\r\n"), b"0123456789"),
    "chunked-extensions": (chunked(chunks=b'5;a=b;c="d;e"\r\nhello\r\n0;z\r\n\r\n'), b"hello"),
    "chunked-trailers": (chunked(chunks=b"5\r\nhello\r\n0\r\nX-Trailer: t\r\nY: u\r\n\r\n"),
                         b"hello"),
    "chunked-empty": (chunked(chunks=b"0\r\n\r\n"), b""),
    "chunked-body-looks-like-request": (
        chunked(chunks=b"%X\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLE_BODY), SMUGGLE_BODY)),
        SMUGGLE_BODY,
    ),
    "content-length-body-looks-like-request": (
        request(b"Content-Length: %d" % len(SMUGGLE_BODY), body=SMUGGLE_BODY), SMUGGLE_BODY
    ),
    "connection-names-content-length": (
        request(b"Connection: Content-Length", b"Content-Length: 5", body=b"hello"), b"hello"
    ),
    "connection-names-transfer-encoding": (
        chunked(b"Connection: Transfer-Encoding", chunks=b"5\r\nhello\r\n0\r\n\r\n"), b"hello"
    ),
    "te-trailers-header": (request(b"TE: trailers", b"Content-Length: 5", body=b"hello"),
                           b"hello"),
}


@pytest.mark.parametrize("case", sorted(VALID))
def test_valid_request_is_reframed_canonically(stack: Stack, case: str) -> None:
    """
    A valid request (RFC 9112 6) reaches the backend as exactly one request
    with exactly one framing field of the proxy's own making: Content-Length
    with the body's length, or Transfer-Encoding: chunked with canonical
    chunks (no extensions, no trailers, no leading zeros); never both, and
    never the client's framing field copied through; the body is the one the
    client sent.  The client gets the backend's response and the connection
    stays open (HTTP/1.1) for the next request.
    """
    data, body = VALID[case]
    with stack.tls() as conn:
        conn.send(data)
        response = conn.read_response()
        assert response.status == 200 and response.body == DEFAULT_BODY, response
        if b"HTTP/1.0" not in data.split(b"\r\n", 1)[0]:
            assert not response.closes
            assert conn.request("GET", "/after").status == 200
    stack.raw.wait_quiet()
    requests = stack.raw.requests()
    assert len(requests) == (1 if b"HTTP/1.0" in data.split(b"\r\n", 1)[0] else 2), (
        stack.raw.received()
    )
    assert requests[0].target == b"/"
    assert_canonical(requests[0], body)
    if len(requests) == 2:
        assert_canonical(requests[1], b"")
        assert requests[1].target == b"/after"


UNDERSCORE_FRAMING = {
    "transfer_encoding": [b"Content-Length: 5", b"Transfer_Encoding: chunked"],
    "TRANSFER_ENCODING": [b"Content-Length: 5", b"TRANSFER_ENCODING: chunked"],
    "content_length-larger": [b"Content-Length: 5", b"Content_Length: 40"],
    "content_length-zero": [b"Content_Length: 0", b"Content-Length: 5"],
}


@pytest.mark.parametrize("case", sorted(UNDERSCORE_FRAMING))
def test_underscore_spellings_of_framing_fields_never_reach_the_backend(
    stack: Stack, case: str
) -> None:
    """
    The proxy already treats "_" and "-" as the same character for the
    identity headers, because WSGI/CGI servers map both to one variable; the
    same servers (and some HTTP front ends) read Content_Length or
    Transfer_Encoding as framing.  Such a field must never reach the backend
    beside the proxy's own framing: either 400 and nothing forwarded, or the
    request forwarded without it.
    """
    data = request(*UNDERSCORE_FRAMING[case], body=b"hello" + SMUGGLED)
    with stack.tls() as conn:
        send_raw(conn, data)
        received, _ = collect(conn, quiet=1.0)
    statuses = [r.status for r in responses_in(received)]
    stack.raw.wait_quiet()
    requests = stack.raw.requests()
    if statuses[:1] == [400]:
        assert requests == []
        return
    assert requests, f"nothing forwarded, client got {received[:300]!r}"
    assert_canonical(requests[0], b"hello")


# == 10. Pipelining

PIPELINES = {
    "cl-then-smuggled-looking": (
        request(b"Content-Length: 5", body=b"hello", target=b"/first")
        + request(b"X-Client-Cert-CN: admin", b"Content-Length: 3", body=b"abc",
                  target=b"/second"),
        [(b"/first", b"hello"), (b"/second", b"abc")],
    ),
    "chunked-with-fake-terminator-in-data": (
        chunked(chunks=b"%X\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLE_BODY), SMUGGLE_BODY),
                target=b"/first")
        + request(method=b"GET", target=b"/second"),
        [(b"/first", SMUGGLE_BODY), (b"/second", b"")],
    ),
    "get-then-chunked": (
        request(method=b"GET", target=b"/first")
        + chunked(b"X-Forwarded-For: 10.0.0.1", chunks=b"3\r\nabc\r\n0\r\n\r\n",
                  target=b"/second"),
        [(b"/first", b""), (b"/second", b"abc")],
    ),
    "http10-keep-alive-then-http11": (
        request(b"Connection: keep-alive", b"Content-Length: 2", body=b"ab", target=b"/first",
                version=b"HTTP/1.0")
        + request(method=b"GET", target=b"/second"),
        [(b"/first", b"ab"), (b"/second", b"")],
    ),
    "body-is-a-whole-request": (
        request(b"Content-Length: %d" % len(SMUGGLED), body=SMUGGLED, target=b"/first")
        + SMUGGLED.replace(b"/smuggled", b"/second"),
        [(b"/first", SMUGGLED), (b"/second", b"")],
    ),
}


@pytest.mark.parametrize("case", sorted(PIPELINES))
def test_pipelined_requests_reach_the_backend_as_sent(stack: Stack, case: str) -> None:
    """
    Two requests in one write, the second smuggled-looking (a spoofed
    identity header, a body that looks like a request): the backend receives
    exactly those two requests in order, each with its own body and
    canonical framing and the proxy's identity headers only, and the client
    gets two responses in order.
    """
    data, expected = PIPELINES[case]
    with stack.tls() as conn:
        conn.send(data)
        first = conn.read_response()
        second = conn.read_response()
    assert (first.status, second.status) == (200, 200)
    stack.raw.wait_quiet()
    requests = stack.raw.requests()
    assert [(r.target, r.body) for r in requests] == expected, stack.raw.received()
    for got, (_, body) in zip(requests, expected, strict=True):
        assert_canonical(got, body)
        assert got.values("X-Forwarded-For") == [b"127.0.0.1"]


def _target_response(req: RawRequest) -> bytes:
    return fixed_response(req.target)


def test_pipelined_responses_stay_in_order_with_a_slow_first_request(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The pattern of Twisted's CVE-2023-46137 and CVE-2024-41671 (pipelined
    requests answered out of order, one client reading another's response):
    three pipelined requests, the first slow at the backend and the second
    with a body; the responses come back in request order, each to its own
    request.
    """
    monkeypatch.setattr(stack.raw, "response", _target_response)
    monkeypatch.setattr(stack.raw, "delay", lambda r: 0.5 if r.target == b"/slow" else 0.0)
    data = (
        request(method=b"GET", target=b"/slow")
        + request(b"Content-Length: 3", body=b"abc", target=b"/with-body")
        + chunked(chunks=b"1\r\nx\r\n0\r\n\r\n", target=b"/fast")
    )
    with stack.tls() as conn:
        conn.send(data)
        bodies = [conn.read_response().body for _ in range(3)]
    assert bodies == [b"/slow", b"/with-body", b"/fast"]


def test_http10_pipeline_without_keep_alive_forwards_only_the_first(stack: Stack) -> None:
    """
    An HTTP/1.0 request without keep-alive ends its connection (RFC 9112
    9.3): a request pipelined behind it is never forwarded (CVE-2024-41671's
    HTTP/1.0 pipeline).
    """
    data = request(method=b"GET", target=b"/first", version=b"HTTP/1.0") + SMUGGLED
    with stack.tls() as conn:
        conn.send(data)
        received, closed = collect(conn)
    assert [r.status for r in responses_in(received)] == [200]
    assert closed
    stack.raw.wait_quiet()
    assert [r.target for r in stack.raw.requests()] == [b"/first"]


def test_request_after_connection_close_is_not_forwarded(stack: Stack) -> None:
    """A request pipelined behind one that says Connection: close is dropped with the connection."""
    data = request(b"Connection: close", method=b"GET", target=b"/first") + SMUGGLED
    with stack.tls() as conn:
        conn.send(data)
        received, closed = collect(conn)
    assert [r.status for r in responses_in(received)] == [200]
    assert closed
    stack.raw.wait_quiet()
    assert [r.target for r in stack.raw.requests()] == [b"/first"]


@pytest.mark.parametrize("bad", ["two-content-lengths", "te-tab-suffix", "bare-lf"])
def test_malformed_request_behind_a_valid_one_is_not_forwarded(stack: Stack, bad: str) -> None:
    """
    A malformed request pipelined behind a valid one: the valid one is
    answered, then the connection closes (400 or close), and only the valid
    one reaches the backend.
    """
    second = {
        "two-content-lengths": request(b"Content-Length: 1", b"Content-Length: 2", body=b"ab"),
        "te-tab-suffix": request(b"Transfer-Encoding: chunked\t", body=b"0\r\n\r\n"),
        "bare-lf": b"GET /second HTTP/1.1\nHost: localhost\n\n",
    }[bad]
    with stack.tls() as conn:
        conn.send(request(method=b"GET", target=b"/first") + second + SMUGGLED)
        received, closed = collect(conn)
    statuses = [r.status for r in responses_in(received)]
    assert statuses in ([200], [200, 400]), received[:500]
    assert closed
    stack.raw.wait_quiet()
    assert [r.target for r in stack.raw.requests()] == [b"/first"], stack.raw.received()


# == 11. Requests that end the HTTP exchange: Upgrade and CONNECT

DESYNC_OPENERS = {
    "upgrade-websocket": [b"Connection: Upgrade", b"Upgrade: websocket"],
    "upgrade-h2c": [b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c",
                    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"],
    "connect": [],
}


def _carrier(target: bytes = b"/carrier") -> bytes:
    """An honest request whose body is a forged request with someone else's identity."""
    return request(b"Content-Length: %d" % len(SMUGGLED), body=SMUGGLED, target=target)


@pytest.mark.parametrize("case", sorted(DESYNC_OPENERS))
def test_body_length_of_upgrade_and_connect_requests_matches_what_is_sent(
    early_stack: Stack, case: str
) -> None:
    """
    A request that asks for Upgrade (or is a CONNECT) and declares a
    Content-Length N: whatever the proxy does with it, the backend must never
    be told "N body bytes follow" unless N body bytes follow.  Otherwise a
    backend that answers before reading the body (Node.js, h11) and then reads
    N bytes takes them from the next request on the same pooled connection,
    and a forged request hidden in that next request's body is read as a
    request of its own, with the forger's choice of X-Client-Cert-CN.

    The test first sends the carrier request once to learn the length N of
    its forwarded head, then the opener with Content-Length N on one
    connection and the carrier on another; every request the backend reads
    must be one a client sent, with the client's own identity.
    """
    stack = early_stack
    with stack.tls() as conn:
        conn.send(_carrier())
        assert conn.read_response().status == 200
    stack.raw.wait_for(lambda raw: any(r.complete for r in raw.requests()))
    stack.raw.wait_quiet()
    head_length = len(stack.raw.requests()[0].head)
    stack.raw.reset()

    method, target = (b"CONNECT", b"localhost:443") if case == "connect" else (b"POST", b"/a")
    opener = request(*DESYNC_OPENERS[case], b"Content-Length: %d" % head_length,
                     method=method, target=target)
    with stack.tls() as conn:
        send_raw(conn, opener)
        collect(conn, quiet=1.0)
    with stack.tls() as conn:
        conn.send(_carrier())
        collect(conn, quiet=1.0)
    stack.raw.wait_quiet()
    seen = stack.raw.requests()
    for got in seen:
        assert got.values("X-Client-Cert-CN") == [b"client"], (
            f"the backend read a request with identity {got.values('X-Client-Cert-CN')!r}: "
            f"{got.head!r}\nall received: {stack.raw.received()!r}"
        )
        assert got.target in (target, b"/carrier"), (
            f"the backend read a request no client sent: {got.head!r}\n"
            f"all received: {stack.raw.received()!r}"
        )


# == 12. Host (RFC 9112 3.2)

MISSING_HOST = {
    "http10-without-host": request(method=b"GET", version=b"HTTP/1.0", host=False),
    "connection-names-host": request(b"Connection: Host", method=b"GET"),
}


@pytest.mark.parametrize("case", sorted(MISSING_HOST))
def test_forwarded_request_always_has_exactly_one_host(stack: Stack, case: str) -> None:
    """
    RFC 9112 3.2: a client MUST send Host in every HTTP/1.1 request (empty
    when there is no authority).  The proxy talks HTTP/1.1 to the backend, so
    every request it forwards has exactly one Host, whether the client was
    HTTP/1.0 without one or named Host in Connection.
    """
    with stack.tls() as conn:
        send_raw(conn, MISSING_HOST[case])
        received, _ = collect(conn, quiet=1.0)
    statuses = [r.status for r in responses_in(received)]
    stack.raw.wait_quiet()
    requests = stack.raw.requests()
    if statuses == [400]:
        assert requests == []
        return
    assert len(requests) == 1, stack.raw.received()
    assert len(requests[0].values("Host")) == 1, requests[0].head


INVALID_HOSTS = {
    "space": b"Host: local host",
    "slash": b"Host: localhost/admin",
    "at-sign": b"Host: user@localhost",
    "backslash": b"Host: localhost\\admin",
    "question-mark": b"Host: localhost?x",
    "hash": b"Host: localhost#x",
    "bad-port": b"Host: localhost:44x3",
}


@pytest.mark.parametrize("case", sorted(INVALID_HOSTS))
def test_invalid_host_is_rejected(stack: Stack, case: str) -> None:
    """
    RFC 9112 3.2: a server MUST answer 400 to a request whose Host field
    value is invalid (not uri-host [":" port]); the proxy must not pass it to
    an application that builds URLs or routes on it.
    """
    data = b"GET / HTTP/1.1\r\n" + INVALID_HOSTS[case] + b"\r\n\r\n"
    assert_rejected(stack, data)


def test_absolute_form_target_replaces_host(stack: Stack) -> None:
    """
    RFC 9112 3.2.2: with an absolute-form request-target, Host is ignored
    and a proxy forwarding the request MUST generate Host from the target's
    authority, so the backend never sees a Host that disagrees with the
    target (or the proxy refuses the request).
    """
    data = b"GET http://other.example/x HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with stack.tls() as conn:
        send_raw(conn, data)
        received, _ = collect(conn, quiet=1.0)
    statuses = [r.status for r in responses_in(received)]
    stack.raw.wait_quiet()
    requests = stack.raw.requests()
    if statuses == [400]:
        assert requests == []
        return
    assert len(requests) == 1
    assert requests[0].values("Host") == [b"other.example"], requests[0].head


# == 13. Trailers, and requests after the proxy said "Connection: close"


def test_trailer_fields_never_become_header_fields(stack: Stack) -> None:
    """
    RFC 9110 6.5.2: trailer fields must not be merged into the header
    section.  A chunked request pipelined behind another is parsed whole
    before its head is forwarded (so is any request while the backend
    connection is still being opened); its trailers (a second Host, an
    arbitrary field) must not appear in the forwarded head, and Host (and
    X-Forwarded-Host) stay the ones the proxy checked.
    """
    data = request(method=b"GET", target=b"/first") + chunked(
        chunks=b"1\r\nx\r\n0\r\nHost: evil.example\r\nX-Trailer-Injected: yes\r\n\r\n",
        target=b"/second",
    )
    with stack.tls() as conn:
        conn.send(data)
        statuses = [conn.read_response().status for _ in range(2)]
    assert statuses == [200, 200]
    stack.raw.wait_quiet()
    requests = stack.raw.requests()
    assert [r.target for r in requests] == [b"/first", b"/second"]
    second = requests[1]
    assert second.values("Host") == [b"localhost"], second.head
    assert second.values("X-Forwarded-Host") == [b"localhost"], second.head
    assert second.values("X-Trailer-Injected") == [], second.head
    assert_canonical(second, b"x")


AFTER_CLOSE = {
    "pipelined-request": b"lo" + request(b"Content-Length: 3", body=b"abc", target=b"/after"),
    "malformed-rest-of-body": b"0;x=1\r\nhello\r\n0\r\nT: v\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(AFTER_CLOSE))
def test_nothing_is_processed_after_the_proxy_answers_connection_close(
    early_stack: Stack, case: str
) -> None:
    """
    RFC 9112 9.6: a server that sends "Connection: close" must not process
    any further request on that connection.  The backend answers before the
    request body has all arrived, so the proxy's response says
    "Connection: close"; bytes the client sends afterwards (before the
    connection is gone) are neither forwarded as a new request nor allowed
    to raise an exception in the proxy (the stack fixture fails the test on
    a traceback in the proxy's log).
    """
    stack = early_stack
    if case == "pipelined-request":
        head = request(b"Content-Length: 5", target=b"/up")
        first, rest = head + b"hel", AFTER_CLOSE[case]
    else:
        first, rest = chunked(chunks=b"", target=b"/up"), AFTER_CLOSE[case]
    with stack.tls() as conn:
        conn.send(first)
        response = conn.read_response()
        assert response.status == 200 and response.closes, response
        send_raw(conn, rest)
        collect(conn, quiet=1.0)
    stack.raw.wait_quiet()
    targets = [r.target for r in stack.raw.requests()]
    assert targets == [b"/up"], stack.raw.received()
    assert "Traceback" not in stack.proxy.log_text(), stack.proxy.log_text()[-3000:]
