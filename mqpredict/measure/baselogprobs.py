"""The base model's log-probabilities: compact rows, and one cache folder per (base, corpus, scoring mode).

**Rows.** llama-perplexity stores every vocabulary entry of a scored position as a 16-bit code
(:mod:`mqpredict.measure.logprobs`), but its KLD sums only the entries with base log p > -16 (about a
fifth of SmolLM2's vocabulary), and the other statistics read just two more numbers per position.
:class:`SparseRows` keeps exactly what the statistics use, bit for bit: a bit mask of the summed entries
and their 16-bit codes, and per position the code scale and offset, the base NLL of the next token and
the index of the base's most likely token. Every statistic is the same as from the full file (the tests
score both); the files are about a quarter of llama-perplexity's size on SmolLM2
(``benchmarks/base_logprob_size.py`` measures it).

**Cache folder** (:class:`BaseLogProbs`): one per base, corpus, scoring mode, ctx and batch layout,
engine and build — never per token slice. It holds ``meta.json`` (what it is), ``tokens.npy`` (the
corpus as the base's vocabulary tokenizes it, read by every evaluation so base and candidate see the
same tokens) and one ``cNNNNN.npz`` per chunk, each computed once, written atomically, and read by any
slice that covers it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mqpredict.errors import InputError
from mqpredict.measure.logprobs import compress
from mqpredict.util.atomic import atomic_open, atomic_write_text

CUT = np.float32(-16)  # llama-perplexity's: base log-probs at or below it are not summed
FORMAT = "mqpredict-base-logprobs-1"


@dataclass(frozen=True)
class SparseRows:
    """Scored positions of the base: what the KLD statistics read, nothing else."""

    n_vocab: int
    scale: np.ndarray  # (n,) float32: log p = scale·code + min_lp
    min_lp: np.ndarray  # (n,) float32
    nll_base: np.ndarray  # (n,) float32: -log p_base(next token), as llama-perplexity computes it
    top: np.ndarray  # (n,) int32: the base's most likely token (the first maximum)
    nnz: np.ndarray  # (n,) int32: entries kept per position
    mask: np.ndarray  # (n, ceil(n_vocab/8)) uint8: packed bits, 1 = entry kept (log p > -16)
    codes: np.ndarray  # (nnz.sum(),) uint16: the kept entries' codes, row after row

    def __len__(self) -> int:
        return len(self.scale)

    @classmethod
    def from_dense(cls, rows: np.ndarray, n_vocab: int, next_tokens: np.ndarray) -> SparseRows:
        """From llama-perplexity's 16-bit rows (n, nv) and the tokens each position predicts."""
        rows = np.asarray(rows)
        head = np.ascontiguousarray(rows[:, :4]).view(np.float32)
        scale, min_lp = head[:, 0].copy(), head[:, 1].copy()
        q = rows[:, 4 : 4 + n_vocab]
        lp = scale[:, None] * q.astype(np.float32) + min_lp[:, None]
        keep = lp > CUT
        r = np.arange(len(rows))
        nll_base = -(scale * q[r, next_tokens].astype(np.float32) + min_lp)
        return cls(
            n_vocab=n_vocab,
            scale=scale,
            min_lp=min_lp,
            nll_base=nll_base.astype(np.float32),
            top=q.argmax(axis=1).astype(np.int32),  # log p grows with the code: the same first maximum
            nnz=keep.sum(axis=1).astype(np.int32),
            mask=np.packbits(keep, axis=1),
            codes=q[keep],
        )

    @classmethod
    def from_logits(cls, logits: np.ndarray, next_tokens: np.ndarray) -> SparseRows:
        """From the base's float logits (n, n_vocab), compressed as llama-perplexity compresses them."""
        rows, _ = compress(logits)
        return cls.from_dense(rows, logits.shape[1], next_tokens)

    def part(self, a: int, b: int) -> SparseRows:
        """Positions ``a … b-1``."""
        off = np.concatenate([[0], np.cumsum(self.nnz, dtype=np.int64)])
        return SparseRows(self.n_vocab, self.scale[a:b], self.min_lp[a:b], self.nll_base[a:b], self.top[a:b],
                          self.nnz[a:b], self.mask[a:b], self.codes[off[a] : off[b]])  # fmt: skip

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(position, flat index ``position·n_vocab + i``, vocabulary index ``i``, log p float32) of every kept
        entry, position after position."""
        flat = np.flatnonzero(np.unpackbits(self.mask, axis=1, count=self.n_vocab).view(bool))
        r = np.repeat(np.arange(len(self.nnz)), self.nnz)
        c = flat - r * self.n_vocab
        lp = self.scale[r] * self.codes.astype(np.float32) + self.min_lp[r]
        return r, flat, c, lp

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        with atomic_open(path) as f:
            np.savez(f, n_vocab=np.int64(self.n_vocab), scale=self.scale, min_lp=self.min_lp, nll_base=self.nll_base,
                     top=self.top, nnz=self.nnz, mask=self.mask, codes=self.codes)  # fmt: skip

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseRows:
        try:
            with np.load(path, allow_pickle=False) as z:
                out = cls(int(z["n_vocab"]), *(z[k] for k in ("scale", "min_lp", "nll_base", "top", "nnz", "mask", "codes")))
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise InputError(f"{path} is not a base log-prob chunk ({e})", "delete it to recompute") from None
        n = len(out.scale)
        if out.mask.shape != (n, (out.n_vocab + 7) // 8) or int(out.nnz.sum()) != len(out.codes):
            raise InputError(f"{path} is truncated or corrupt", "delete it to recompute")
        return out


@dataclass(frozen=True)
class CacheMeta:
    """What a :class:`BaseLogProbs` folder holds (checked on every open)."""

    base: str  # base file sha256
    corpus: str  # corpus sha256
    n_vocab: int
    ctx: int
    n_batch: int
    scoring: str

    def to_json(self) -> dict:
        return {"format": FORMAT, **self.__dict__}


class BaseLogProbs:
    """A cache folder of base log-probs for one (base, corpus, scoring, ctx …), filled chunk by chunk."""

    def __init__(self, folder: Path, meta: CacheMeta, tokens: np.ndarray) -> None:
        self.folder, self.meta, self.tokens = folder, meta, tokens

    @classmethod
    def open(cls, folder: str | os.PathLike, meta: CacheMeta, tokenize) -> BaseLogProbs:
        """The folder for ``meta`` (created, with ``tokenize()``'s tokens, when missing or not matching)."""
        folder = Path(folder)
        mp, tp = folder / "meta.json", folder / "tokens.npy"
        try:
            if json.loads(mp.read_text()) == meta.to_json():
                return cls(folder, meta, np.load(tp, allow_pickle=False))
        except (OSError, ValueError):
            pass
        if folder.exists():  # another format or a damaged folder: start again
            for p in folder.glob("*"):
                p.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        tokens = np.asarray(tokenize(), dtype=np.int32)
        with atomic_open(tp) as f:
            np.save(f, tokens)
        atomic_write_text(mp, json.dumps(meta.to_json(), indent=1) + "\n")
        return cls(folder, meta, tokens)

    def chunk_path(self, c: int) -> Path:
        return self.folder / f"c{c:05d}.npz"

    def has(self, c: int) -> bool:
        return self.chunk_path(c).exists()

    def missing(self, chunks: range) -> list[int]:
        return [c for c in chunks if not self.has(c)]

    def put(self, c: int, rows: SparseRows) -> None:
        rows.save(self.chunk_path(c))

    def get(self, c: int) -> SparseRows:
        p = self.chunk_path(c)
        try:
            return SparseRows.load(p)
        except InputError:
            p.unlink(missing_ok=True)
            raise

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("c*.npz"))
