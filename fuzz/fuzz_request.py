#!/usr/bin/env python3
"""
Atheris harness for mtlsproxy's request path (not run in CI; see fuzz/README.md).

Each input is turned into: a few flags (does the fake backend answer as soon
as a request head arrives, is the client's connection loss delivered late,
is the backend pool cold so that the head waits for a connection), the
offsets at which the client's bytes are cut into reads, and the client's
bytes.  They are fed to an in-memory L{ClientConnection} with a fake backend
that answers every request it can delimit (the L{Driver} of
C{tests/test_parsing_properties.py}), and then the invariants of
L{check_invariants} must hold:

  - no exception escapes the proxy's protocol callbacks;
  - every backend connection's byte stream can be delimited by a strict
    RFC 9112 parser: never both Content-Length and Transfer-Encoding, never
    differing lengths, no bare CR/LF, obs-fold, or invalid field;
  - each forwarded request is the one llhttp parsed (method, target, body),
    a request llhttp completed is complete at the backend or its connection
    is closed, a pooled backend connection is at a message boundary;
  - nothing is forwarded after the proxy decided to close the client;
  - the identity headers are exactly the proxy's own, once each.

Known, already reported bugs are masked by default so that the fuzzer looks
for new ones (C{--strict} unmasks them): a duplicate-but-equal
Content-Length and missing Host fields (C{strict_framing} and C{strict_host}
off), framing violations of messages after which llhttp signalled an
upgrade (Upgrade and CONNECT requests), requests forwarded after the
proxy answered "Connection: close", trailer fields merged into a forwarded
head, and the ValueError of a body that goes wrong after an early response
(L{KNOWN}, L{KNOWN_EXCEPTIONS}).

    .venv/bin/python fuzz/fuzz_request.py [--strict] CORPUS_DIR [libFuzzer options]

An empty or missing CORPUS_DIR is seeded with requests from the test suite.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

with atheris.instrument_imports(include=["mtlsproxy"]):
    import mtlsproxy.http.backend  # noqa: F401
    import mtlsproxy.http.headers  # noqa: F401
    import mtlsproxy.http.server  # noqa: F401

from tests.test_parsing_properties import (  # noqa: E402
    Driver,
    check_invariants,
    reference_messages,
    split_at,
)

STRICT = False

#: libFuzzer dictionary: the words framing depends on
TOKENS = [
    b"GET", b"POST", b"HEAD", b"CONNECT", b"OPTIONS", b" HTTP/1.1\r\n", b" HTTP/1.0\r\n",
    b" HTTP/0.9\r\n", b" HTTP/2.0\r\n", b" RTSP/1.0\r\n", b"\r\n", b"\r\n\r\n", b"\n", b"\r",
    b"Host: a\r\n", b"Content-Length: ", b"Transfer-Encoding: ", b"chunked", b"gzip",
    b"Connection: ", b"close", b"keep-alive", b"Upgrade", b"Upgrade: websocket\r\n",
    b"Expect: 100-continue\r\n", b"TE: trailers\r\n", b"Trailer: x\r\n",
    b"X-Client-Cert-CN: admin\r\n", b"X_Client_Cert_CN", b"X-Forwarded-For",
    b"Transfer_Encoding", b"Content_Length", b"0\r\n\r\n", b"5\r\nhello\r\n", b";ext=v",
    b'="q"', b"0x", b"+", b"-", b"_", b"FFFFFFFFFFFFFFFFF", b"\t", b"\x0b", b"\x00", b" ",
    b":", b",", b"http://a/", b"*",
]

SEEDS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;x=1\r\nhello\r\n0\r\nT: v\r\n\r\n",
    b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
    b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
    b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n"
    b"abGET / HTTP/1.0\r\n\r\n",
    b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nab",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
]


#: violations of already reported bugs, masked unless --strict
KNOWN = (
    # the proxy keeps parsing and forwarding after it answered "Connection:
    # close" (a response that came before the request body had all arrived)
    "forwarded after the proxy decided to close",
    # trailer fields of a request whose head is sent after its body was
    # parsed (pipelined, or while connecting) end up in the forwarded head
    "(a trailer merged into the head)",
)


#: exceptions of already reported bugs, masked unless --strict
KNOWN_EXCEPTIONS = (
    # ClientConnection._break removes from the queue a request whose exchange
    # already ended (the backend answered before the body had all arrived)
    "is not in deque",
)


def masked(problem: str, data: bytes) -> bool:
    """A violation of an already reported bug (see the module docstring)."""
    if STRICT:
        return False
    if any(known in problem for known in KNOWN):
        return True
    _, stop = reference_messages(data)
    return stop == "upgrade" and (
        "still expects more body" in problem
        or "went back to the pool" in problem
        or "not at a message boundary" in problem
    )


def one_input(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    flags = fdp.ConsumeIntInRange(0, 7)
    cuts = [fdp.ConsumeIntInRange(0, 2048) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    driver = Driver(respond_early=bool(flags & 1), lose_late=bool(flags & 2))
    cold = bool(flags & 4)
    driver.endpoint.hold = cold
    try:
        for piece in split_at(data, cuts):
            driver.feed(piece)
            if cold:
                driver.endpoint.release()
                driver.settle()
        driver.endpoint.release()
        driver.finish()
    except Exception as e:
        if not STRICT and any(known in repr(e) for known in KNOWN_EXCEPTIONS):
            return
        raise
    problems = check_invariants(data, driver, strict_framing=STRICT, strict_host=STRICT)
    problems = [p for p in problems if not masked(p, data)]
    if problems:
        raise AssertionError(
            "invariant violated for input "
            f"{data!r} (flags {flags}, cuts {cuts}):\n  " + "\n  ".join(problems)
        )


def _prepare(argv: list[str]) -> list[str]:
    """Seed the corpus directory (first non-option argument) and add the dictionary."""
    corpora = [a for a in argv[1:] if not a.startswith("-")]
    if corpora and not Path(corpora[0]).is_file():  # a file is an input to replay
        corpus = Path(corpora[0])
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            for i, seed in enumerate(SEEDS):
                for flags in range(8):
                    # integers are taken from the end: flags, then the number of cuts
                    (corpus / f"seed-{i}-{flags}").write_bytes(seed + bytes([0, flags]))
    if not any(a.startswith("-dict=") for a in argv):
        fd, path = tempfile.mkstemp(prefix="mtlsproxy-fuzz-", suffix=".dict")
        with os.fdopen(fd, "w") as f:
            for token in TOKENS:
                f.write('"' + "".join(f"\\x{b:02x}" for b in token) + '"\n')
        argv = [*argv, f"-dict={path}"]
    return argv


def main() -> None:
    global STRICT
    argv = list(sys.argv)
    if "--strict" in argv:
        argv.remove("--strict")
        STRICT = True
    atheris.Setup(_prepare(argv), one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
