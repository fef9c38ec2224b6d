"""Weight-space quantization error of each tensor and tensor group at each quant type, on a model's own weights.

A sample of rows of every assignable tensor (evenly spaced, deterministic) is quantized **in memory by
llama.cpp's own quantizer** (:mod:`mqpredict.llama.qchunk`, the function llama-quantize calls, with the
importance matrix's weights for that tensor — per expert for 3-D tensors — exactly as llama-quantize
passes them), dequantized by ggml, and compared with the base rows. Rows are quantized independently, so
the sampled rows are byte for byte the rows of the real quantized file: a table costs about one read of the
sampled weights, no pure quantization and no disk.

The error of a tensor at a type is relative::

    err = Σ_rows Σ_j a_j (w − q)²  /  Σ_rows Σ_j a_j w²

With an importance matrix, ``a_j`` is its weight of input channel ``j`` (the mean squared activation that
multiplies column ``j``): the error on the channels the activations use, the objective llama.cpp's
quantizers themselves minimise. Without one, ``a_j = 1`` (plain relative MSE). llama-imatrix records only
``blk.*`` matrices, so with an imatrix the tensors it lacks are weighted by what is known of their input:
the output projection (``output.weight``, or ``token_embd`` when tied) by ``output_norm.weight²`` (its input
is the RMS-normalised final state scaled by that norm's weights), an untied ``token_embd`` as the input it
becomes (below), anything else by 1. Those weights only weigh the error; the tensor is quantized as
llama-quantize does it, without imatrix weights.

An untied ``token_embd`` is not a matrix product: one of its rows *is* the residual stream a token starts
from, and layer 0 reads it through ``blk.0.attn_norm`` (RMS norm, then that norm's weights). With an imatrix
its error is the relative error of each row as that norm sees it: every row divided by its own mean square,
channels weighted by ``attn_norm.weight²``.

Per tensor the table keeps the relative error per effective type, the tensor's **energy**
``Σ_rows Σ_j a_j w²`` extrapolated from the sample to all its rows, and its **weight** in the zero-run
allocator's objective: the parameters one token's forward pass uses from it (all of them; for a mixture's
routed experts the used fraction). The objective is ``Σ_tensors err × weight``, the relative error per
weight a token uses, additive across tensors. An untied ``token_embd`` weighs what the layer-0 tensors
reading the normalised stream weigh (all of ``blk.0`` but ``attn_output`` and ``ffn_down``): a relative error
ε in their input is a relative error ε in each of their outputs. A group's error at a type is the
energy-weighted mean over its tensors that take that type (``Σ err·energy / Σ energy``): the surrogate's
feature.

Why weights and not energies (``err × energy``, each tensor's output error, was the objective before):
energies are in each tensor's own output units — logits for the output projection, the residual stream for
``attn_output``/``ffn_down`` (which Gemma's post-norms rescale anyway), internal activations for the rest —
and do not add up. Spearman of each objective against measured KLD over each real model's shipped imatrix
records (presets and hybrids; ``benchmarks/objective.py``): Gemma3-270M 0.100 with energies, 0.999 with
weights; Qwen2.5-Coder-1.5B 0.58 → 0.99 (with energies an untied token_embd, then weighed as one row per
token, looked free: the allocator and the surrogate chose Q2_K embeddings, which cost as much KLD as the rest
of a Q5_K_M file); SmolLM2 0.984 → 0.992; Qwen2.5-0.5B 0.983 → 1.000.

Tables are keyed by (model, imatrix): ``MODEL_ID.json`` without an imatrix, ``MODEL_ID-imIMATRIX_ID.json``
with one; with an imatrix they also hold the imatrix-only types (:data:`IMATRIX_ONLY_TYPES`). Version-1
tables (group errors from full pure quantizations, no per-tensor data) stay readable.

A mixture of experts' table also holds MXFP4 (the MXFP4_MOE preset writes its routed experts in it) and
the fraction of each group one token uses (``active``: experts used / experts for the routed experts;
tables written before it was kept read as dense, 1 everywhere).
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from mqpredict.errors import ConfigError
from mqpredict.quant.config import Config
from mqpredict.quant.header import TensorInfo
from mqpredict.quant.imatrix import Imatrix
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.resolve import check_types
from mqpredict.quant.types import NoFallback, QuantType, T, effective_type, is_quantized
from mqpredict.util.atomic import atomic_write_text

#: types whose errors are measured (everything a search or a preset may write without an imatrix)
ERROR_TYPES: tuple[QuantType, ...] = (
    T.F16, T.Q8_0, T.Q6_K, T.Q5_K, T.Q5_1, T.Q5_0, T.Q4_K, T.Q4_1, T.Q4_0, T.IQ4_NL, T.IQ4_XS, T.Q3_K, T.IQ3_S, T.Q2_K,
)  # fmt: skip
#: the types llama.cpp writes only with an importance matrix: in the table when one is given
IMATRIX_ONLY_TYPES: tuple[QuantType, ...] = (T.IQ3_XXS, T.IQ2_S, T.IQ2_XS, T.IQ2_XXS, T.IQ1_M, T.IQ1_S)
#: … and on a mixture of experts MXFP4 too (the MXFP4_MOE preset writes its routed experts as MXFP4)
MOE_ERROR_TYPES: tuple[QuantType, ...] = (T.MXFP4,)
#: rows sampled per tensor: enough for ``SAMPLE_ELEMENTS`` weights, at least ``MIN_ROWS`` rows, and at least
#: ``MIN_GROUP_ROWS`` rows per group (a one-tensor group such as the embeddings gets them all)
SAMPLE_ELEMENTS = 1 << 15
MIN_ROWS = 4
MIN_GROUP_ROWS = 256
#: the norm through which layer 0 reads the residual stream an untied token_embd's row starts
READ_BY = "blk.0.attn_norm"
#: the layer tensors that write the residual stream rather than read it
STREAM_WRITERS = ("attn_output", "ffn_down")
TABLE_VERSION = 2
#: how the version-1 tables were made (full pure quantizations, rows sampled above 2^21 weights)
PURE_METHOD = "pure quantizations"


def table_types(imatrix: Imatrix | None, moe: bool = False) -> tuple[QuantType, ...]:
    """The types a table holds: :data:`ERROR_TYPES`, plus the imatrix-only ones when there is an imatrix and
    :data:`MOE_ERROR_TYPES` on a mixture of experts."""
    return ERROR_TYPES + (IMATRIX_ONLY_TYPES if imatrix is not None else ()) + (MOE_ERROR_TYPES if moe else ())


def error_types(model: ModelInfo, imatrix: Imatrix | None = None) -> tuple[QuantType, ...]:
    """The types whose errors a model's table holds."""
    return table_types(imatrix, bool(model.n_expert))


def table_file(model_id: str, imatrix_id: str | None = None) -> str:
    """The file name of a table: one per (model, imatrix)."""
    return f"{model_id}.json" if not imatrix_id else f"{model_id}-im{imatrix_id}.json"


@dataclass(frozen=True)
class ErrorTable:
    """group → {type name: relative error}; each group's share of the parameters; per tensor the relative
    error at each effective type and its energy (both empty in version-1 tables)."""

    model_id: str
    errors: dict[str, dict[str, float]]
    shares: dict[str, float]
    seconds: float = 0.0
    imatrix_id: str | None = None  # the imatrix the errors are weighted by and quantized with (None: plain)
    tensors: dict[str, dict[str, float]] = field(default_factory=dict)  # tensor → {effective type: rel. error}
    energy: dict[str, float] = field(default_factory=dict)  # tensor → Σ_rows Σ_j a_j w² (whole tensor)
    tensor_groups: dict[str, str] = field(default_factory=dict)  # tensor → its group
    method: str = PURE_METHOD  # how it was computed (e.g. "sampled rows: 131072 weights per tensor")
    types: tuple[str, ...] = ()  # the types it was asked for (each tensor holds their effective types)
    active: dict[str, float] = field(default_factory=dict)  # group → fraction one token uses (absent: 1)
    weights: dict[str, float] = field(default_factory=dict)  # tensor → its weight in the objective (see above)

    @property
    def key(self) -> str:
        """Names the table among others (its file name without .json): model, and imatrix if any."""
        return table_key(self.model_id, self.imatrix_id)

    @property
    def weighted(self) -> bool:
        return self.imatrix_id is not None

    @property
    def stale(self) -> bool:
        """Per-tensor errors without objective weights (an older mqpredict weighed by energy): recomputed."""
        return bool(self.tensors) and not self.weights

    def mse(self, group: str, qtype: str) -> float | None:
        return self.errors.get(group, {}).get(qtype)

    def active_of(self, group: str) -> float:
        """The fraction of the group's parameters one token uses (1 but for a mixture's routed experts)."""
        return self.active.get(group, 1.0)

    def abs_error(self, tensor: str, qtype: str) -> float | None:
        """The tensor's term of the objective at an effective type (``err × weight``), or None if unknown."""
        e = self.tensors.get(tensor, {}).get(qtype)
        return None if e is None else e * self.weights[tensor]

    def config_error(self, fractions: dict[str, dict[str, float]]) -> float:
        """The zero-run allocator's objective for a config given as group → {type: parameter fraction}:
        ``Σ_g weight_g Σ_type fraction × err_g(type)``. Tables without objective weights (version 1, or
        written by an older mqpredict) weigh groups by their parameter shares × the fraction a token uses."""
        total = 0.0
        for g, mix in fractions.items():
            if g not in self.errors:
                continue
            weight = self.group_weight[g] if self.weights else self.shares.get(g, 0.0) * self.active_of(g)
            for q, frac in mix.items():
                e = self.mse(g, q)
                total += weight * frac * (e if e is not None else 0.0 if q in ("F32", "F16", "BF16") else math.nan)
        return total

    @cached_property
    def group_weight(self) -> dict[str, float]:
        """group → the summed objective weight of its tensors."""
        out = {g: 0.0 for g in self.errors}
        for t, g in self.tensor_groups.items():
            out[g] = out.get(g, 0.0) + self.weights[t]
        return out

    def to_json(self) -> dict:
        return {"version": TABLE_VERSION, "model_id": self.model_id, "imatrix_id": self.imatrix_id,
                "errors": self.errors, "shares": self.shares, "seconds": self.seconds, "method": self.method,
                "tensors": self.tensors, "energy": self.energy, "tensor_groups": self.tensor_groups,
                "types": list(self.types), "active": self.active, "weights": self.weights}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> ErrorTable:
        v = d.get("version")
        if v == 1:
            return cls(d["model_id"], d["errors"], d["shares"], d.get("seconds", 0.0), active=d.get("active", {}))
        if v != TABLE_VERSION:
            raise ValueError(f"weight-error table version {v} (expected 1 or {TABLE_VERSION})")
        return cls(d["model_id"], d["errors"], d["shares"], d.get("seconds", 0.0), d.get("imatrix_id") or None,
                   d.get("tensors", {}), d.get("energy", {}), d.get("tensor_groups", {}), d.get("method", ""),
                   tuple(d.get("types", ())), d.get("active", {}), d.get("weights", {}))  # fmt: skip

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ErrorTable:
        return cls.from_json(json.loads(Path(path).read_text()))


def table_key(model_id: str, imatrix_id: str | None = None) -> str:
    """How training code looks a table up: the model id alone without an imatrix (as version 1 did)."""
    return table_file(model_id, imatrix_id)[: -len(".json")]


# ----------------------------------------------------------------------------- sampling
def _n_rows(t: TensorInfo) -> int:
    return t.n_elements // t.shape[0]


def sample_rows(model: ModelInfo, t: TensorInfo, sample_elements: int = SAMPLE_ELEMENTS, min_rows: int = MIN_ROWS,
                min_group_rows: int = MIN_GROUP_ROWS) -> np.ndarray:  # fmt: skip
    """The rows of ``t`` a table samples: evenly spaced over all rows (and experts), deterministic."""
    n = _n_rows(t)
    in_group = len(model.groups[model.group_map[t.name]])
    k = max(sample_elements // t.shape[0], min_rows, math.ceil(min_group_rows / in_group))
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64))


def _output_tensor(model: ModelInfo) -> str:
    return "token_embd.weight" if model.tied_embeddings else "output.weight"


def _read(mm: np.ndarray, model: ModelInfo, name: str, rows: np.ndarray) -> np.ndarray:
    """The base's rows ``rows`` of tensor ``name`` as float32 (as llama-quantize converts them)."""
    from mqpredict.llama.qchunk import dequantize_rows

    h = model.header
    t = h.tensor_map[name]
    raw = mm[h.data_offset + t.offset : h.data_offset + t.offset + t.nbytes].reshape(_n_rows(t), -1)
    return dequantize_rows(t.qtype, raw[rows], t.shape[0])


def _error_weights(model: ModelInfo, mm: np.ndarray, t: TensorInfo, imatrix: Imatrix | None) -> np.ndarray:
    """Per expert, the weight ``a_j`` of each input channel in the error (n_expert × n_per_row)."""
    n_per_row = t.shape[0]
    n_expert = t.shape[2] if len(t.shape) > 2 else 1
    if imatrix is None:
        return np.ones((n_expert, n_per_row), dtype=np.float32)
    if imatrix.has(t.name):
        return imatrix.entries[t.name].reshape(n_expert, n_per_row)
    norm = model.header.tensor_map.get("output_norm.weight")
    if t.name == _output_tensor(model) and norm is not None and norm.shape == (n_per_row,):
        g = _read(mm, model, norm.name, np.zeros(1, dtype=np.int64))[0]
        return np.broadcast_to((g * g).astype(np.float32), (n_expert, n_per_row))
    if _is_stream_embedding(model, t, imatrix):
        g = _read(mm, model, f"{READ_BY}.weight", np.zeros(1, dtype=np.int64))[0]
        return np.broadcast_to((g * g).astype(np.float32), (n_expert, n_per_row))
    return np.ones((n_expert, n_per_row), dtype=np.float32)


def _is_stream_embedding(model: ModelInfo, t: TensorInfo, imatrix: Imatrix | None) -> bool:
    """Whether ``t`` is an untied ``token_embd`` weighed as layer 0's normalised input (with an imatrix)."""
    norm = model.header.tensor_map.get(f"{READ_BY}.weight")
    return (imatrix is not None and t.name == "token_embd.weight" and not model.tied_embeddings
            and norm is not None and norm.shape == (t.shape[0],))  # fmt: skip


def objective_weights(model: ModelInfo) -> dict[str, float]:
    """tensor → its weight in the allocator's objective: the parameters one token's forward pass uses from it
    (an untied token_embd: those of the layer-0 tensors reading the stream its row starts)."""
    w = {t.name: t.n_elements * model.active_fraction(t) for t in model.assignable}
    if "token_embd.weight" in w and not model.tied_embeddings:
        w["token_embd.weight"] = sum(w[n] for n in stream_readers(model)) or w["token_embd.weight"]
    return w


def stream_readers(model: ModelInfo) -> list[str]:
    """The layer-0 tensors that read the normalised residual stream (all but its output projections)."""
    return [t.name for t in model.assignable if t.name.startswith("blk.0.")
            and not any(t.name.startswith(f"blk.0.{w}") for w in STREAM_WRITERS)]  # fmt: skip


def _candidates(model: ModelInfo, t: TensorInfo, types, imatrix: Imatrix | None) -> list[QuantType]:
    """The distinct effective types ``t`` takes for ``types`` that llama.cpp can write (with this imatrix)."""
    out: list[QuantType] = []
    for q in types:
        try:
            e = effective_type(q, t.shape[0])
            check_types(model, {t.name: e}, Config(default=e), imatrix)
        except (NoFallback, ConfigError):
            continue
        if e not in out:
            out.append(e)
    return out


def tensor_errors(model: ModelInfo, mm: np.ndarray, t: TensorInfo, types, imatrix: Imatrix | None,
                  rows: np.ndarray) -> tuple[dict[str, float], float]:  # fmt: skip
    """(effective type → relative error, energy of the whole tensor) of one tensor from the sampled ``rows``."""
    from mqpredict.llama.qchunk import dequantize_rows, quantize_rows

    n_per_row = t.shape[0]
    w = _read(mm, model, t.name, rows)
    per_expert = t.shape[1] if len(t.shape) > 2 else _n_rows(t)
    expert = rows // per_expert
    a = _error_weights(model, mm, t, imatrix)[expert]  # per sampled row: its expert's channel weights
    if _is_stream_embedding(model, t, imatrix):  # the norm divides every row by its own mean square
        a = a / np.maximum(np.mean(w.astype(np.float64) ** 2, axis=1, keepdims=True), 1e-30)
    qw = imatrix.entries[t.name].reshape(-1, n_per_row) if imatrix is not None and imatrix.has(t.name) else None
    den = float(np.einsum("ij,ij,ij->", a, w, w, dtype=np.float64))
    energy = den * _n_rows(t) / len(rows)
    out: dict[str, float] = {}
    for e in _candidates(model, t, types, imatrix):
        if e == t.qtype or not (is_quantized(e) or e in (T.F16, T.BF16)):
            out[e.name] = 0.0
            continue
        q = np.empty_like(w)
        for x in np.unique(expert):  # the expert's own weights, as llama_tensor_quantize_impl passes them
            sel = expert == x
            raw = quantize_rows(e, w[sel], None if qw is None else qw[x])
            q[sel] = dequantize_rows(e, raw, n_per_row)
        d = w - q
        out[e.name] = float(np.einsum("ij,ij,ij->", a, d, d, dtype=np.float64)) / max(den, 1e-30)
    return out, energy


def compute(model: ModelInfo, model_id: str, imatrix: Imatrix | None = None, types=None, threads: int = 1,
            progress=None, sample_elements: int = SAMPLE_ELEMENTS, min_rows: int = MIN_ROWS,
            rows=None) -> ErrorTable:  # fmt: skip
    """The table of ``model`` (quantized with ``imatrix``, or without): sampled rows, quantized in memory
    (``rows``: a function tensor → the rows to sample, instead of :func:`sample_rows`)."""
    t0 = time.perf_counter()
    types = tuple(types or error_types(model, imatrix))
    if imatrix is not None:
        imatrix.check_model(model)
    mm = np.memmap(model.path, dtype=np.uint8, mode="r")
    todo = sorted(model.assignable, key=lambda t: -t.n_elements)  # biggest first: the threads finish together
    picks = {t.name: rows(t) if rows else sample_rows(model, t, sample_elements, min_rows) for t in todo}
    per_tensor: dict[str, dict[str, float]] = {}
    energy: dict[str, float] = {}
    with ThreadPoolExecutor(max(1, threads)) as pool:
        futures = {t.name: pool.submit(tensor_errors, model, mm, t, types, imatrix, picks[t.name]) for t in todo}
        for i, t in enumerate(todo):
            if progress:
                progress("weight errors", i, len(todo))
            per_tensor[t.name], energy[t.name] = futures[t.name].result()
    if progress:
        progress("weight errors", len(todo), len(todo))
    names = [t.name for t in model.assignable]  # the model's order, whatever order the threads finished in
    per_tensor = {n: per_tensor[n] for n in names}
    energy = {n: energy[n] for n in names}
    return ErrorTable(model_id, group_errors(model, per_tensor, energy), _shares(model), time.perf_counter() - t0,
                      imatrix.id if imatrix is not None else None, per_tensor, energy,
                      {n: model.group_map[n] for n in names}, "given rows" if rows else
                      f"sampled rows: {sample_elements} weights per tensor (at least {min_rows} rows, "
                      f"{MIN_GROUP_ROWS} per group), llama.cpp's quantizer in memory", tuple(q.name for q in types),
                      {g: a for g, a in model.group_active().items() if a != 1.0}, objective_weights(model))  # fmt: skip


def group_errors(model: ModelInfo, per_tensor: dict[str, dict[str, float]], energy: dict[str, float]) -> dict:
    """group → {type: energy-weighted mean relative error over its tensors that take that type}."""
    errors: dict[str, dict[str, float]] = {}
    for g, ts in model.groups.items():
        num: dict[str, float] = {}
        den: dict[str, float] = {}
        for t in ts:
            for e, err in per_tensor[t.name].items():
                num[e] = num.get(e, 0.0) + energy[t.name] * err
                den[e] = den.get(e, 0.0) + energy[t.name]
        errors[g] = {e: num[e] / den[e] if den[e] > 0 else 0.0 for e in num}
    return errors


def _shares(model: ModelInfo) -> dict[str, float]:
    return {g: v / model.n_params for g, v in model.group_params().items()}


# ------------------------------------------------------------------------------- cache
def cached_table(path: Path) -> ErrorTable | None:
    """The table saved at ``path``, or None (a damaged file is removed, a stale one left to be overwritten:
    both are recomputed)."""
    if path.exists():
        try:
            table = ErrorTable.load(path)
        except (ValueError, KeyError, OSError):
            path.unlink(missing_ok=True)
            return None
        return None if table.stale else table
    return None


def table_for(model: ModelInfo, model_id: str, imatrix: Imatrix | None = None, threads: int = 1, progress=None,
              cache: Path | None = None, types=None) -> ErrorTable:  # fmt: skip
    """The (cached) table of ``model`` quantized with ``imatrix`` (or without) holding ``types`` (default: all
    of :func:`table_types`): computed in seconds when the cache has none, one without these types, or one
    without per-tensor errors or objective weights (made by an older mqpredict)."""
    from mqpredict.util.paths import cache_dir

    path = (cache or cache_dir() / "weight_errors") / table_file(model_id, imatrix.id if imatrix is not None else None)
    need = tuple(types or error_types(model, imatrix))
    table = cached_table(path)
    if table is not None and table.tensors and {q.name for q in need} <= set(table.types):
        return table
    table = compute(model, model_id, imatrix, tuple(dict.fromkeys(error_types(model, imatrix) + need)), threads,
                    progress)  # fmt: skip
    table.save(path)
    return table


def table_path(engine, model_id: str) -> Path:
    """Where the engine's cache keeps the table of its base and imatrix."""
    return engine.cache / "weight_errors" / table_file(model_id, engine.imatrix_id)


def error_table(engine, model_id: str, types=None, cache: Path | None = None, progress=None) -> ErrorTable:
    """The (cached) table of the engine's base, quantized with the engine's imatrix (if any), on the engine's
    threads (``cache``: the folder of tables, default the engine's cache)."""
    return table_for(engine.model, model_id, engine.imatrix, engine.threads, progress,
                     cache or engine.cache / "weight_errors", types)  # fmt: skip
