"""
What C{--reload-interval} watches: the files the TLS material comes from, and a
cheap signature of them that changes whenever one is rewritten, replaced, or
has its permissions or owner changed.

certbot, cert-manager and C{mtlsproxy pki} replace files by renaming a new one
over the old, which changes the inode; editors and C{cp} rewrite in place,
which changes size or modification time.  An operator who fixes a key the
daemon could not read (C{chgrp mtlsproxy}, C{chmod 0640}) changes neither:
only the mode, owner, group and the inode change time (ctime, which every
metadata change moves) show it, so the signature covers those too.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import Config

#: Per file: (device, inode, size, mtime ns, mode, uid, gid, ctime ns)
Stat = tuple[int, int, int, int, int, int, int, int]
Signature = tuple[tuple[str, Stat | None], ...]


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


def file_stat(path: Path) -> Stat | None:
    """What of C{path}'s metadata the signature holds; None when it is missing right now."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_ctime_ns,
    )


def signature(paths: tuple[Path, ...]) -> Signature:
    """L{file_stat} of each file, with its name."""
    return tuple((str(path), file_stat(path)) for path in paths)
