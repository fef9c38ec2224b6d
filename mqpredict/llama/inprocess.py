"""InProcessEngine: llama.cpp in this process (llama-cpp-python's low-level API), stitched builds.

Evaluation mirrors ``llama-perplexity --kl-divergence`` call for call: the same context layout
(``n_seq = n_batch / ctx`` chunks side by side, KV cleared per group), BOS in each chunk's first slot,
logits requested only for the scored half, and the same per-token formulas (:mod:`mqpredict.measure.kld`).
It differs where that is cheaper: the logits are read in place (a numpy view on llama.cpp's buffer,
no copies) and scored with vectorised numpy instead of per-token loops.

Builds are stitched (:mod:`mqpredict.llama.stitch`) from a per-(base, type) cache of pure
quantizations, so any hybrid costs a file copy once the types it uses have been quantized once.
"""

from __future__ import annotations

import ctypes
import re
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mqpredict.errors import InputError, LlamaError
from mqpredict.llama import runtime
from mqpredict.llama.engine import Engine, EvalResult
from mqpredict.llama.quantize import dry_run_types, pure_quantize
from mqpredict.llama.stitch import index_sources, stitch
from mqpredict.measure.corpus import EvalSpec
from mqpredict.llama.stream import BASE_KEY, StateStore, StreamEvaluator, Walk, state_folder, walk
from mqpredict.measure.baselogprobs import BaseLogProbs, CacheMeta, SparseRows
from mqpredict.measure.kld import TokenScores, score_parallel
from mqpredict.measure.stats import KLDStats
from mqpredict.quant.config import Config
from mqpredict.quant.header import GGUFHeader, read_header
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.presets import FTYPE
from mqpredict.quant.resolve import EffectiveTypes, export_preset
from mqpredict.quant.types import QuantType
from mqpredict.util import faults
from mqpredict.util.filelock import locked


class LoadedModel:
    """A model loaded by llama.cpp (mmap), freed on close."""

    def __init__(self, path: Path, vocab_only: bool = False) -> None:
        lib = runtime.lib()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        params.vocab_only = vocab_only
        self.path = path
        self.ptr = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise LlamaError(
                f"llama.cpp could not load {path}: {runtime.LOG.last_error() or 'no reason given'}",
                "check that the file is complete and its architecture is supported by this llama.cpp build",
            )
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self.vocab))
        self.bos = lib.llama_vocab_bos(self.vocab)

    def close(self) -> None:
        if self.ptr:
            runtime.lib().llama_model_free(self.ptr)
            self.ptr = None

    def tokenize(self, text: str) -> np.ndarray:
        """Tokens as llama-perplexity gets them (special tokens added, not parsed)."""
        lib = runtime.lib()
        data = text.encode("utf-8")
        n_max = len(data) + 2
        buf = (lib.llama_token * n_max)()
        n = lib.llama_tokenize(self.vocab, data, len(data), buf, n_max, True, False)
        if n < 0:
            buf = (lib.llama_token * -n)()
            n = lib.llama_tokenize(self.vocab, data, len(data), buf, -n, True, False)
        if n < 0:
            raise LlamaError(f"llama.cpp could not tokenize the corpus ({n})")
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32)

    def detokenize(self, tokens: np.ndarray) -> str:
        """The text of ``tokens`` (special tokens left out), as llama.cpp renders it."""
        lib = runtime.lib()
        toks = (lib.llama_token * len(tokens))(*[int(t) for t in tokens])
        n_max = 16 * len(tokens) + 16
        buf = ctypes.create_string_buffer(n_max)
        n = lib.llama_detokenize(self.vocab, toks, len(tokens), buf, n_max, False, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lib.llama_detokenize(self.vocab, toks, len(tokens), buf, -n, False, False)
        if n < 0:
            raise LlamaError(f"llama.cpp could not detokenize {len(tokens)} tokens ({n})")
        return buf.raw[:n].decode("utf-8", errors="surrogateescape")


class Evaluator:
    """A llama.cpp context set up like llama-perplexity's, yielding logits of the scored positions."""

    def __init__(self, model: LoadedModel, spec: EvalSpec, threads: int) -> None:
        lib = runtime.lib()
        self.lib, self.model, self.spec = lib, model, spec
        n_ctx = spec.n_seq * spec.ctx
        self.ctx = runtime.new_context(model, n_ctx, min(spec.n_batch, n_ctx), spec.n_seq, threads)
        self.decode_seconds = 0.0  # wall time inside llama_decode (the forward passes)
        n = spec.n_seq * spec.ctx
        self.batch = lib.llama_batch_init(n, 0, 1)
        self.tokens = np.ctypeslib.as_array(self.batch.token, shape=(n,))
        pos = np.ctypeslib.as_array(self.batch.pos, shape=(n,))
        nseq = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(n,))
        want = np.ctypeslib.as_array(self.batch.logits, shape=(n,))
        k = np.tile(np.arange(spec.ctx, dtype=np.int32), spec.n_seq)
        pos[:] = k
        nseq[:] = 1
        want[:] = k >= spec.first  # logits only for the scored half (as llama-perplexity asks)
        for i in range(n):
            self.batch.seq_id[i][0] = i // spec.ctx

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def run(self, windows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """For each window (chunk) yield (index, logits view (scored_per_chunk, n_vocab) float32).

        The view points into llama.cpp's buffer and is valid until the next iteration.
        """
        spec, lib = self.spec, self.lib
        for g in range(0, len(windows), spec.n_seq):
            group = windows[g : g + spec.n_seq]
            k = len(group)
            flat = np.array(group, dtype=np.int32, copy=True)
            if self.model.add_bos:
                flat[:, 0] = self.model.bos
            self.tokens[: k * spec.ctx] = flat.reshape(-1)
            self.batch.n_tokens = k * spec.ctx
            lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
            self.decode_seconds += runtime.decode(self.ctx, self.batch, self.model)
            for s in range(k):
                yield g + s, runtime.logits_view(self.ctx, s * spec.ctx + spec.first, spec.scored_per_chunk, self.model)


@contextmanager
def evaluator(path: Path, spec: EvalSpec, threads: int, model: LoadedModel | None = None) -> Iterator[Evaluator]:
    """A context on ``model`` (or on a model loaded from ``path`` for the duration)."""
    own = model is None
    model = model or LoadedModel(path)
    try:
        ev = Evaluator(model, spec, threads)
        try:
            yield ev
        finally:
            ev.close()
    finally:
        if own:
            model.close()


class InProcessEngine(Engine):
    """The default engine: llama-cpp-python in process, hybrids stitched from pure quantizations."""

    name = "inprocess"

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self._pure: dict[QuantType, GGUFHeader] = {}
        self._warm: tuple[tuple, LoadedModel] | None = None  # the last evaluated model stays loaded

    def close(self) -> None:
        if self._warm is not None:
            self._warm[1].close()
            self._warm = None
        super().close()

    def release(self, path: Path) -> None:
        if self._warm is not None and self._warm[0][0] == str(path.resolve()):
            self._warm[1].close()
            self._warm = None

    def loaded(self, path: Path) -> LoadedModel:
        """The model at ``path``, kept loaded while the same file is evaluated again (e.g. a confirmation
        in stages, or on held-out windows); a different file replaces it."""
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        if self._warm is not None and self._warm[0] == key:
            return self._warm[1]
        if self._warm is not None:
            self._warm[1].close()
            self._warm = None
        model = LoadedModel(path)
        self._warm = (key, model)
        return model

    def version(self) -> str:
        return runtime.version()

    def build_id(self) -> str:
        return runtime.build_fingerprint()

    def dry_run(self, model: ModelInfo, config: Config) -> EffectiveTypes:
        return dry_run_types(model, config, self.threads, self.imatrix)

    # ------------------------------------------------------------- build
    def pure_path(self, qtype: QuantType) -> Path:
        return self.cache / "pure" / f"{self.base_sha[:16]}-{self.quant_context}" / f"{qtype.name}.gguf"

    def _spared(self, qtype: QuantType) -> list[tuple[str, QuantType]]:
        """Tensors a pure ``qtype`` file keeps at Q8_0: those llama.cpp would refuse (or abort on) at
        ``qtype`` for lack of imatrix weights. No config can ask for them at ``qtype`` (resolve refuses)."""
        from mqpredict.quant.resolve import check_types

        out = []
        for t in self.model.assignable:
            try:
                check_types(self.model, {t.name: qtype}, Config(default=qtype), self.imatrix)
            except InputError:
                out.append((f"^{re.escape(t.name)}$", QuantType.Q8_0))
        return out

    def pure_header(self, qtype: QuantType) -> GGUFHeader:
        """The pure ``qtype`` quantization of the base (made once, cached on disk; header kept in memory)."""
        if qtype in self._pure:
            return self._pure[qtype]
        path = self.pure_path(qtype)
        # one process makes it, the others wait and read it (a campaign and a seed, Ray workers on one machine)
        with locked(path.parent / f".{path.name}.lock"):
            hdr = None
            if path.exists():
                try:
                    hdr = read_header(path)
                except InputError:
                    path.unlink(missing_ok=True)  # damaged cache entry: rebuild it
            if hdr is None:
                self.progress(f"quantize {qtype.name}", 0, 1)
                pure_quantize(self.model.path, path, qtype, self.threads, self.allow_quantized_base, self.imatrix,
                              self._spared(qtype))  # fmt: skip
                self.progress(f"quantize {qtype.name}", 1, 1)
                hdr = read_header(path)
        self._pure[qtype] = hdr
        return hdr

    def _build(self, config: Config, types: EffectiveTypes, out: Path) -> None:
        own = {t.name: t.qtype for t in self.model.tensors}
        needed = sorted({qt for name, qt in types.items() if qt != own[name]}, key=lambda t: t.name)
        headers = [self.pure_header(qt) for qt in needed]
        # llama.cpp's tensor order, from any file it wrote from this base
        order = [t.name for t in (headers[0] if headers else self.pure_header(QuantType.Q8_0)).tensors]
        stitch(self.model, types, index_sources(headers), order, int(FTYPE[export_preset(config)]), out, self.imatrix)

    # ---------------------------------------------------------- evaluate
    def _base_cache(self, spec: EvalSpec) -> BaseLogProbs:
        """The cache folder of ``spec``'s evaluation setup (its corpus tokens made on first use)."""
        meta = CacheMeta(self.base_sha, self.corpus.sha256, self.model.n_vocab, spec.ctx, spec.n_batch, spec.scoring.value)

        def tokenize() -> np.ndarray:
            vocab = LoadedModel(self.model.path, vocab_only=True)
            try:
                return vocab.tokenize(self.corpus.text)
            finally:
                vocab.close()

        return BaseLogProbs.open(self.logprob_path(spec), meta, tokenize)

    def _states(self, spec: EvalSpec) -> StateStore:
        """Saved stream states of this base, corpus and ctx (candidates' and the base's)."""
        return StateStore(state_folder(self.cache, self.base_sha, self.corpus.sha256, spec.ctx, self.name, self.build_id()))

    def base_logprobs(self, spec: EvalSpec) -> BaseLogProbs:
        """The base's log-probs covering ``spec``'s chunks: each chunk computed once for every slice (a stream
        is extended from the base's saved state), cached on disk."""
        bl = self._base_cache(spec)
        spec.check_corpus(len(bl.tokens), self.corpus.path)
        chunks = range(spec.chunk_offset, spec.end)
        missing = bl.missing(chunks)
        if not missing:
            return bl
        base = LoadedModel(self.model.path)
        try:
            if spec.stream:
                run = spec.part(missing[0], spec.end - missing[0])
                with StreamEvaluator(base, spec.ctx, self.threads) as ev:
                    for c, logits in walk(ev, bl.tokens, run, self._states(spec), BASE_KEY):
                        if not bl.has(c):
                            bl.put(c, SparseRows.from_logits(logits, bl.tokens[spec.stream_targets(c)]))
                        self.progress("base log-probs", c + 1 - run.chunk_offset, run.n_chunks)
                        faults.point("measure", f"base-{spec.key}@{c}")
            else:
                windows = _windows(bl.tokens, spec, missing)
                with evaluator(self.model.path, spec, self.threads, base) as ev:
                    for i, logits in ev.run(windows):
                        bl.put(missing[i], SparseRows.from_logits(logits, windows[i, spec.first + 1 :]))
                        self.progress("base log-probs", i + 1, len(missing))
                        faults.point("measure", f"base-{spec.key}@{missing[i]}")
        finally:
            base.close()
        return bl

    def _evaluate(self, path: Path, spec: EvalSpec) -> EvalResult:
        bl = self.base_logprobs(spec)
        parts: list[TokenScores] = []
        model = self.loaded(path)
        if model.n_vocab != bl.meta.n_vocab:
            raise InputError(f"{path} has {model.n_vocab} tokens in its vocabulary, the base {bl.meta.n_vocab}")
        done = 0
        with ThreadPoolExecutor(self.threads) as pool:
            if spec.stream:
                counter = Walk()
                with StreamEvaluator(model, spec.ctx, self.threads) as ev:
                    for c, logits in walk(ev, bl.tokens, spec, self._states(spec), self.file_key(path), counter):
                        parts.append(score_parallel(logits, bl.get(c), bl.tokens[spec.stream_targets(c)], pool))
                        done += 1
                        self.progress(f"evaluate {path.name}", done, spec.n_chunks)
                        faults.point("measure", f"{path.stem}@{c}")
                forward, decode = counter.forward_tokens, ev.decode_seconds
            else:
                windows = _windows(bl.tokens, spec, list(range(spec.chunk_offset, spec.end)))
                with evaluator(path, spec, self.threads, model) as ev:
                    for i, logits in ev.run(windows):
                        parts.append(score_parallel(logits, bl.get(spec.chunk_offset + i), windows[i, spec.first + 1 :], pool))
                        self.progress(f"evaluate {path.name}", i + 1, spec.n_chunks)
                        faults.point("measure", f"{path.stem}@{spec.chunk_offset + i}")
                forward, decode = spec.n_chunks * spec.ctx, ev.decode_seconds
        scores = TokenScores.concat(parts)
        return EvalResult(KLDStats.from_scores(scores), scores, "llama-cpp-python logits", forward, decode)


def _windows(tokens: np.ndarray, spec: EvalSpec, chunks: list[int]) -> np.ndarray:
    """The windows ``chunks`` of the corpus tokens, (len(chunks), ctx)."""
    ctx = spec.ctx
    return np.stack([tokens[c * ctx : (c + 1) * ctx] for c in chunks]).astype(np.int32)


def default_threads() -> int:
    return runtime.default_threads()
