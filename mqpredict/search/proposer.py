"""The proposer: the candidate space scored by the surrogate, asked for the next batch (``ask(n)``).

The space is every assignable group × allowed type, deduplicated by the files it makes (effective
per-tensor types after llama.cpp's fallbacks). When it has at most ``exhaustive_limit`` configs it is
enumerated and every distinct file is scored; beyond that an evolutionary search on the surrogate
(random population, then rounds of one- and two-group mutations of the best by expected hypervolume
improvement) finds the candidates. Each candidate gets its own predicted ln KLD and calibrated interval
(:meth:`~mqpredict.surrogate.model.Surrogate.kld_halfwidth`); the batch is chosen by EHVI with
Kriging-believer fantasies (:mod:`mqpredict.search.acquisition`). Candidates already measured (same
file) are never proposed again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mqpredict.quant.config import Config
from mqpredict.quant.imatrix import Imatrix
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.resolve import resolve, types_key
from mqpredict.quant.types import QuantType
from mqpredict.search.acquisition import batch, ehvi
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
    ei: float  # expected hypervolume improvement (bpw × ln KLD) when it was chosen
    source: str = "proposed"  # proposed (by EHVI), allocator (the allocator's config, chosen by EHVI), probe, warm-start
    inflation: float = 1.0  # the campaign's recalibration factor the interval was widened (or narrowed) by

    def to_json(self) -> dict:
        return {"config": self.config.key, "types_key": self.types_key, "size_bytes": self.size_bytes, "bpw": self.bpw,
                "kld_pred": self.kld_pred, "kld_lo": self.kld_lo, "kld_hi": self.kld_hi, "ei": self.ei,
                "source": self.source, "inflation": self.inflation}  # fmt: skip


@dataclass(frozen=True)
class _Scored:
    """A config given whole (not a point of the space's grid), scored once: its file and its features."""

    config: Config
    types_key: str
    size_bytes: int
    bpw: float
    X: np.ndarray


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
    #: the importance matrix candidates are quantized with (its types allowed, its keys in the sizes)
    imatrix: Imatrix | None = None
    _space: Space = field(init=False, repr=False)
    _feat: Featurizer = field(init=False, repr=False)
    _scored_cache: dict[str, _Scored] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        cs = CandidateSpace(self.model, self.types, self.imatrix)
        self._space = Space.build(self.model, self.allowed or {g: cs.allowed(g) for g in cs.groups}, self.imatrix)
        self._feat = Featurizer(self._space, self.table)

    @property
    def n_configs(self) -> int:
        return self._space.n_total

    def _end(self, pick) -> np.ndarray:
        """The candidate with every group at the type ``pick`` (np.argmax / np.argmin) chooses by its bytes."""
        return np.array([[int(pick(b)) for b in self._space.raw_bytes]], dtype=np.int64)

    @property
    def max_bpw(self) -> float:
        """The bpw of the space's largest file (every group at its largest type)."""
        return float(self._space.sizes(self._end(np.argmax))[1][0])

    def worst_ln_kld(self, s: Surrogate, ln_ref: float) -> float:
        """The predicted ln KLD of the space's smallest file (every group at its smallest type): the far end of
        the range a front of this space spans."""
        return float(self.predict(self._end(np.argmin), s, ln_ref)[2][0])

    def predict(self, A: np.ndarray, s: Surrogate, ln_ref: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Exact sizes and bpw, predicted ln KLD and its calibrated half-width of each row of ``A``."""
        sizes, bpw = self._space.sizes(A)
        mean, hw = s.predict_kld(self._feat.matrix(A, bpw))
        return sizes, bpw, ln_ref + mean, hw

    def _pool(self, s: Surrogate, ln_ref: float, points, ref, z80: float) -> np.ndarray:
        sp = self._space
        if sp.n_total <= self.exhaustive_limit:
            A = sp.enumerate()
            return A[sp.unique(A)]
        rng = np.random.default_rng(self.seed)
        radices = np.array([len(t) for t in sp.types])
        A = (rng.random((self.population, len(radices))) * radices).astype(np.int16)
        A = A[sp.unique(A)]
        for _ in range(self.generations):  # keep the best, mutate one or two groups of each
            _sz, bpw, mu, hw = self.predict(A, s, ln_ref)
            score = ehvi(bpw, mu, hw / z80, points, ref)
            elite = A[np.argsort(-score)[: max(1, len(A) // 20)]]
            kids = np.repeat(elite, 4, axis=0)
            for _k in range(2):
                rows = np.arange(len(kids))
                cols = rng.integers(0, len(radices), len(kids))
                mask = rng.random(len(kids)) < (1.0 if _k == 0 else 0.5)
                kids[rows[mask], cols[mask]] = (rng.random(mask.sum()) * radices[cols[mask]]).astype(np.int16)
            A = np.vstack([elite, kids])
            A = A[sp.unique(A)]
        return A

    def ask(self, n: int, s: Surrogate, ln_ref: float, points: list[tuple[float, float]], ref: tuple[float, float],
            exclude: frozenset[str] | set[str], inflation: float = 1.0, coverage: float = 0.8,
            shortlist: int = 50, explore: float = 1.0, extra: tuple[Config, ...] = ()) -> list[Proposal]:  # fmt: skip
        """The next ``n`` configs by EHVI over ``points`` (the front, in (bpw, ln KLD)) up to ``ref``; every
        interval widened by ``inflation`` (the campaign's own recalibration); files in ``exclude`` never. EHVI
        takes each candidate's σ (its ``coverage`` interval's) times ``explore``; the proposals keep the interval.
        ``extra``: configs outside the space's grid that compete in the same batch (the allocator's per-tensor
        answers at many sizes; their proposals' source is ``allocator``)."""
        from scipy.stats import norm

        z80 = float(norm.ppf(0.5 + coverage / 2)) / explore
        A = self._pool(s, ln_ref, points, ref, z80)
        sizes, bpw, mu, hw = self.predict(A, s, ln_ref)
        hw = hw * inflation
        first = ehvi(bpw, mu, hw / z80, points, ref)
        cands: list[tuple[Config, str, str]] = []  # (config, types key, source), aligned with the arrays below
        rows: list[int] = []
        for i in np.argsort(-first, kind="stable"):  # a shortlist of unmeasured files, best first
            if first[i] <= 0 or len(rows) >= shortlist * max(1, n):
                break
            cfg = self._space.config(A[i])
            k = types_key(self.model, resolve(self.model, cfg, imatrix=self.imatrix))
            if k not in exclude:
                rows.append(int(i))
                cands.append((cfg, k, "proposed"))
        arrays = [a[rows] for a in (sizes, bpw, mu, hw)]
        if extra:
            seen = exclude | {k for _, k, _ in cands}
            xs = [x for x in self._scored(extra) if x.types_key not in seen]
            if xs:
                xm, xh = s.predict_kld(np.array([x.X for x in xs]))
                more = (np.array([x.size_bytes for x in xs]), np.array([x.bpw for x in xs]), ln_ref + xm, xh * inflation)
                arrays = [np.concatenate([a, m]) for a, m in zip(arrays, more)]
                cands += [(x.config, x.types_key, "allocator") for x in xs]
        if not cands:
            return []
        sz, b, m, h = arrays
        picked, f = batch(b, m, h / z80, points, ref, n)  # f: every candidate's EHVI before any fantasy
        return [Proposal(cands[j][0], cands[j][1], int(sz[j]), float(b[j]), float(np.exp(m[j])), float(np.exp(m[j] - h[j])),
                         float(np.exp(m[j] + h[j])), float(f[j]), cands[j][2], inflation) for j in picked]  # fmt: skip

    def _scored(self, configs: tuple[Config, ...]) -> list[_Scored]:
        """Exact sizes and features of configs given whole — probes, warm starts, ``extra`` (once per config)."""
        from mqpredict.surrogate import features as F
        from mqpredict.surrogate.service import score_configs

        todo = [c for c in configs if c.key not in self._scored_cache]
        for c, sc in zip(todo, score_configs(self.model, self.table, todo, imatrix=self.imatrix) if todo else []):
            self._scored_cache[c.key] = _Scored(c, sc.types_key, sc.size_bytes, sc.bpw, F.matrix([sc.features])[0])
        return [self._scored_cache[c.key] for c in configs]

    def proposal(self, config: Config, s: Surrogate, ln_ref: float, source: str, inflation: float = 1.0) -> Proposal:
        """A given config (a probe, a warm start) as a proposal with its prediction (its EHVI is not computed)."""
        sc = self._scored((config,))[0]
        mean, hw = s.predict_kld(sc.X[None, :])
        mu, hw = ln_ref + float(mean[0]), float(hw[0]) * inflation
        return Proposal(config, sc.types_key, sc.size_bytes, sc.bpw, math.exp(mu), math.exp(mu - hw), math.exp(mu + hw),
                        0.0, source, inflation)  # fmt: skip
