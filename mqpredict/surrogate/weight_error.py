"""Weight-space quantization error of each tensor group at each quant type, on a model's own weights.

For every type, the pure quantization of the base (llama.cpp, cached by the in-process engine) holds
each tensor at its effective type; dequantizing it with gguf's dequantizers and comparing with the base
weights gives the relative error ``‖W − Q(W)‖² / ‖W‖²`` per tensor. A group's error at a type is the
energy-weighted mean over its tensors (``Σ‖W‖²·err / Σ‖W‖²``). Rows are subsampled deterministically
above :data:`MAX_ELEMENTS` per tensor, so a model costs about one pass over its weights per type.

The result is a small table, ``group → {effective type: relative MSE}``, cached per model (JSON) — all
the surrogate needs about a model's weights — with each group's share of the parameters and, for a
mixture of experts, the fraction of each group one token uses (``active``: experts used / experts for
the routed experts; tables written before it was kept read as dense, 1 everywhere).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.quants import dequantize

from mqpredict.quant.header import GGUFHeader
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.types import QuantType, T, is_quantized
from mqpredict.util.atomic import atomic_write_text

#: types whose errors are measured (everything a search or a preset may write without an imatrix)
ERROR_TYPES: tuple[QuantType, ...] = (
    T.F16, T.Q8_0, T.Q6_K, T.Q5_K, T.Q5_1, T.Q5_0, T.Q4_K, T.Q4_1, T.Q4_0, T.IQ4_NL, T.IQ4_XS, T.Q3_K, T.IQ3_S, T.Q2_K,
)  # fmt: skip
#: … and on a mixture of experts MXFP4 too (the MXFP4_MOE preset writes its routed experts as MXFP4)
MOE_ERROR_TYPES: tuple[QuantType, ...] = (T.MXFP4,)
MAX_ELEMENTS = 1 << 21  # rows sampled per tensor beyond this many elements
TABLE_VERSION = 1


@dataclass(frozen=True)
class ErrorTable:
    """group → {type name: relative MSE}; plus each group's share of the parameters and the fraction of
    it one token uses (groups missing from ``active`` are used whole)."""

    model_id: str
    errors: dict[str, dict[str, float]]
    shares: dict[str, float]
    seconds: float = 0.0
    active: dict[str, float] = field(default_factory=dict)

    def mse(self, group: str, qtype: str) -> float | None:
        return self.errors.get(group, {}).get(qtype)

    def active_of(self, group: str) -> float:
        """The fraction of the group's parameters one token uses (1 but for a mixture's routed experts)."""
        return self.active.get(group, 1.0)

    def to_json(self) -> dict:
        return {"version": TABLE_VERSION, "model_id": self.model_id, "errors": self.errors, "shares": self.shares,
                "active": self.active, "seconds": self.seconds}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> ErrorTable:
        if d.get("version") != TABLE_VERSION:
            raise ValueError(f"weight-error table version {d.get('version')} (expected {TABLE_VERSION})")
        return cls(d["model_id"], d["errors"], d["shares"], d.get("seconds", 0.0), d.get("active", {}))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ErrorTable:
        return cls.from_json(json.loads(Path(path).read_text()))


def _rows(mm: np.ndarray, h: GGUFHeader, name: str, pick: np.ndarray) -> np.ndarray:
    """Raw bytes of the picked rows of a tensor (2-D view: rows × bytes per row)."""
    t = h.tensor_map[name]
    n_rows = t.n_elements // t.shape[0]
    raw = mm[h.data_offset + t.offset : h.data_offset + t.offset + t.nbytes].reshape(n_rows, -1)
    return raw[pick]


def _as_f32(raw: np.ndarray, qtype: QuantType) -> np.ndarray:
    if qtype == T.F32:
        return raw.reshape(-1).view(np.float32)
    if qtype == T.F16:
        return raw.reshape(-1).view(np.float16).astype(np.float32)
    if qtype == T.BF16:
        return (raw.reshape(-1).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return dequantize(np.ascontiguousarray(raw), qtype).astype(np.float32).reshape(-1)


def compute(model: ModelInfo, model_id: str, pure: dict[QuantType, GGUFHeader], progress=None) -> ErrorTable:
    """The table for ``model`` from its pure quantizations ``pure`` (type → header of the pure file)."""
    t0 = time.perf_counter()
    base = model.header
    bmm = np.memmap(base.path, dtype=np.uint8, mode="r")
    picks, ref, energy = {}, {}, {}
    for t in model.assignable:
        n_rows = t.n_elements // t.shape[0]
        k = max(1, min(n_rows, MAX_ELEMENTS // t.shape[0]))
        picks[t.name] = np.linspace(0, n_rows - 1, k).astype(np.int64)
        w = _as_f32(_rows(bmm, base, t.name, picks[t.name]), t.qtype)
        ref[t.name] = w
        energy[t.name] = float(np.dot(w, w)) / len(w) * t.n_elements  # estimate of ‖W‖² over all rows
    per_tensor: dict[tuple[str, str], float] = {}
    for i, (qt, h) in enumerate(pure.items()):
        if progress:
            progress("weight errors", i, len(pure))
        mm = np.memmap(h.path, dtype=np.uint8, mode="r")
        for t in model.assignable:
            e = h.tensor_map[t.name].qtype
            if (t.name, e.name) in per_tensor:
                continue
            if e == t.qtype or not (is_quantized(e) or e in (T.F16, T.BF16)):
                per_tensor[t.name, e.name] = 0.0
                continue
            q = _as_f32(_rows(mm, h, t.name, picks[t.name]), e)
            w = ref[t.name]
            d = w - q
            per_tensor[t.name, e.name] = float(np.dot(d, d) / max(np.dot(w, w), 1e-30))
    if progress:
        progress("weight errors", len(pure), len(pure))
    errors: dict[str, dict[str, float]] = {}
    for g in model.groups:
        num: dict[str, float] = {}
        den: dict[str, float] = {}
        for (name, e), err in per_tensor.items():
            if model.group_map[name] == g:  # energy-weighted over the group's tensors that take type e
                num[e] = num.get(e, 0.0) + energy[name] * err
                den[e] = den.get(e, 0.0) + energy[name]
        errors[g] = {e: num[e] / den[e] for e in num}
    shares = {g: v / model.n_params for g, v in model.group_params().items()}
    active = {g: a for g, a in model.group_active().items() if a != 1.0}
    return ErrorTable(model_id, errors, shares, time.perf_counter() - t0, active)


def cached_table(path: Path) -> ErrorTable | None:
    """The table saved at ``path``, or None (a damaged file is removed: it is recomputed)."""
    if path.exists():
        try:
            return ErrorTable.load(path)
        except (ValueError, KeyError, OSError):
            path.unlink(missing_ok=True)
    return None


def error_types(model: ModelInfo) -> tuple[QuantType, ...]:
    """The types whose errors a model's table holds."""
    return ERROR_TYPES + (MOE_ERROR_TYPES if model.n_expert else ())


def error_table(engine, model_id: str, types=None, cache: Path | None = None, progress=None) -> ErrorTable:
    """The (cached) table of the engine's base model: one pure quantization and one pass per type
    (``types``, default :func:`error_types`).

    The pure quantizations come from the in-process engine's cache; with another engine (the tools
    engine on a user's GPU build) an in-process engine on the same base computes them (CPU only)."""
    path = (cache or engine.cache / "weight_errors") / f"{model_id}.json"
    table = cached_table(path)
    if table is not None:
        return table
    if not hasattr(engine, "pure_header"):
        from mqpredict.llama.inprocess import InProcessEngine

        with InProcessEngine(engine.model.path, None, engine.spec) as cpu:
            return error_table(cpu, model_id, types, path.parent, progress)
    pure = {qt: engine.pure_header(qt) for qt in types or error_types(engine.model)}
    table = compute(engine.model, model_id, pure, progress)
    table.save(path)
    return table
