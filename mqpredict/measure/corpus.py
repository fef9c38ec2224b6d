"""Evaluation corpus (text) and the tokens a measurement scores, in either scoring mode.

The whole text is tokenized once (BOS first when the vocabulary asks for it; one trailing newline
dropped, as ``llama-perplexity -f`` does). With ``h = ctx/2``:

``windows`` (llama-perplexity's definition): the tokens are cut into chunks of ``ctx``; each chunk is
evaluated from scratch with its first token replaced by BOS (when the vocabulary adds one), and only
its second half is scored: positions ``h … ctx-2`` predict tokens ``h+1 … ctx-1``, i.e.
``ctx - 1 - h`` tokens per chunk (255 for ctx 512; 16 chunks score 4080 tokens, 8192 forward tokens).

``stream``: the tokens are one stream through the KV cache, always started at token 0. Chunk 0 is the
first window (tokens ``0 … ctx-1``; its logits at ``h … ctx-1`` predict tokens ``h+1 … ctx``); every
later chunk ``c`` drops the oldest ``h`` tokens from the cache but the first (the attention sink: BOS,
or the corpus's first token), shifts the rest down, decodes the next ``h`` tokens at positions
``h … ctx-1`` and scores all of them. Chunk ``c`` scores tokens ``(c+1)·h+1 … (c+2)·h`` — every token
after the first half window exactly once, each seeing ``h+1 … ctx`` tokens (the sink included) — at
``h`` forward tokens per chunk after the first (16 chunks of 512: 4096 tokens scored, 4352 forward).

A measurement scores ``n_chunks`` chunks starting at ``chunk_offset``; the chunks after them stay free
for held-out re-confirmation. In stream mode a slice is a range of the one stream: chunks ``o … o+n-1``
are scored with the state the stream has when it reaches chunk ``o`` (restored from a saved state, or
replayed without scoring), so any slice equals the same positions of a longer run.
"""

from __future__ import annotations

import dataclasses
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
        object.__setattr__(self, "scoring", Scoring(self.scoring))
        if self.scoring == Scoring.stream:  # one sequence, the first window in one batch
            object.__setattr__(self, "n_batch", self.ctx)
        object.__setattr__(self, "n_batch", self.ctx if self.n_batch == 0 else max(self.n_batch, self.ctx))

    @classmethod
    def from_tokens(cls, n_tokens: int = DEFAULT_TOKENS, ctx: int = DEFAULT_CTX, chunk_offset: int = 0,
                    scoring: Scoring = Scoring.windows) -> EvalSpec:  # fmt: skip
        """The chunks needed to score about ``n_tokens`` tokens (ctx/2 per chunk, rounded up)."""
        return cls(ctx=ctx, n_chunks=max(1, math.ceil(n_tokens / (ctx // 2))), chunk_offset=chunk_offset,
                   scoring=Scoring(scoring))  # fmt: skip

    def part(self, chunk_offset: int, n_chunks: int) -> EvalSpec:
        """Another slice of the same evaluation (same ctx, batch layout and scoring mode)."""
        return dataclasses.replace(self, chunk_offset=chunk_offset, n_chunks=n_chunks)

    @property
    def stream(self) -> bool:
        return self.scoring == Scoring.stream

    @property
    def first(self) -> int:
        return self.ctx // 2

    @property
    def scored_per_chunk(self) -> int:
        return self.first if self.stream else self.ctx - 1 - self.first

    @property
    def end(self) -> int:
        """The first chunk after this slice."""
        return self.chunk_offset + self.n_chunks

    @property
    def forward_tokens(self) -> int:
        """Tokens run through the model to score this slice (stream mode: continuing from a saved state
        when the slice does not start the stream)."""
        if not self.stream:
            return self.n_chunks * self.ctx
        return self.n_chunks * self.first + (self.first if self.chunk_offset == 0 else 0)

    def stream_targets(self, chunk: int) -> slice:
        """Stream mode: the stream positions of the tokens chunk ``chunk`` predicts."""
        return slice((chunk + 1) * self.first + 1, (chunk + 2) * self.first + 1)

    def available(self, n_corpus_tokens: int) -> int:
        """How many chunks a corpus of ``n_corpus_tokens`` tokens holds in this mode."""
        if self.stream:
            return max(0, (n_corpus_tokens - 1) // self.first - 1)
        return n_corpus_tokens // self.ctx

    @property
    def n_tokens(self) -> int:
        return self.n_chunks * self.scored_per_chunk

    @property
    def n_seq(self) -> int:
        """Chunks evaluated side by side in one batch (llama-perplexity: n_batch / ctx; stream: one)."""
        return 1 if self.stream else max(1, self.n_batch // self.ctx)

    @property
    def context_key(self) -> str:
        """Names what a base log-prob cache holds: every slice of one evaluation setup shares it (chunks
        grouped several to a batch depend on their group, so those setups keep one per slice)."""
        key = f"ctx{self.ctx}-b{self.n_batch}" + ("" if self.scoring == Scoring.windows else f"-{self.scoring.value}")
        return key if self.n_seq == 1 else f"{key}-o{self.chunk_offset}-n{self.n_chunks}"

    @property
    def key(self) -> str:
        """Names cache entries: everything that changes the numbers (the batch layout included)."""
        key = f"ctx{self.ctx}-b{self.n_batch}-o{self.chunk_offset}-n{self.n_chunks}"
        return key if self.scoring == Scoring.windows else f"{key}-{self.scoring.value}"

    def check_corpus(self, n_corpus_tokens: int, corpus: Path) -> None:
        available = self.available(n_corpus_tokens)
        if n_corpus_tokens < 2 * self.ctx:
            raise InputError(
                f"{corpus} has {n_corpus_tokens} tokens, fewer than two windows of {self.ctx}",
                "give a longer corpus or a smaller --ctx",
            )
        if self.end > available:
            what = f"stream chunks of {self.first} tokens" if self.stream else f"windows of {self.ctx} tokens"
            raise InputError(
                f"{corpus} holds {available} {what}; chunks {self.chunk_offset}…{self.end - 1} were asked for",
                "lower --tokens / --chunk-offset or give a longer corpus",
            )
