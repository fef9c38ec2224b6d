"""Base log-probabilities in llama-perplexity's ``--kl-divergence-base`` file format.

Both engines store the base model's log-probabilities in the very format ``llama-perplexity``
writes and reads, so a file made by either is usable by both (and by ``llama-perplexity`` itself)::

    "_logits_" | i32 n_ctx | i32 n_vocab | i32 n_chunk | i32 tokens[n_chunk × n_ctx]
    then per chunk, per scored position (n_ctx - 1 - n_ctx/2 of them), nv = 2·⌈n_vocab/2⌉ + 4 uint16:
        f32 scale | f32 min_log_prob | 2 × u16 padding | u16 q[n_vocab]   (log p = scale·q + min_log_prob)

Compression (llama-perplexity's ``log_softmax``): logits below ``max - 16`` are stored as 0, the rest
on a uniform 16-bit grid, so log-probabilities below about -16 are not represented; the KLD sum skips
them (see :mod:`mqpredict.measure.kld`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mqpredict.errors import InputError
from mqpredict.util.atomic import atomic_open

MAGIC = b"_logits_"
HEADER = 8 + 3 * 4


def row_width(n_vocab: int) -> int:
    return 2 * ((n_vocab + 1) // 2) + 4


def _nearest_int(x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int64)


def compress(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of logits (n, n_vocab) → (uint16 rows (n, nv) in the file layout, log-sum-exp per row)."""
    logits = np.asarray(logits, dtype=np.float32)
    n, n_vocab = logits.shape
    max_logit = logits.max(axis=1)
    min_logit = np.maximum(logits.min(axis=1), max_logit - np.float32(16))
    sum_exp = np.exp(logits - max_logit[:, None]).sum(axis=1, dtype=np.float64)
    log_sum_exp = np.log(sum_exp).astype(np.float32)
    min_log_prob = (min_logit - max_logit - log_sum_exp).astype(np.float32)
    scale = ((max_logit - min_logit) / np.float32(65535)).astype(np.float32)
    out = np.zeros((n, row_width(n_vocab)), dtype=np.uint16)
    head = np.zeros((n, 2), dtype=np.float32)
    head[:, 0], head[:, 1] = scale, min_log_prob
    out[:, :4] = head.view(np.uint16)
    ok = scale > 0
    inv = np.where(ok, np.float32(1) / np.where(ok, scale, 1), 0).astype(np.float32)
    q = _nearest_int(inv[:, None] * (logits - min_logit[:, None]))
    q = np.where(logits > min_logit[:, None], q, 0)
    out[:, 4 : 4 + n_vocab] = np.clip(q, 0, 65535).astype(np.uint16)
    return out, log_sum_exp + max_logit


@dataclass
class LogProbFile:
    """A memory-mapped base log-prob file."""

    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray  # (n_chunk, n_ctx) int32
    rows: np.ndarray  # (n_chunk, scored_per_chunk, nv) uint16

    @classmethod
    def open(cls, path: str | os.PathLike) -> LogProbFile:
        path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER)
        if len(head) < HEADER or head[:8] != MAGIC:
            raise InputError(f"{path} is not a base log-prob file (llama-perplexity --kl-divergence-base format)")
        n_ctx, n_vocab, n_chunk = np.frombuffer(head[8:], dtype=np.int32)
        n_ctx, n_vocab, n_chunk = int(n_ctx), int(n_vocab), int(n_chunk)
        per = n_ctx - 1 - n_ctx // 2
        nv = row_width(n_vocab)
        need = HEADER + n_chunk * n_ctx * 4 + n_chunk * per * nv * 2
        if size != need:
            raise InputError(f"{path} is truncated or corrupt ({size} bytes, expected {need})", "delete it to recompute")
        tokens = np.memmap(path, dtype=np.int32, mode="r", offset=HEADER, shape=(n_chunk, n_ctx))
        rows = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER + n_chunk * n_ctx * 4, shape=(n_chunk, per, nv))
        return cls(path, n_ctx, n_vocab, n_chunk, tokens, rows)

    def slice(self, out: str | os.PathLike, offset: int, count: int) -> Path:
        """Write chunks ``offset … offset+count-1`` as a file of their own (what a held-out run reads)."""
        if offset + count > self.n_chunk:
            raise InputError(f"{self.path} has {self.n_chunk} chunks; {offset}+{count} asked for")
        with atomic_open(out) as f:
            f.write(MAGIC + np.array([self.n_ctx, self.n_vocab, count], dtype=np.int32).tobytes())
            f.write(np.ascontiguousarray(self.tokens[offset : offset + count]).tobytes())
            for i in range(offset, offset + count):
                f.write(np.ascontiguousarray(self.rows[i]).tobytes())
        return Path(out)


class LogProbWriter:
    """Stream a log-prob file chunk by chunk (atomic: nothing is left if interrupted)."""

    def __init__(self, path: str | os.PathLike, n_ctx: int, n_vocab: int, tokens: np.ndarray) -> None:
        self.path = Path(path)
        self.n_vocab = n_vocab
        self._ctx = atomic_open(self.path)
        self._f = self._ctx.__enter__()
        n_chunk = tokens.shape[0]
        self._f.write(MAGIC + np.array([n_ctx, n_vocab, n_chunk], dtype=np.int32).tobytes())
        self._f.write(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())

    def write(self, rows: np.ndarray) -> None:
        self._f.write(np.ascontiguousarray(rows, dtype=np.uint16).tobytes())

    def close(self, ok: bool = True) -> None:
        """Publish the file (``ok``) or remove every trace of it."""
        if ok:
            self._ctx.__exit__(None, None, None)
        else:
            exc = RuntimeError("aborted")
            self._ctx.__exit__(type(exc), exc, None)
