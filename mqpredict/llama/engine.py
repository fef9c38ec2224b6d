"""The Engine contract: build any config of one base into a GGUF, and measure a GGUF against the base.

An engine is bound to one base model and one evaluation setup (corpus, ctx, token slice, threads)::

    engine.build(config, out=None) -> Built          # the file, its effective types, its exact size
    engine.evaluate(path) -> Evaluation               # KLD statistics (+ per-token scores) vs the base
    engine.measure(config) -> Measurement             # both, plus provenance

Two implementations share one test suite: :class:`~mqpredict.llama.inprocess.InProcessEngine` (default,
llama-cpp-python, stitching builder) and :class:`~mqpredict.llama.tools.ToolsEngine` (the user's own
``llama-quantize`` / ``llama-perplexity`` binaries).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mqpredict.errors import InputError, LlamaError
from mqpredict.llama import runtime
from mqpredict.measure.corpus import Corpus, EvalSpec
from mqpredict.measure.kld import TokenScores
from mqpredict.measure.stats import KLDStats
from mqpredict.quant.config import Config
from mqpredict.quant.imatrix import Imatrix
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.resolve import EffectiveTypes, resolve, types_key
from mqpredict.quant.header import read_header, read_tensor_infos
from mqpredict.quant.size import SizeReport, output_kv_bytes, size_of
from mqpredict.util import faults
from mqpredict.util.hashing import file_sha256
from mqpredict.util.paths import cache_dir


#: how a measurement of a ready GGUF is labelled: ``gguf:<file name>`` (its record gets the header's config)
FILE_PREFIX = "gguf:"

Progress = Callable[[str, int, int], None]  # (what, done, total)


def _no_progress(what: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class Built:
    """A built GGUF and what it holds."""

    path: Path
    config: Config
    types: EffectiveTypes
    types_key: str
    size: SizeReport
    seconds: float


@dataclass(frozen=True)
class Evaluation:
    stats: KLDStats
    scores: TokenScores | None  # per-token scores, when the engine can produce them
    seconds: float
    source: str  # what the numbers were computed from (e.g. "llama-perplexity statistics")
    forward_tokens: int = 0  # tokens the quantized model really ran through (replays included)
    decode_seconds: float | None = None  # of ``seconds``, those inside llama.cpp's forward passes (None: unknown)


@dataclass(frozen=True)
class EvalResult:
    """What an engine's ``_evaluate`` returns."""

    stats: KLDStats
    scores: TokenScores | None
    source: str
    forward_tokens: int
    decode_seconds: float | None = None  # wall time inside llama_decode, when the engine can tell


@dataclass(frozen=True)
class Measurement:
    """One real llama.cpp evaluation of one config on one (base, corpus, token slice)."""

    config: str
    types_key: str
    size_bytes: int
    bpw: float
    stats: KLDStats
    engine: str
    kld_source: str
    llama_version: str
    build: str
    base: str  # base file sha256
    base_origin: str
    corpus: str  # corpus id
    ctx: int
    chunk_offset: int
    n_chunks: int
    per_token_path: str | None
    seconds_build: float
    seconds_eval: float
    types: dict[str, str] = field(repr=False, default_factory=dict)
    imatrix_id: str | None = None
    imatrix_corpus: str | None = None
    scoring: str = "windows"
    forward_tokens: int = 0  # tokens the quantized model ran through for this measurement

    def to_json(self, with_types: bool = True) -> dict:
        d = {
            "config": self.config,
            "types_key": self.types_key,
            "size_bytes": self.size_bytes,
            "bpw": self.bpw,
            **self.stats.to_json(),
            "engine": self.engine,
            "kld_source": self.kld_source,
            "llama_version": self.llama_version,
            "build": self.build,
            "base": self.base,
            "base_origin": self.base_origin,
            "corpus": self.corpus,
            "ctx": self.ctx,
            "chunk_offset": self.chunk_offset,
            "n_chunks": self.n_chunks,
            "scoring": self.scoring,
            "imatrix_id": self.imatrix_id,
            "imatrix_corpus": self.imatrix_corpus,
            "per_token_path": self.per_token_path,
            "seconds_build": self.seconds_build,
            "seconds_eval": self.seconds_eval,
            "forward_tokens": self.forward_tokens,
        }
        if with_types:
            d["types"] = self.types
        return d


class Engine(ABC):
    """Shared behaviour of both engines; subclasses implement the llama.cpp calls."""

    name: str = "engine"

    def __init__(
        self,
        base: str | os.PathLike,
        corpus: str | os.PathLike | None,
        spec: EvalSpec = EvalSpec(),
        *,
        threads: int = 0,
        allow_quantized_base: bool = False,
        cache: str | os.PathLike | None = None,
        progress: Progress | None = None,
        imatrix: Imatrix | str | os.PathLike | None = None,
    ) -> None:
        self.model = ModelInfo.load(base)
        self.check_base(self.model, allow_quantized_base)
        if imatrix is not None and not isinstance(imatrix, Imatrix):
            imatrix = Imatrix.load(imatrix)
        if imatrix is not None:
            imatrix.check_model(self.model)
        self.imatrix: Imatrix | None = imatrix
        self.allow_quantized_base = allow_quantized_base
        self._corpus = Corpus.load(corpus) if corpus is not None else None
        if self._corpus is not None and imatrix is not None:
            imatrix.check_evaluation_text(self._corpus.text, self._corpus.sha256, str(self._corpus.path))
        self.spec = spec
        self.threads = threads or runtime.default_threads()
        self.cache = Path(cache) if cache else cache_dir()
        self.progress = progress or _no_progress
        self.base_sha = file_sha256(self.model.path)
        self._workdir: Path | None = None
        self._built: dict[Path, str] = {}  # files this engine built → what names their content

    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            raise InputError("no evaluation corpus was given", "pass --corpus TEXT")
        return self._corpus

    # ------------------------------------------------------------- checks
    @staticmethod
    def check_base(model: ModelInfo, allow_quantized: bool) -> None:
        if model.base_origin == "skeleton":
            raise InputError(f"{model.path} is a skeleton (published shapes, no weights): it cannot be built or measured",
                             "use it with `mqpredict inspect` and `mqpredict size` (presets included)")  # fmt: skip
        q = model.quantized_tensors
        if q and not allow_quantized:
            raise InputError(
                f"{model.path} is already quantized ({q[0].name} is {q[0].qtype.name}; {len(q)} tensors in all)",
                "a quantized base makes its own grid look free and every KLD misleading; "
                "use an F32/F16/BF16 base (`mqpredict base prepare` restores one) or pass --allow-quantized-base",
            )

    def check_candidate(self, path: Path) -> ModelInfo:
        """A GGUF to evaluate must be a quantization of this base (same vocabulary and tensors)."""
        cand = ModelInfo.load(path)
        if cand.vocab_hash != self.model.vocab_hash:
            raise InputError(
                f"{path} has a different vocabulary from the base {self.model.path.name} "
                f"({cand.n_vocab} vs {self.model.n_vocab} tokens)",
                "KLD compares next-token distributions, so both files must share one tokenizer",
            )
        base_shapes = {t.name: t.shape for t in self.model.tensors}
        for t in cand.tensors:
            if base_shapes.get(t.name) != t.shape:
                raise InputError(
                    f"{path} is not a quantization of {self.model.path.name}: tensor {t.name} "
                    f"{'is missing from the base' if t.name not in base_shapes else 'has another shape'}"
                )
        missing = set(base_shapes) - {t.name for t in cand.tensors}
        if missing:
            raise InputError(f"{path} is not a quantization of {self.model.path.name}: it lacks {sorted(missing)[0]}")
        return cand

    # --------------------------------------------------------------- paths
    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="mqpredict-"))
            # An engine nobody closes still removes its scratch files, when collected or at exit.
            self._workdir_cleanup = weakref.finalize(self, shutil.rmtree, self._workdir, ignore_errors=True)
        return self._workdir

    def close(self) -> None:
        if self._workdir is not None:
            self._workdir_cleanup()
            self._workdir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def logprob_path(self, spec: EvalSpec) -> Path:
        """The base log-prob cache of ``spec``'s evaluation: one per (base, corpus, scoring mode, ctx, batch
        layout, engine, build), whatever the token slice."""
        return (
            self.cache
            / "logprobs"
            / f"{self.base_sha[:16]}-{self.corpus.sha256[:12]}-{spec.context_key}-{self.name}-{self.build_id()}"
        )

    def file_key(self, path: Path) -> str:
        """Names the content of a GGUF to evaluate: its effective types for a file this engine built (with the
        build and imatrix it depends on), else its sha256."""
        key = self._built.get(path.resolve())
        return key if key is not None else f"sha-{file_sha256(path)[:24]}"

    @property
    def keeps_vectors(self) -> bool:
        """Whether evaluations come with per-token scores (paired comparisons need them)."""
        return True

    @property
    def imatrix_id(self) -> str | None:
        return self.imatrix.id if self.imatrix is not None else None

    @property
    def quant_context(self) -> str:
        """Names what a file built here depends on besides its types: the build and the imatrix."""
        return self.build_id() + (f"-im{self.imatrix.id}" if self.imatrix is not None else "")

    def per_token_path(self, tkey: str, spec: EvalSpec) -> Path:
        return (
            self.cache
            / "per_token"
            / f"{self.base_sha[:16]}-{self.corpus.sha256[:12]}-{spec.key}-{self.name}-{self.quant_context}"
            / f"{tkey}.kld.npy"
        )

    # ------------------------------------------------------ the contract
    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def build_id(self) -> str: ...

    @abstractmethod
    def dry_run(self, model: ModelInfo, config: Config) -> EffectiveTypes: ...

    @abstractmethod
    def _build(self, config: Config, types: EffectiveTypes, out: Path) -> None: ...

    @abstractmethod
    def _evaluate(self, path: Path, spec: EvalSpec) -> EvalResult:
        """Statistics, per-token scores (or None), what they were computed from, forward tokens run."""

    @abstractmethod
    def base_logprobs(self, spec: EvalSpec):
        """Make sure the base's log-probs for ``spec`` exist (computed once, cached on disk)."""

    def resolve(self, config: Config) -> EffectiveTypes:
        return resolve(self.model, config, self.dry_run, self.imatrix)

    def size_of(self, types: EffectiveTypes) -> SizeReport:
        """Exact size of the file with these types, as this engine writes it (with its imatrix, if any)."""
        return size_of(self.model, types, self.imatrix)

    def size(self, config: Config) -> SizeReport:
        return self.size_of(self.resolve(config))

    def build(self, config: Config, out: str | os.PathLike | None = None) -> Built:
        """Build ``config`` into ``out`` (default: a file in the engine's work dir)."""
        t0 = time.perf_counter()
        types = self.resolve(config)
        tkey = types_key(self.model, types)
        out = Path(out) if out else self.workdir / f"{tkey}.gguf"
        faults.point("build", tkey)
        self._build(config, types, out)
        faults.point("build", f"{tkey}:written")
        actual = read_back_types(self.model, out, self.imatrix)
        if actual != types:
            diff = next(n for n in types if actual.get(n) != types[n])
            out.unlink(missing_ok=True)
            raise LlamaError(
                f"{self.name} wrote {diff} as {actual.get(diff)} but {types[diff].name} was predicted",
                "the llama.cpp build differs from the one mqpredict was tested with; please report it",
            )
        self._built[out.resolve()] = f"{self.quant_context}-{tkey}"
        return Built(out, config, types, tkey, self.size_of(types), time.perf_counter() - t0)

    def evaluate(self, path: str | os.PathLike, spec: EvalSpec | None = None) -> Evaluation:
        """KLD statistics of the GGUF at ``path`` (a quantization of this base) against the base."""
        path = Path(path)
        self.check_candidate(path)
        return self._timed_evaluate(path, spec or self.spec)

    def _timed_evaluate(self, path: Path, spec: EvalSpec) -> Evaluation:
        t0 = time.perf_counter()
        r = self._evaluate(path, spec)
        return Evaluation(r.stats, r.scores, time.perf_counter() - t0, r.source, r.forward_tokens, r.decode_seconds)

    def release(self, path: Path) -> None:
        """Forget anything held for ``path`` (it is about to be deleted)."""

    def measure(self, config: Config, spec: EvalSpec | None = None, keep: str | os.PathLike | None = None) -> Measurement:
        """Build, evaluate, keep the per-token scores; the built file is deleted unless ``keep``."""
        spec = spec or self.spec
        self.base_logprobs(spec)  # a corpus problem shows before any build work
        built = self.build(config, keep)
        try:
            ev = self.evaluate(built.path, spec)
        finally:
            if keep is None:
                self.release(built.path)
                built.path.unlink(missing_ok=True)
        return _measurement(self, config.key, built.types, built.size.size_bytes, built.size.bpw, ev, spec, built.seconds)

    def measure_file(self, path: str | os.PathLike, spec: EvalSpec | None = None) -> Measurement:
        """Measure a ready GGUF of this base (e.g. a community quantization); its config is its file name."""
        spec = spec or self.spec
        cand = self.check_candidate(Path(path))
        ev = self._timed_evaluate(Path(path), spec)
        types = {t.name: t.qtype for t in cand.tensors}
        return _measurement(self, f"{FILE_PREFIX}{cand.path.name}", types, cand.header.file_size, cand.bpw, ev, spec, 0.0)



def read_back_types(model: ModelInfo, path: Path, imatrix: Imatrix | None = None) -> EffectiveTypes:
    """The per-tensor types actually in a file built from ``model``. Its metadata is the base's as
    llama-quantize rewrites it (known size), so the tensor infos are read from where they must be;
    anything else gets a full header parse."""
    infos = read_tensor_infos(path, 24 + output_kv_bytes(model, imatrix), len(model.tensors))
    if infos is None or {t.name for t in infos} != set(model.header.tensor_map):
        infos = read_header(path).tensors
    return {t.name: t.qtype for t in infos}


def _measurement(engine: Engine, config: str, types: EffectiveTypes, size: int, bpw: float, ev: Evaluation,
                 spec: EvalSpec, seconds_build: float) -> Measurement:  # fmt: skip
    tkey = types_key(engine.model, types)
    pt = None
    if ev.scores is not None:
        pt = engine.per_token_path(tkey, spec)
        save_scores(pt, ev.scores)
    return Measurement(
        config=config,
        types_key=tkey,
        size_bytes=size,
        bpw=bpw,
        stats=ev.stats,
        engine=engine.name,
        kld_source=ev.source,
        llama_version=engine.version(),
        build=engine.build_id(),
        base=engine.base_sha,
        base_origin=engine.model.base_origin,
        corpus=engine.corpus.id,
        ctx=spec.ctx,
        chunk_offset=spec.chunk_offset,
        n_chunks=spec.n_chunks,
        per_token_path=str(pt) if pt else None,
        seconds_build=seconds_build,
        seconds_eval=ev.seconds,
        types={k: v.name for k, v in types.items()},
        imatrix_id=engine.imatrix_id,
        imatrix_corpus=engine.imatrix.corpus_id if engine.imatrix is not None else None,
        scoring=spec.scoring.value,
        forward_tokens=ev.forward_tokens,
    )


def save_scores(path: Path, scores: TokenScores) -> None:
    """The per-token KLD as float32 ``.npy`` at ``path``; the other per-token scores beside it (.npz)."""
    from mqpredict.util.atomic import atomic_open

    with atomic_open(path) as f:
        np.save(f, scores.kld.astype(np.float32))
    faults.point("measure", f"{path.name}:saved")  # the KLD vector written, its other scores not yet
    with atomic_open(_aux(path)) as f:
        np.savez(f, p_diff=scores.p_diff, nll=scores.nll, nll_base=scores.nll_base, same_top=scores.same_top)


def _aux(path: Path) -> Path:
    return path.with_name(path.name.replace(".kld.npy", ".scores.npz"))


def load_scores(path: str | os.PathLike) -> TokenScores:
    path = Path(path)
    kld = np.load(path, allow_pickle=False)
    with np.load(_aux(path), allow_pickle=False) as z:
        return TokenScores(kld, z["p_diff"], z["nll"], z["nll_base"], z["same_top"])
