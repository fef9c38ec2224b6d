"""The proposer: the candidate space scored by the surrogate, asked for the next batch (``ask(n)``).

The space is every assignable group × allowed type, deduplicated by the files it makes (effective
per-tensor types after llama.cpp's fallbacks). When it has at most ``exhaustive_limit`` configs it is
enumerated and every distinct file is scored; beyond that an evolutionary search on the surrogate
(random population, then rounds of one- and two-group mutations of the best by expected improvement)
finds the candidates. Candidates already measured (same file) are never proposed again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mqpredict.quant.config import Config
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.resolve import resolve, types_key
from mqpredict.quant.types import QuantType
from mqpredict.pareto import Line, frontier_at
from mqpredict.search.acquisition import diverse_batch, expected_improvement, sigma_from_halfwidth
from mqpredict.search.space import DEFAULT_TYPES, CandidateSpace
from mqpredict.search.vectorized import Featurizer, Space
from mqpredict.surrogate.model import Surrogate
from mqpredict.surrogate.weight_error import ErrorTable


@dataclass(frozen=True)
class Proposal:
    config: Config
    types_key: str
    size_bytes: int
    bpw: float
    kld_pred: float  # predicted mean KLD
    kld_lo: float  # 80% interval
    kld_hi: float
    ei: float  # expected improvement of ln KLD below the frontier

    def to_json(self) -> dict:
        return {"config": self.config.key, "types_key": self.types_key, "size_bytes": self.size_bytes, "bpw": self.bpw,
                "kld_pred": self.kld_pred, "kld_lo": self.kld_lo, "kld_hi": self.kld_hi, "ei": self.ei}  # fmt: skip


@dataclass
class Proposer:
    model: ModelInfo
    table: ErrorTable
    types: tuple[QuantType, ...] = DEFAULT_TYPES
    exhaustive_limit: int = 2_000_000
    population: int = 200_000
    generations: int = 6
    seed: int = 0
    #: allowed types per group (default: ``types`` for every group, F16 too for embeddings/lm_head); a
    #: group with one type is fixed
    allowed: dict[str, tuple[QuantType, ...]] | None = None
    _space: Space = field(init=False, repr=False)
    _feat: Featurizer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        cs = CandidateSpace(self.model, self.types)
        self._space = Space.build(self.model, self.allowed or {g: cs.allowed(g) for g in cs.groups})
        self._feat = Featurizer(self._space, self.table)

    @property
    def n_configs(self) -> int:
        return self._space.n_total

    def _score(self, A: np.ndarray, s: Surrogate, ln_ref: float, sigma: float, front: Line):
        sizes, bpw = self._space.sizes(A)
        mu = ln_ref + s.predict(self._feat.matrix(A, bpw))["kld"].mean
        ei = expected_improvement(mu, np.full(len(A), sigma), frontier_at(front, bpw))
        return sizes, bpw, mu, ei

    def _pool(self, s: Surrogate, ln_ref: float, sigma: float, front: Line) -> np.ndarray:
        sp = self._space
        if sp.n_total <= self.exhaustive_limit:
            A = sp.enumerate()
            return A[sp.unique(A)]
        rng = np.random.default_rng(self.seed)
        radices = np.array([len(t) for t in sp.types])
        A = (rng.random((self.population, len(radices))) * radices).astype(np.int16)
        A = A[sp.unique(A)]
        for _ in range(self.generations):  # keep the best, mutate one or two groups of each
            ei = self._score(A, s, ln_ref, sigma, front)[3]
            elite = A[np.argsort(-ei)[: max(1, len(A) // 20)]]
            kids = np.repeat(elite, 4, axis=0)
            for _k in range(2):
                rows = np.arange(len(kids))
                cols = rng.integers(0, len(radices), len(kids))
                mask = rng.random(len(kids)) < (1.0 if _k == 0 else 0.5)
                kids[rows[mask], cols[mask]] = (rng.random(mask.sum()) * radices[cols[mask]]).astype(np.int16)
            A = np.vstack([elite, kids])
            A = A[sp.unique(A)]
        return A

    def ask(self, n: int, s: Surrogate, ln_ref: float, halfwidth: float, front: Line, measured: set[str],
            coverage: float = 0.8) -> list[Proposal]:  # fmt: skip
        """The next ``n`` configs by expected improvement below ``front``, spread over its bpw range."""
        sigma = sigma_from_halfwidth(halfwidth, coverage)
        A = self._pool(s, ln_ref, sigma, front)
        sizes, bpw, mu, ei = self._score(A, s, ln_ref, sigma, front)
        if not front.hull:
            return []
        lo, hi = front.hull[0].bpw, front.hull[-1].bpw
        edges = np.linspace(lo, hi, n + 1)
        keys: dict[int, str] = {}
        taken: set[str] = set()
        per_band = max(10, 40 // max(1, n))
        for a, b in [(lo, hi), *zip(edges, edges[1:])]:  # the global best, then the best of every band
            inside = np.flatnonzero((bpw >= a) & (bpw <= b) & (ei > 0))
            got = 0
            for i in inside[np.argsort(-ei[inside], kind="stable")]:
                if got >= (4 * n if a == lo and b == hi else per_band):
                    break
                if int(i) in keys:
                    continue
                k = types_key(self.model, resolve(self.model, self._space.config(A[i])))
                if k in measured or k in taken:
                    continue
                keys[int(i)] = k
                taken.add(k)
                got += 1
        if not keys:
            return []
        keep = sorted(keys)
        idx = np.array(keep)
        chosen = [keep[j] for j in diverse_batch(bpw[idx], ei[idx], n, lo, hi)]
        return [Proposal(self._space.config(A[i]), keys[i], int(sizes[i]), float(bpw[i]), float(np.exp(mu[i])),
                         float(np.exp(mu[i] - halfwidth)), float(np.exp(mu[i] + halfwidth)), float(ei[i]))
                for i in chosen]  # fmt: skip
