"""Content hashes of large files, computed once per file version and remembered."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mqpredict.util.atomic import atomic_write_text
from mqpredict.util.paths import cache_dir

_CHUNK = 8 << 20


def _index_path() -> Path:
    return cache_dir() / "hashes.json"


def file_sha256(path: str | os.PathLike, start: int = 0) -> str:
    """sha256 of a file's bytes from ``start``; remembered per (path, size, mtime, inode, start) so a
    100 GB base is hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}" + (f"|{start}" if start else "")
    index_file = _index_path()
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    if stamp in index:
        return index[stamp]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    stale = f"{path}|"
    index = {k: v for k, v in index.items() if not k.startswith(stale) or k.split("|")[1:4] == stamp.split("|")[1:4]}
    index[stamp] = digest
    try:
        atomic_write_text(index_file, json.dumps(index, indent=0, sort_keys=True))
    except OSError:
        pass  # a cache that cannot be written only costs time
    return digest


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
