"""Stream scoring in llama.cpp: one pass through the corpus with the KV cache, as its context shift does.

:class:`StreamEvaluator` holds one sequence of ``ctx`` cells. The first window (tokens ``0 … ctx-1``) is
decoded in one batch; each later chunk removes the ``h = ctx/2`` oldest cells but the first
(``llama_memory_seq_rm``), shifts the rest down by ``h`` (``llama_memory_seq_add``, which re-rotates their
keys), and decodes the next ``h`` tokens at positions ``h … ctx-1``. The first cell stays: it is the
model's attention sink (BOS, or the corpus's first token when the vocabulary adds none), as llama.cpp's
own context shift keeps ``n_keep`` tokens — without it SmolLM2's perplexity doubles (measured:
PPL 52.8 instead of 26.6 on 16 chunks of 512; see docs/measurement.md).

A stream is deterministic: each chunk is one ``llama_decode`` of the same tokens at the same positions
into the same cells, so every run reaches the same state at a chunk boundary. :func:`walk` scores a slice
``o … o+n-1`` from the state at chunk ``o`` — restored from a :class:`StateStore` file saved by an earlier
run that ended there (``llama_state_seq_get_data``), else replayed from the nearest saved state (or from
the start) without asking for logits — and saves the state at its end. A slice therefore gives exactly
the per-token values of the same positions in a longer run (the tests check it bit for bit), for the
base and for every candidate alike.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mqpredict.errors import InputError, LlamaError
from mqpredict.llama import runtime
from mqpredict.measure.corpus import EvalSpec
from mqpredict.util.atomic import atomic_open

#: names the procedure; saved states of another procedure are never restored
PROCEDURE = "s1"
_CHUNK = re.compile(r"-c(\d{5})\.kv$")


class StreamEvaluator:
    """A llama.cpp context walking the stream (see the module doc); logits are views valid until the next call."""

    def __init__(self, model, ctx: int, threads: int, keep: int = 1, flash_attn: bool | None = None) -> None:
        lib = runtime.lib()
        self.lib, self.model, self.n_ctx, self.h = lib, model, ctx, ctx // 2
        self.keep = keep  # cells never dropped (1: the attention sink; 0 only to show why it stays)
        self.ctx = runtime.new_context(model, ctx, ctx, 1, threads, flash_attn)  # flash_attn: benchmarks only
        self.mem = lib.llama_get_memory(self.ctx)
        self.decode_seconds = 0.0  # wall time inside llama_decode (the forward passes, K-shift included)
        if not lib.llama_memory_can_shift(self.mem):
            self.close()
            raise InputError(f"llama.cpp cannot shift the KV cache of {model.path}, so it cannot be scored as a stream",
                             "use --scoring windows")  # fmt: skip
        self.batch = lib.llama_batch_init(ctx, 0, 1)
        self._tokens = np.ctypeslib.as_array(self.batch.token, shape=(ctx,))
        self._pos = np.ctypeslib.as_array(self.batch.pos, shape=(ctx,))
        self._want = np.ctypeslib.as_array(self.batch.logits, shape=(ctx,))
        np.ctypeslib.as_array(self.batch.n_seq_id, shape=(ctx,))[:] = 1
        for i in range(ctx):
            self.batch.seq_id[i][0] = 0

    def close(self) -> None:
        if self.ctx:
            if getattr(self, "batch", None) is not None:
                self.lib.llama_batch_free(self.batch)
                self.batch = None
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _decode(self, tokens: np.ndarray, pos0: int, first_out: int | None) -> np.ndarray | None:
        n = len(tokens)
        self._tokens[:n] = tokens
        self._pos[:n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        self._want[:n] = False if first_out is None else np.arange(n) >= first_out
        self.batch.n_tokens = n
        self.decode_seconds += runtime.decode(self.ctx, self.batch, self.model)
        return None if first_out is None else runtime.logits_view(self.ctx, first_out, n - first_out, self.model)

    def first(self, window: np.ndarray, logits: bool) -> np.ndarray | None:
        """Chunk 0: the first window from an empty cache; logits of positions h … ctx-1 (or none)."""
        self.lib.llama_memory_clear(self.mem, True)
        return self._decode(window, 0, self.h if logits else None)

    def advance(self, tokens: np.ndarray, logits: bool) -> np.ndarray | None:
        """Any later chunk: drop the h oldest cells after the first, shift, decode ``tokens`` (h of them)."""
        h, n, k = self.h, self.n_ctx, self.keep
        if not self.lib.llama_memory_seq_rm(self.mem, 0, k, k + h):
            raise LlamaError(f"llama.cpp could not remove cells from the KV cache of {self.model.path}")
        self.lib.llama_memory_seq_add(self.mem, 0, k + h, n, -h)
        return self._decode(tokens, n - h, 0 if logits else None)

    def save(self) -> bytes:
        size = self.lib.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        got = self.lib.llama_state_seq_get_data(self.ctx, buf, size, 0)
        if got != size:
            raise LlamaError(f"llama.cpp saved {got} of {size} bytes of the KV state of {self.model.path}")
        return bytes(buf)

    def restore(self, data: bytes) -> bool:
        self.lib.llama_memory_clear(self.mem, True)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        ok = self.lib.llama_state_seq_set_data(self.ctx, buf, len(data), 0) == len(data)
        if not ok:
            self.lib.llama_memory_clear(self.mem, True)
        return ok


#: default bound of one state folder, in MB (``$MQPREDICT_STREAM_STATES_MB`` overrides it)
STATES_MB = 2048
BASE_KEY = "base"


def states_budget() -> int:
    """Bytes one state folder may hold: ``$MQPREDICT_STREAM_STATES_MB`` (MB), else :data:`STATES_MB`."""
    raw = os.environ.get("MQPREDICT_STREAM_STATES_MB", "").strip()
    try:
        mb = float(raw) if raw else STATES_MB
    except ValueError:
        mb = math.nan
    if not math.isfinite(mb):
        raise InputError(f"MQPREDICT_STREAM_STATES_MB={raw!r} is not a number of megabytes",
                         "set it to e.g. 2048, or unset it")  # fmt: skip
    return max(0, int(mb * 1_000_000))


@dataclass
class StateStore:
    """Saved stream states of one (base, corpus, ctx, engine, build): ``<key>-cNNNNN.kv`` is the KV state of
    the model named ``key`` after chunks ``0 … N-1`` (about 12 MB for SmolLM2 at ctx 512, 15 MB for
    Qwen2.5-Coder-1.5B; deleting them only costs a replay).

    The folder is bounded (``budget`` bytes, read from :func:`states_budget` when the store is made, i.e.
    before a measurement runs, so a bad setting costs no work): after each save the candidates' states
    least recently saved or restored are deleted until it fits — a campaign needs a candidate's state only
    between its stages and for its held-out slice, soon after — while the base's states (``base-…``, every
    candidate's and every slice's reference) and the state just saved stay."""

    folder: Path
    budget: int = field(default_factory=states_budget)

    def path(self, key: str, chunk: int) -> Path:
        return self.folder / f"{key}-c{chunk:05d}.kv"

    def nearest(self, key: str, chunk: int) -> tuple[int, Path] | None:
        """The saved state of ``key`` at the largest chunk boundary ≤ ``chunk``."""
        best = None
        if self.folder.is_dir():
            for p in self.folder.glob(f"{glob_escape(key)}-c*.kv"):
                m = _CHUNK.search(p.name)
                if m and p.name == self.path(key, int(m.group(1))).name and int(m.group(1)) <= chunk:
                    if best is None or int(m.group(1)) > best[0]:
                        best = (int(m.group(1)), p)
        return best

    def save(self, key: str, chunk: int, data: bytes) -> None:
        with atomic_open(self.path(key, chunk)) as f:  # a cache: no fsync
            f.write(data)
        self.prune(keep=self.path(key, chunk))

    def touch(self, path: Path) -> None:
        """Mark a state as just used (a restore), so that pruning deletes it last."""
        try:
            os.utime(path)
        except OSError:
            pass

    def prune(self, keep: Path | None = None) -> None:
        """Delete candidates' states, least recently used first, until the folder fits its budget."""
        files = []
        for p in self.folder.glob("*.kv"):
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime_ns, p.name, st.st_size, p))
        total = sum(f[2] for f in files)
        for _, name, size, p in sorted(files):
            if total <= self.budget:
                break
            if name.startswith(f"{BASE_KEY}-c") or p == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


@dataclass
class Walk:
    """Counts what a walk ran: tokens decoded, of them replayed without scoring."""

    forward_tokens: int = 0
    replayed_tokens: int = 0
    restored_from: int | None = None


def walk(ev: StreamEvaluator, tokens: np.ndarray, spec: EvalSpec, states: StateStore | None, key: str,
         counter: Walk | None = None) -> Iterator[tuple[int, np.ndarray]]:  # fmt: skip
    """Yield (chunk, logits view (h, n_vocab)) for every chunk of ``spec``'s slice, as the stream from token 0
    gives them; save the state at the slice's end (see the module doc)."""
    counter = counter or Walk()
    h, ctx, o = spec.first, spec.ctx, spec.chunk_offset
    at = 0  # the next chunk to run
    if o > 0 and states is not None:
        found = states.nearest(key, o)
        while found is not None:
            k, p = found
            try:
                data = p.read_bytes()
            except OSError:
                data = b""
            if data and ev.restore(data):
                at, counter.restored_from = k, k
                states.touch(p)
                break
            p.unlink(missing_ok=True)  # damaged or from another llama.cpp: never used again
            found = states.nearest(key, o)
    for c in range(at, spec.end):
        scored = c >= o
        if c == 0:
            view = ev.first(tokens[:ctx], scored)
            n = ctx
        else:
            s = ctx + (c - 1) * h
            view = ev.advance(tokens[s : s + h], scored)
            n = h
        counter.forward_tokens += n
        if not scored:
            counter.replayed_tokens += n
            continue
        yield c, view
    if states is not None:
        states.save(key, spec.end, ev.save())


def state_folder(cache: Path, base_sha: str, corpus_sha: str, ctx: int, engine: str, build: str) -> Path:
    return cache / "stream_states" / f"{base_sha[:16]}-{corpus_sha[:12]}-ctx{ctx}-{PROCEDURE}-{engine}-{build}"
