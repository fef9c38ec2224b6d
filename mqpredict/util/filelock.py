"""An exclusive lock between processes on one machine, held for a block (``fcntl.flock`` on a lock file).

For cache entries several processes may want at once — a campaign and a ``seed`` on one base, or Ray
workers of a local cluster — so that one of them makes the entry and the others wait for it and read it,
instead of each making its own copy (a pure quantization of a 70B is hours of work). The lock is released
when the block ends or the process dies; the lock file itself stays (it is empty). Where ``fcntl`` does
not exist (Windows) the block runs unlocked: the entry is still written atomically, only perhaps twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux or macOS
    fcntl = None


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock of ``path`` (created if missing) for the block; wait for it if another has it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
