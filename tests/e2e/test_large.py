"""
Large bodies are streamed, never held whole: 256 MiB each way with one side
slower than the other, verified by length and SHA-256, while the proxy's peak
resident memory stays small.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import threading

import pytest

from .harness import MiB, Proxy, Rss, iter_pattern, pattern_sha256, write_pattern_file

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SIZE = 256 * MiB
RATE = 64 * MiB  # bytes per second for the slow side
PEAK_LIMIT_KIB = 120 * 1024
GROWTH_LIMIT_KIB = 60 * 1024


@functools.cache
def expected_sha256() -> str:
    return pattern_sha256(SIZE)


def baseline(proxy: Proxy) -> Rss:
    """Memory after start-up and one small request through the whole chain."""
    assert proxy.curl("/echo/warm-up", "--data-binary", "x" * 100_000).echo().body_length
    return proxy.rss_kib()


def check_memory(proxy: Proxy, before: Rss, what: str) -> None:
    after = proxy.rss_kib()
    growth = after.peak - before.peak
    print(
        f"\n{what}: proxy VmHWM {before.peak} KiB before, {after.peak} KiB after "
        f"(+{growth} KiB); VmRSS now {after.current} KiB; {len(proxy.pids())} process(es)"
    )
    assert after.peak < PEAK_LIMIT_KIB, f"peak RSS {after.peak} KiB during {what}"
    assert growth < GROWTH_LIMIT_KIB, f"peak RSS grew by {growth} KiB during {what}"


def test_large_upload_to_slow_backend_is_streamed(proxy, tmp_path):
    """
    256 MiB PUT with Content-Length (curl -T file) to an app reading at
    64 MiB/s: the app receives every byte (length and SHA-256), and the proxy
    applies backpressure instead of buffering (peak RSS growth < 60 MiB).
    """
    path = write_pattern_file(tmp_path / "upload.bin", SIZE)
    before = baseline(proxy)
    result = proxy.curl(f"/upload?rate={RATE}", "-T", str(path), timeout=120)
    path.unlink()
    assert result.status == 200, result.describe()
    assert result.json() == {"body_length": SIZE, "body_sha256": expected_sha256()}
    check_memory(proxy, before, "256 MiB upload (Content-Length)")


def test_large_chunked_upload_to_slow_backend_is_streamed(proxy, tmp_path):
    """
    256 MiB chunked PUT (curl -T - fed from a pipe) to an app reading at
    64 MiB/s: received intact, memory bounded.
    """
    before = baseline(proxy)
    command = proxy.curl_command(f"/upload?rate={RATE}", "-T", "-", timeout=120)
    with open(tmp_path / "curl-stderr", "w+b") as err:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdin is not None and proc.stdout is not None
        stdin = proc.stdin

        def feed() -> None:
            try:
                for chunk in iter_pattern(SIZE):
                    stdin.write(chunk)
            except BrokenPipeError:
                pass
            finally:
                stdin.close()

        feeder = threading.Thread(target=feed)
        feeder.start()
        out = proc.stdout.read()
        status = proc.wait(timeout=150)
        feeder.join(10)
        err.seek(0)
        assert status == 0, f"curl exit {status}: {err.read()!r} {out[:500]!r}"
    assert json.loads(out) == {"body_length": SIZE, "body_sha256": expected_sha256()}
    check_memory(proxy, before, "256 MiB upload (chunked)")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_large_download_to_slow_client_is_streamed(proxy, chunked):
    """
    256 MiB from a fast app to a client reading at 64 MiB/s (curl
    --limit-rate): every byte arrives (length and SHA-256), and the proxy
    stops reading the app instead of buffering (peak RSS growth < 60 MiB).
    """
    before = baseline(proxy)
    command = proxy.curl_command(
        f"/download?bytes={SIZE}&chunked={int(chunked)}",
        "--limit-rate", str(RATE), "-o", "-", "-w", "%{http_code}\n", "--fail",
        timeout=120,
    )
    # -w writes the status after the body; split it off the end below
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    digest = hashlib.sha256()
    received = 0
    tail = b""
    while True:
        block = proc.stdout.read(MiB)
        if not block:
            break
        data = tail + block
        tail = data[-4:]
        body = data[:-4]
        digest.update(body)
        received += len(body)
    err = proc.stderr.read()
    status = proc.wait(timeout=150)
    assert status == 0, f"curl exit {status}: {err!r}"
    assert tail == b"200\n", tail
    assert received == SIZE
    assert digest.hexdigest() == expected_sha256()
    check_memory(proxy, before, f"256 MiB download ({'chunked' if chunked else 'Content-Length'})")
