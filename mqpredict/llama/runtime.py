"""The in-process llama.cpp library (llama-cpp-python's ctypes bindings): loading, logging, version.

llama.cpp logs through a callback; mqpredict keeps the lines (the tail explains a failed load) and
echoes them to stderr only when verbose, so ``--json`` output on stdout stays clean.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from mqpredict.errors import LlamaError

#: llama.cpp commit vendored by each llama-cpp-python release mqpredict pins
VENDORED_COMMIT = {"0.3.36": "0c1e570"}


def default_threads() -> int:
    """llama.cpp threads when none are asked for: ``$MQPREDICT_THREADS``, else every core. On a machine
    shared with other busy processes one thread is much faster per evaluation (idle threads spin)."""
    env = os.environ.get("MQPREDICT_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return os.cpu_count() or 1


class LlamaLog:
    """Collects llama.cpp's log lines; ``capture()`` hands the lines of one block to the caller."""

    def __init__(self) -> None:
        self.tail: deque[str] = deque(maxlen=400)
        self.verbose = False
        self._partial = ""
        self._captures: list[list[str]] = []
        self._lock = threading.Lock()

    def write(self, level: int, text: str) -> None:
        with self._lock:
            if self.verbose:
                sys.stderr.write(text)
            buf = self._partial + text
            *lines, self._partial = buf.split("\n")
            for line in lines:
                self.tail.append(line)
                for c in self._captures:
                    c.append(line)

    @contextmanager
    def capture(self) -> Iterator[list[str]]:
        lines: list[str] = []
        with self._lock:
            self._captures.append(lines)
        try:
            yield lines
        finally:
            with self._lock:
                self._captures.remove(lines)
                if self._partial:
                    lines.append(self._partial)

    def last_error(self, n: int = 6) -> str:
        """The most telling recent lines (errors first) for an error message."""
        lines = [x.strip() for x in self.tail if x.strip()]
        errs = [x for x in lines if any(w in x.lower() for w in ("error", "failed", "invalid", "unable"))]
        return " | ".join((errs or lines)[-n:])


LOG = LlamaLog()
_keep_alive: list = []


@lru_cache(maxsize=1)
def lib():
    """Import llama_cpp once, route its logging through :data:`LOG`, init the backend."""
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - the set-up installs it
        raise LlamaError(
            f"llama-cpp-python is not importable ({e})", "run the README set-up (bash scripts/setup.sh)"
        ) from None

    @llama_cpp.llama_log_callback
    def _cb(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        LOG.write(level, text.decode("utf-8", errors="replace"))

    _keep_alive.append(_cb)
    llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    return llama_cpp


def new_context(model, n_ctx: int, n_batch: int, n_seq: int, threads: int, flash_attn: bool | None = None):
    """A llama.cpp context on a loaded model, set up as llama-perplexity's (no SWA-full cache, no perf
    counters; flash attention as llama.cpp decides, unless ``flash_attn`` says — only benchmarks do, since
    it moves every logit slightly); a one-line error naming the model when llama.cpp cannot make it."""
    from mqpredict.errors import LlamaError

    cp = lib().llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_seq_max = n_ctx, n_batch, n_seq
    cp.n_threads = cp.n_threads_batch = threads
    cp.swa_full = False
    cp.no_perf = True
    if flash_attn is not None:
        cp.flash_attn_type = 1 if flash_attn else 0  # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED
    ctx = lib().llama_init_from_model(model.ptr, cp)
    if not ctx:
        raise LlamaError(f"llama.cpp could not create a context for {model.path}: {LOG.last_error()}")
    return ctx


def decode(ctx, batch, model) -> float:
    """``llama_decode`` of ``batch`` on ``ctx``; returns its wall seconds (the forward pass, a pending K-shift
    included), a one-line error naming the model when llama.cpp refuses the batch."""
    t0 = time.perf_counter()
    rc = lib().llama_decode(ctx, batch)
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise LlamaError(f"llama.cpp failed to decode a batch of {model.path} (code {rc})")
    return seconds


def logits_view(ctx, row: int, n_rows: int, model):
    """The logits of output ``row`` and the ``n_rows - 1`` after it, as a (n_rows, n_vocab) float32 numpy view on
    llama.cpp's buffer (valid until the next decode)."""
    import numpy as np

    ptr = lib().llama_get_logits_ith(ctx, row)
    if not ptr:
        raise LlamaError(f"llama.cpp returned no logits for {model.path}")
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_rows, model.n_vocab))


def set_verbose(verbose: bool) -> None:
    LOG.verbose = verbose


@lru_cache(maxsize=1)
def version() -> str:
    """e.g. ``llama-cpp-python 0.3.36 (llama.cpp 0c1e570)``."""
    v = lib().__version__
    return f"llama-cpp-python {v} (llama.cpp {VENDORED_COMMIT.get(v, 'unknown')})"


@lru_cache(maxsize=1)
def commit() -> str:
    return VENDORED_COMMIT.get(lib().__version__, "unknown")


@lru_cache(maxsize=1)
def build_fingerprint() -> str:
    """Short hash of the library version and its CPU feature set (builds use -march=native)."""
    info = lib().llama_print_system_info().decode(errors="replace")
    return hashlib.sha256(f"{version()}|{info}".encode()).hexdigest()[:12]
