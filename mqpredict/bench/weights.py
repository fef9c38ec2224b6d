"""Benchmark: the weight-error table from sampled rows quantized in memory vs from full pure quantizations.

* **new** — :func:`mqpredict.surrogate.weight_error.compute`: a sample of rows per tensor quantized in memory
  by llama.cpp's quantizer (``ggml_quantize_chunk``), no file written.
* **old** — the version-1 method (:func:`from_pure`, kept here as the reference): one full pure quantization
  of the base per type with llama.cpp (written to a temporary cache, timed, its disk use reported, removed
  afterwards), then every tensor's rows (above 2^21 weights, evenly spaced samples) dequantized and compared.

Both run in one process, one after the other, on the same threads; without an imatrix the benchmark reports
how far the new values are from the old ones per (group, type) (target: within 2 %). With ``--imatrix`` the
new table is also timed with the imatrix (its errors are imatrix-weighted, so not comparable with the old).

``reference="rows"`` replaces the old method's full pure quantizations by quantizing **its own row picks**
in memory: the same rows, byte for byte (rows are quantized independently; tested), so the same values —
without writing 14 quantized copies of a large base (25 minutes and 17.5 GB for the 1.5B, hours on a
loaded machine). Its time is then that of the reproduction, not of the old method, and is reported as such.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mqpredict.quant.header import GGUFHeader
from mqpredict.quant.imatrix import Imatrix
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.types import QuantType, is_quantized, T
from mqpredict.surrogate.weight_error import ERROR_TYPES, ErrorTable, compute

OLD_MAX_ELEMENTS = 1 << 21  # the version-1 method's rows per tensor


def old_picks(t) -> np.ndarray:
    n_rows = t.n_elements // t.shape[0]
    k = max(1, min(n_rows, OLD_MAX_ELEMENTS // t.shape[0]))
    return np.linspace(0, n_rows - 1, k).astype(np.int64)


def from_pure(model: ModelInfo, model_id: str, pure: dict[QuantType, GGUFHeader]) -> ErrorTable:
    """The version-1 table: relative MSE per tensor from full pure quantizations (``type → header``)."""
    from mqpredict.llama.qchunk import dequantize_rows

    def rows(h: GGUFHeader, name: str, pick: np.ndarray) -> np.ndarray:
        t = h.tensor_map[name]
        mm = np.memmap(h.path, dtype=np.uint8, mode="r")
        raw = mm[h.data_offset + t.offset : h.data_offset + t.offset + t.nbytes].reshape(t.n_elements // t.shape[0], -1)
        return dequantize_rows(t.qtype, raw[pick], t.shape[0]).reshape(-1)

    t0 = time.perf_counter()
    picks = {t.name: old_picks(t) for t in model.assignable}
    ref = {t.name: rows(model.header, t.name, picks[t.name]) for t in model.assignable}
    energy = {n: float(np.dot(w, w)) / len(w) * model.header.tensor_map[n].n_elements for n, w in ref.items()}
    per_tensor: dict[str, dict[str, float]] = {t.name: {} for t in model.assignable}
    for h in pure.values():
        for t in model.assignable:
            e = h.tensor_map[t.name].qtype
            if e.name in per_tensor[t.name]:
                continue
            if e == t.qtype or not (is_quantized(e) or e in (T.F16, T.BF16)):
                per_tensor[t.name][e.name] = 0.0
                continue
            d = ref[t.name] - rows(h, t.name, picks[t.name])
            per_tensor[t.name][e.name] = float(np.dot(d, d) / max(np.dot(ref[t.name], ref[t.name]), 1e-30))
    from mqpredict.surrogate.weight_error import group_errors

    return ErrorTable(model_id, group_errors(model, per_tensor, energy),
                      {g: v / model.n_params for g, v in model.group_params().items()}, time.perf_counter() - t0)  # fmt: skip


@dataclass(frozen=True)
class Agreement:
    group: str
    qtype: str
    old: float
    new: float

    @property
    def rel_diff(self) -> float:
        return abs(self.new - self.old) / self.old if self.old > 0 else 0.0


def agreement(old: ErrorTable, new: ErrorTable) -> list[Agreement]:
    """Every (group, type) both tables hold, with a quantization error (F16 rounding excluded)."""
    out = []
    for g, errs in old.errors.items():
        for q, v in errs.items():
            n = new.mse(g, q)
            if n is not None and q not in ("F16", "BF16", "F32") and v > 0:
                out.append(Agreement(g, q, v, n))
    return out


@dataclass(frozen=True)
class WeightsBench:
    model: str
    n_params: int
    threads: int
    n_types: int
    new_seconds: float
    reference: str  # "pure": the old method for real; "rows": its values from its own rows, in memory
    old_seconds: float  # pure quantizations + comparison (reference "rows": the reproduction's seconds)
    old_quantize_seconds: float
    old_disk_bytes: int
    speedup: float
    max_rel_diff: float
    median_rel_diff: float
    share_within_2pct: float
    n_pairs: int
    worst: list[dict]
    imatrix_id: str | None = None
    new_imatrix_seconds: float | None = None
    new_imatrix_types: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


def run(base: Path, threads: int, imatrix: Imatrix | None = None, progress=None, say=None,
        reference: str = "pure") -> WeightsBench:  # fmt: skip
    """Old and new tables of ``base`` side by side (see the module doc)."""
    from mqpredict.llama.inprocess import InProcessEngine
    from mqpredict.records.identity import identify

    if reference not in ("pure", "rows"):
        raise ValueError(f"reference {reference!r}")
    say = say or (lambda s: None)
    model = ModelInfo.load(base)
    mid = identify(model).model_id
    say(f"new: {len(ERROR_TYPES)} types, sampled rows quantized in memory on {threads} thread(s)")
    t0 = time.perf_counter()
    new = compute(model, mid, None, ERROR_TYPES, threads, progress)
    t_new = time.perf_counter() - t0
    t_im, n_im = None, None
    if imatrix is not None:
        say("new, with the imatrix (its types too)")
        t0 = time.perf_counter()
        tab = compute(model, mid, imatrix, None, threads, progress)
        t_im, n_im = time.perf_counter() - t0, len({q for e in tab.errors.values() for q in e})
    if reference == "rows":
        say("old values: the version-1 method's own rows (2^21 weights per tensor), quantized in memory")
        t0 = time.perf_counter()
        old = compute(model, mid, None, ERROR_TYPES, threads, progress, rows=old_picks)
        t_old = t_q = time.perf_counter() - t0
        disk = 0
    else:
        tmp = Path(tempfile.mkdtemp(prefix="mqpredict-bench-weights-"))
        try:
            say(f"old: {len(ERROR_TYPES)} full pure quantizations (in {tmp}, removed afterwards), then the comparison")
            t0 = time.perf_counter()
            with InProcessEngine(base, None, threads=threads, cache=tmp, progress=progress) as eng:
                pure = {qt: eng.pure_header(qt) for qt in ERROR_TYPES}
                t_q = time.perf_counter() - t0
                disk = sum(f.stat().st_size for f in tmp.rglob("*.gguf"))
                old = from_pure(model, mid, pure)
            t_old = time.perf_counter() - t0
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    pairs = agreement(old, new)
    d = np.array([p.rel_diff for p in pairs])
    worst = sorted(pairs, key=lambda p: -p.rel_diff)[:5]
    return WeightsBench(model.path.name, model.n_params, threads, len(ERROR_TYPES), t_new, reference, t_old, t_q, disk,
                        t_old / t_new, float(d.max()), float(np.median(d)), float(np.mean(d <= 0.02)), len(pairs),
                        [{**asdict(p), "rel_diff": p.rel_diff} for p in worst],
                        imatrix.id if imatrix is not None else None, t_im, n_im)  # fmt: skip
