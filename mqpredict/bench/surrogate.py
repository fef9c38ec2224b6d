"""Benchmark: how fast the surrogate screens a space, and what features cost per billion parameters.

* **screening** — candidates scored per second including enumeration, exact sizes, deduplication by
  effective types, feature assembly and the mean model's prediction (target: 10⁶ in under 10 s); the
  interval is then computed for the top candidates only.
* **features** — seconds per billion parameters to compute a model's weight-error table (sampled rows
  quantized in memory: what a new model costs before its first prediction; ``bench weights`` compares it
  with the full pure quantizations it replaced).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from mqpredict.llama.inprocess import InProcessEngine
from mqpredict.records.identity import identify
from mqpredict.search.space import CandidateSpace
from mqpredict.search.vectorized import Featurizer, Space
from mqpredict.surrogate.model import Surrogate
from mqpredict.surrogate.weight_error import compute


@dataclass(frozen=True)
class ScreenResult:
    model: str
    n_candidates: int
    n_unique: int
    seconds_enumerate_size_dedup: float
    seconds_features: float
    seconds_predict: float
    seconds_total: float
    per_second: float
    seconds_table: float
    params: int

    @property
    def seconds_per_billion(self) -> float:
        return self.seconds_table / self.params * 1e9

    def to_json(self) -> dict:
        return {**asdict(self), "table_seconds_per_billion_params": self.seconds_per_billion}


def screen(base, surrogate: Surrogate, limit: int = 1_000_000, threads: int = 0, progress=None) -> ScreenResult:
    with InProcessEngine(base, None, threads=threads, progress=progress) as eng:
        ident = identify(eng.model)
        t0 = time.perf_counter()
        table = compute(eng.model, ident.model_id, None, None, eng.threads, progress)
        t_table = time.perf_counter() - t0
        cs = CandidateSpace(eng.model)
        t0 = time.perf_counter()
        space = Space.build(eng.model, {g: cs.allowed(g) for g in eng.model.groups})
        A = space.enumerate(limit)
        _, bpw = space.sizes(A)
        keep = space.unique(A)
        t1 = time.perf_counter()
        X = Featurizer(space, table).matrix(A[keep], bpw[keep])
        t2 = time.perf_counter()
        mean = surrogate.boosters_[0].predict(X)
        top = np.argsort(mean)[:100]
        surrogate.predict(X[top])  # intervals for the shortlist only
        t3 = time.perf_counter()
    return ScreenResult(eng.model.path.name, len(A), int(len(keep)), t1 - t0, t2 - t1, t3 - t2, t3 - t0,
                        len(A) / (t3 - t0), t_table, eng.model.n_params)  # fmt: skip
