"""Evaluation corpus (text) and the token windows a measurement scores.

Tokenization and windowing follow ``llama-perplexity``: the whole text is tokenized once (BOS first
when the vocabulary asks for it; one trailing newline dropped, as ``-f`` does), cut into chunks of
``ctx`` tokens, each chunk's first token replaced by BOS at evaluation, and only the second half of
each chunk is scored: positions ``ctx/2 … ctx-2`` predict tokens ``ctx/2+1 … ctx-1``, i.e.
``ctx - 1 - ctx/2`` tokens per chunk (255 for ctx 512; 16 chunks score 4080 tokens).

A measurement scores ``n_chunks`` chunks starting at ``chunk_offset``; the chunks after them stay
free for held-out re-confirmation.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from mqpredict.errors import InputError
from mqpredict.util.hashing import text_sha256

DEFAULT_CTX = 512
DEFAULT_TOKENS = 4096  # scored-token budget → 16 chunks of 512


@dataclass(frozen=True)
class Corpus:
    path: Path
    text: str
    sha256: str

    @classmethod
    def load(cls, path: str | os.PathLike) -> Corpus:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such corpus file", "give a UTF-8 text file with --corpus")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path} is not UTF-8 text (byte {e.start})", "convert it to UTF-8") from None
        if text.endswith("\n"):  # llama-perplexity -f drops one trailing newline
            text = text[:-1]
        if not text.strip():
            raise InputError(f"{path} is empty", "give a text of at least two context windows")
        return cls(path.resolve(), text, text_sha256(text))

    @property
    def id(self) -> str:
        return f"{self.path.stem}-{self.sha256[:12]}"


class Scoring(StrEnum):
    """How a measurement chooses and scores its tokens (part of every record's context)."""

    windows = "windows"  # llama-perplexity's: independent windows of ctx, the second half of each scored
    stream = "stream"  # one stream through the KV cache, every token after the first half window scored once


@dataclass(frozen=True)
class EvalSpec:
    """Which tokens a measurement scores."""

    ctx: int = DEFAULT_CTX
    n_chunks: int = 16
    chunk_offset: int = 0
    #: tokens per llama_decode; 0 (default) = one window. One window per batch makes every window's
    #: results independent of which other windows are measured with it (llama.cpp's numerics depend
    #: slightly on a batch's composition), so slices, stages and offsets give identical per-token values.
    n_batch: int = 0
    scoring: Scoring = Scoring.windows

    def __post_init__(self) -> None:
        if self.ctx < 16 or self.ctx % 2:
            raise InputError(f"--ctx {self.ctx} is not supported", "use an even context of at least 16 tokens")
        if self.n_chunks < 1 or self.chunk_offset < 0:
            raise InputError("the token budget must cover at least one chunk")
        object.__setattr__(self, "n_batch", self.ctx if self.n_batch == 0 else max(self.n_batch, self.ctx))

    @classmethod
    def from_tokens(cls, n_tokens: int = DEFAULT_TOKENS, ctx: int = DEFAULT_CTX, chunk_offset: int = 0) -> EvalSpec:
        """The chunks needed to score about ``n_tokens`` tokens (ctx/2 per chunk, rounded up)."""
        return cls(ctx=ctx, n_chunks=max(1, math.ceil(n_tokens / (ctx // 2))), chunk_offset=chunk_offset)

    @property
    def first(self) -> int:
        return self.ctx // 2

    @property
    def scored_per_chunk(self) -> int:
        return self.ctx - 1 - self.first

    @property
    def n_tokens(self) -> int:
        return self.n_chunks * self.scored_per_chunk

    @property
    def n_seq(self) -> int:
        """Chunks evaluated side by side in one batch (llama-perplexity: n_batch / ctx)."""
        return max(1, self.n_batch // self.ctx)

    @property
    def key(self) -> str:
        """Names cache entries: everything that changes the numbers (the batch layout included)."""
        key = f"ctx{self.ctx}-b{self.n_batch}-o{self.chunk_offset}-n{self.n_chunks}"
        return key if self.scoring == Scoring.windows else f"{key}-{self.scoring.value}"

    def check_corpus(self, n_corpus_tokens: int, corpus: Path) -> None:
        available = n_corpus_tokens // self.ctx
        if n_corpus_tokens < 2 * self.ctx:
            raise InputError(
                f"{corpus} has {n_corpus_tokens} tokens, fewer than two windows of {self.ctx}",
                "give a longer corpus or a smaller --ctx",
            )
        if self.chunk_offset + self.n_chunks > available:
            raise InputError(
                f"{corpus} holds {available} windows of {self.ctx} tokens; chunks {self.chunk_offset}"
                f"…{self.chunk_offset + self.n_chunks - 1} were asked for",
                "lower --tokens / --chunk-offset or give a longer corpus",
            )
