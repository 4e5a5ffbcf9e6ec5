"""
What C{--reload-interval} watches: the files the TLS material comes from, and a
cheap signature of them that changes whenever one is rewritten or replaced.

certbot, cert-manager and C{mtlsproxy pki} replace files by renaming a new one
over the old, which changes the inode; editors and C{cp} rewrite in place,
which changes size or modification time.  The signature covers all three.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import Config

Signature = tuple[tuple[str, tuple[int, int, int, int] | None], ...]


def material_files(config: Config) -> tuple[Path, ...]:
    """Every file a reload reads, password files included."""
    candidates = [
        config.cert,
        config.key,
        config.keystore,
        config.ca,
        config.truststore,
        *config.crl,
        config.keystore_password_file,
        config.truststore_password_file,
    ]
    return tuple(p for p in candidates if p is not None)


def signature(paths: tuple[Path, ...]) -> Signature:
    """(device, inode, size, mtime in ns) per file; None for one that is missing right now."""
    result: list[tuple[str, tuple[int, int, int, int] | None]] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            result.append((str(path), None))
            continue
        result.append((str(path), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)))
    return tuple(result)
