"""The search policy: one ask/tell object, run by the campaign and by ``bench search`` alike.

Optuna's sampler is the model: the caller owns the loop and the measurements, the policy owns every
decision. ``ask(snapshot, n)`` returns the next proposals; ``tell(results)`` hands back what they
measured; the same object also decides the staged confirmations (:meth:`Policy.reference`: what a first
stage is judged against, and at which level), which measured configs are candidate wins and which of
them the held-out slice re-confirms (:meth:`Policy.reconfirmed`, Holm over the wins tested). A
campaign (``mqpredict.workflows.campaign``) is this policy + an executor + a recorder (store, MLflow,
console); ``bench search`` runs the very same object against a ground truth's oracle.

Decisions, in order, on each ``ask``:

1. **Isolation probes** first (``probes=auto``: when the model is outside the surrogate's training
   range and the probes fit a third of the budget), a batch at a time.
2. **Warm start**: configs given up front (the zero-run allocator's answers, when the caller has them)
   that are not measured yet.
3. **EHVI**: the surrogate is refitted (:class:`Learner`: the shipped records without the model's
   family + this model's own; the intervals' leave-one-family-out calibration is made on the first fit
   and kept) and corrected by the model's own residuals (:mod:`mqpredict.surrogate.local`: a shift or a
   small ridge, only as far as leave-one-out on those residuals supports it), each candidate gets its own
   calibrated interval, scaled by the campaign's own recalibration (:meth:`Policy.inflation`), and the
   batch is the expected hypervolume
   improvement's best with Kriging-believer fantasies (:mod:`mqpredict.search.acquisition`) among the space's
   candidates and ``candidates`` (the allocator's per-tensor answers at many sizes, which the space's
   group-level grid cannot express — so the policy measures the free answer where it predicts that to be the
   best file of its size, and its own hybrids elsewhere), over the front
   of the space (:meth:`Policy.front`: its reference point is the space's largest bpw and its smallest file's
   predicted ln KLD — with the worst preset's instead, EHVI spent runs on the space's cheapest configs, worth
   nothing to the front: on the SmolLM2-imatrix truth HV at B = 15 went 0.886 → 0.926). The policy stops
   when the best candidate's EHVI is below ``stop_share`` of the front's hypervolume.

Recalibration counts every measured config the policy proposed, **including those stopped early**:
each told result is a measured ln KLD with its (block) standard error — a partial one has a larger
error — and its score is ``|measured − predicted| / sqrt(hw² + (z₈₀·se)²)`` (the interval of a noisy
observation of the predicted value). Once ``MIN_TOLD`` are told, intervals are scaled by the ``coverage``
quantile of the scores: widened when this run's errors exceed what the families held out in training
promised, narrowed (down to ``MIN_INFLATION``) when they are smaller — on a model the records know little
about, the transferred intervals are ±1.5 in ln KLD while the corrected predictions miss by ~0.1, and
intervals that stay that wide make EHVI explore where the prediction already says there is nothing (on the
SmolLM2-imatrix ground truth, HV at B = 20 went from 0.67 to 0.83 with both changes). The scores are taken
against the surrogate's own intervals (a proposal carries the factor it was asked with): scored against the
already-narrowed ones, a narrowed run drifted back towards the transferred width after a batch (0.911 / 0.925
→ 0.936 / 0.948 at B = 15 / 20 on that truth, 5 seeds, when fixed).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import pandas as pd

from mqpredict.errors import InputError
from mqpredict.pareto import hypervolume
from mqpredict.quant.config import Config
from mqpredict.quant.imatrix import Imatrix
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.resolve import resolve, types_key
from mqpredict.quant.types import QuantType
from mqpredict.search.confirm import Reference
from mqpredict.search.paired import Paired, holm, margin_to_line
from mqpredict.search.proposer import Proposal, Proposer
from mqpredict.search.snapshot import Snapshot
from mqpredict.search.space import DEFAULT_TYPES, CandidateSpace
from mqpredict.surrogate.model import Surrogate
from mqpredict.surrogate.weight_error import ErrorTable


class Probes(StrEnum):
    auto = "auto"  # when the model is outside the surrogate's training range and the probes fit the budget
    yes = "yes"
    no = "no"


#: told results before the intervals follow this run's own scores; the least factor they may shrink to
MIN_TOLD, MIN_INFLATION = 3, 0.1


@dataclass(frozen=True)
class PolicySettings:
    budget: int = 20  # confirmations the caller will spend (decides whether probes fit)
    batch: int = 4
    stage_fraction: float = 0.25  # first stage of a confirmation: this share of the search slice's windows
    alpha: float = 0.05  # one-sided level of every paired test (Bonferroni/Holm where several are made)
    stop_share: float = 1e-4  # stop when no candidate's EHVI reaches this share of the front's hypervolume
    probes: Probes = Probes.auto
    seed: int = 0
    #: re-confirmations kept in reserve (0: an eighth of the budget, at least 1). Each one re-measures a config on
    #: held-out tokens and adds nothing to the front: on the SmolLM2-imatrix truth a quarter cost 0.008 / 0.004 /
    #: 0.008 of HV at B = 15 / 20 / 50 against an eighth, for 1.2 / 1.4 more declared wins
    max_heldout: int = 0
    presets_in_front: bool = False  # EHVI over the front of presets and hybrids (True) or of hybrids only
    coverage: float = 0.8
    reconfirm: bool = True  # candidate wins are re-confirmed on held-out tokens (False: nothing is reserved)
    #: a first stage significantly above the presets' line stops the run (cheaper: only likely wins are measured
    #: in full); False (the default): only one dominated by a measured config of at most its size stops, so
    #: the hybrids between the presets that no measured config beats are measured in full — the front a user
    #: picks a size from (on the SmolLM2-imatrix truth, HV at B = 20 0.83 → 0.91, at B = 50 0.87 → 0.98)
    stop_above_line: bool = False
    #: EHVI's σ = the calibrated interval's σ × this. EHVI is one-step myopic: its σ term pays for the chance that
    #: a candidate lands far below its prediction, and a campaign of 10–20 runs has few later steps to use what an
    #: exploratory run teaches. On the SmolLM2-imatrix truth, 10 seeds, HV at B = 15 / 20: 0.4 → 0.945 / 0.951,
    #: 0.6 → 0.947 / 0.948, 0.8 → 0.939 / 0.943, 1 (the calibrated σ) → 0.938 / 0.945; 1.6 → 0.923 / 0.927 (5 seeds)
    explore: float = 0.6

    def reserve(self) -> int:
        if not self.reconfirm:
            return 0
        return self.max_heldout or max(1, self.budget // 8)


@dataclass(frozen=True)
class Told:
    """What one proposal measured: ln KLD on the tokens scored, its block standard error, complete or not."""

    types_key: str
    ln_kld: float
    se: float
    complete: bool = True


def told_from(types_key: str, vector: np.ndarray, per_window: int, complete: bool) -> Told:
    """A result from its per-token vector: ln of the mean and the block (window) error of that ln."""
    from mqpredict.search.paired import paired

    p = paired(vector, [], per_window)
    return Told(types_key, p.diff, p.se if math.isfinite(p.se) else 1.0, complete)


# ============================================================================ the surrogate it learns
@dataclass
class Learner:
    """Fits the surrogate on the shipped records without the model's family, plus the model's own."""

    shipped: pd.DataFrame  # training records (any models), the model's family already removed
    tables: dict[str, ErrorTable]  # table key (model, imatrix) → weight-error table (the model's own included)
    params: dict  # the surrogate's hyper-parameters
    family: str  # the model's family: it may enter training only through the model's own records
    calibration_: Surrogate | None = None  # the first fit's (its interval calibration is kept by later fits)
    local: bool = True  # correct the boosters by the model's own residuals (mqpredict.surrogate.local)

    @classmethod
    def without_family(cls, family: str, model_id: str, table: ErrorTable, store: Path, tables: Path,
                       surrogate_folder: Path) -> Learner:  # fmt: skip
        from mqpredict.records.store import Store
        from mqpredict.surrogate.data import load_tables

        shipped = Store(store, create=False).load() if (store / "STORE.json").exists() else pd.DataFrame()
        if not shipped.empty:
            shipped = shipped[shipped["family"] != family].reset_index(drop=True)
        tabs = load_tables(tables) if tables.exists() else {}
        tabs[table.key] = table  # the (model, imatrix) table: records with an imatrix need their own
        params = {}
        if (surrogate_folder / "metadata.json").exists():
            params = json.loads((surrogate_folder / "metadata.json").read_text()).get("params", {})
        # one LightGBM thread: next to llama.cpp's own threads two OpenMP threads spin, and the fit is small
        return cls(shipped, tabs, {**params, "n_jobs": 1}, family)

    def fit(self, own: pd.DataFrame, seed: int | None = None) -> Surrogate:
        from mqpredict.surrogate.data import build

        recs = pd.concat([self.shipped, own], ignore_index=True) if len(self.shipped) else own
        data = build(recs, self.tables)
        params = {**self.params, **({"seed": seed} if seed is not None else {})}
        learnt = set(data.rows.loc[data.rows["family"] == self.family, "config"]) if len(data.rows) else set()
        if learnt - set(own["config"] if len(own) else []):
            raise InputError(f"the surrogate would learn {self.family} rows that are not the model's own")  # never
        s = Surrogate(**params).fit(data, self.calibration_)
        if self.calibration_ is None:
            self.calibration_ = s
        if self.local:
            mine = (data.rows["family"] == self.family).to_numpy()
            s.correct_locally(data.X[mine], data.Y[mine])
        return s

    def describe(self) -> dict:
        keys = "\n".join(sorted(self.shipped["key"])) if len(self.shipped) else ""
        return {"shipped_records": int(len(self.shipped)), "excluded_family": self.family,
                "families": sorted(set(self.shipped["family"])) if len(self.shipped) else [],
                "keys_sha256": hashlib.sha256(keys.encode()).hexdigest()[:16], "params": self.params}  # fmt: skip


# ============================================================================ the policy
@dataclass
class Policy:
    model: ModelInfo
    table: ErrorTable
    learner: Learner
    settings: PolicySettings = field(default_factory=PolicySettings)
    types: tuple[QuantType, ...] = DEFAULT_TYPES
    allowed: dict[str, tuple[QuantType, ...]] | None = None  # per group (default: ``types``)
    warm_start: tuple[Config, ...] = ()  # the allocator's configs, when the caller has them
    #: configs outside the space's group-level grid that EHVI weighs with its own candidates: the allocator's
    #: per-tensor answers at many sizes (a campaign's; a ground truth's allocator configs are points of its space)
    candidates: tuple[Config, ...] = ()
    imatrix: Imatrix | None = None  # what every candidate is quantized with (its types allowed, its keys sized)
    say: Callable[[str], None] = field(default=lambda s: None, repr=False)
    surrogate_: Surrogate | None = field(init=False, default=None)
    stopped: str = field(init=False, default="")  # why the last ask returned nothing
    outside_: list[str] = field(init=False, default_factory=list)  # why probes were chosen
    _asked: dict[str, tuple[float, float]] = field(init=False, default_factory=dict)  # types key → (μ, half-width)
    _told: dict[str, Told] = field(init=False, default_factory=dict)
    _probes: list[Config] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.proposer = Proposer(self.model, self.table, self.types, seed=self.settings.seed, allowed=self.allowed,
                                 imatrix=self.imatrix)  # fmt: skip

    # ------------------------------------------------------------------ ask / tell
    def ask(self, snap: Snapshot, n: int) -> list[Proposal]:
        """The next ``n`` (or fewer) proposals; none when the policy has nothing worth measuring (``stopped``)."""
        self.stopped = ""
        if snap.ln_ref is None:
            raise InputError("the Q8_0 reference is not measured on this model", "see mqpredict data list")
        s = self.learner.fit(snap.ok, self.settings.seed)
        self.surrogate_ = s
        infl = self.inflation()
        if self._probes is None:
            self._probes = self._decide_probes(s)
        for source, queue in (("probe", self._probes), ("warm-start", list(self.warm_start))):
            todo = [c for c in queue if self._key(c) not in snap.known]
            if todo:
                return [self._remember(self.proposer.proposal(c, s, snap.ln_ref, source, infl)) for c in todo[:n]]
        pts, ref = self.front(snap, s)
        props = self.proposer.ask(n, s, snap.ln_ref, pts, ref, snap.known, infl, self.settings.coverage,
                                  explore=self.settings.explore, extra=self.candidates)  # fmt: skip
        hv = hypervolume(pts, ref)
        if not props or max(p.ei for p in props) < self.settings.stop_share * max(hv, 1e-12):
            self.stopped = "no candidate is expected to improve the front's hypervolume by more than the threshold"
            return []
        return [self._remember(p) for p in props]

    def tell(self, results: Iterable[Told]) -> None:
        for r in results:
            self._told[r.types_key] = r

    def remember(self, prediction: dict) -> None:
        """A proposal made before a resume (``predictions.jsonl``): its prediction counts for recalibration."""
        mu = math.log(prediction["kld_pred"])
        hw = (math.log(prediction["kld_hi"]) - mu) / prediction.get("inflation", 1.0)
        self._asked[prediction["types_key"]] = (mu, hw)

    def _remember(self, p: Proposal) -> Proposal:
        """Keep the proposal's prediction with the half-width the surrogate gave it, before any recalibration:
        the run's scores measure the surrogate's own intervals, so the factor they give is applied once (scored
        against already-scaled intervals, a narrowed run would drift back to the surrogate's width)."""
        mu = math.log(p.kld_pred)
        self._asked[p.types_key] = (mu, (math.log(p.kld_hi) - mu) / p.inflation)
        return p

    def _key(self, c: Config) -> str:
        return types_key(self.model, resolve(self.model, c, imatrix=self.imatrix))

    def inflation(self) -> float:
        """How much to widen the intervals: the ``coverage`` quantile of this run's own scores (≥ 1)."""
        from scipy.stats import norm

        z = float(norm.ppf(0.5 + self.settings.coverage / 2))
        scores = []
        for k, t in self._told.items():
            if k in self._asked:
                mu, hw = self._asked[k]
                scores.append(abs(t.ln_kld - mu) / math.hypot(hw, z * t.se))
        if len(scores) < MIN_TOLD:
            return 1.0
        return max(MIN_INFLATION, float(np.quantile(scores, self.settings.coverage)))

    def _decide_probes(self, s: Surrogate) -> list[Config]:
        mode = self.settings.probes
        if mode == Probes.no:
            return []
        probes = list(CandidateSpace(self.model, self.types, self.imatrix).probes()) if self.allowed is None else self._allowed_probes()
        if mode == Probes.auto:
            from mqpredict.surrogate import features as F
            from mqpredict.surrogate.service import score_configs

            x = score_configs(self.model, self.table, [Config.parse("default=Q8_0")], imatrix=self.imatrix)[0].features
            self.outside_ = s.out_of_range(F.matrix([x]))[0]
            if not self.outside_ or len(probes) > self.settings.budget // 3:
                return []
            self.say(f"the model is outside the surrogate's training range ({'; '.join(self.outside_)}): "
                     f"{len(probes)} isolation probes first")  # fmt: skip
        return probes

    def _allowed_probes(self) -> list[Config]:
        """One group changed on all-Q8_0 (the highest allowed type), for each other allowed type."""
        top = {g: ts[0] for g, ts in self.allowed.items()}
        out = []
        for g, ts in self.allowed.items():
            for t in ts[1:]:
                out.append(Config(default=next(iter(top.values())), groups=tuple({**top, g: t}.items())))
        return out

    # ------------------------------------------------------------------ the front it values
    def front(self, snap: Snapshot, s: Surrogate | None = None) -> tuple[list[tuple[float, float]], tuple[float, float]]:
        """The points of the front EHVI improves and its reference point: the largest bpw of the space and of
        what is measured, and the worst ln KLD of the space — its smallest file's, as predicted by ``s``, or any
        measured point of the front that is worse —, but never worse than the line's smallest preset: a hybrid
        with more KLD than every preset on the line is worth nothing to someone who has the presets. Without
        ``s`` (or with the presets in the front), the largest ln KLD measured. The front is the space's: points
        beyond its worst end (the 1–2 bpw presets of a space that stops at 4.5 bpw) would make EHVI value the
        cheap end of the space far beyond what it is worth; and with a few chosen presets (``--only``, Q2_K the
        smallest), a space that goes down to IQ1_S would make it value 2-bpw files at KLD 3–5."""
        base = snap.ok if self.settings.presets_in_front else snap.own
        pts = [(float(r.bpw), math.log(float(r.kld_mean))) for r in base.itertuples()]
        allp = [(float(r.bpw), math.log(float(r.kld_mean))) for r in snap.ok.itertuples()]
        ref_x = max(self.proposer.max_bpw, *(b for b, _ in allp)) + 1e-6
        if s is None or self.settings.presets_in_front:
            return pts, (ref_x, max(y for _, y in allp) + 1e-6)
        worst = max([self.proposer.worst_ln_kld(s, snap.ln_ref), *(y for _, y in pts)])
        if snap.line.hull:
            worst = min(worst, snap.line.hull[0].ln_kld)
        return pts, (ref_x, worst + 1e-6)

    # ------------------------------------------------------------------ decisions on measurements
    def reference(self, snap: Snapshot) -> Reference:
        """What a staged confirmation's first stage is judged against (the rule the confirm job applies)."""
        if not snap.line.hull:
            raise InputError("no preset could be measured on this model", "see the failed records: mqpredict data list")
        incumbents = [(float(r.bpw), str(r.key)) for r in snap.ok.itertuples()]
        return Reference(snap.line, dict(snap.vectors), incumbents, snap.per_window, self.settings.alpha,
                         self.settings.stop_above_line)  # fmt: skip

    def margin(self, snap: Snapshot, key: str) -> Paired | None:
        r = snap.ok[snap.ok["key"] == key].iloc[0]
        return margin_to_line(snap.vectors[key], float(r["bpw"]), snap.line, snap.vectors, snap.per_window)

    def candidate_wins(self, snap: Snapshot) -> list[tuple[str, Paired]]:
        """Configs the search measured in full that are significantly below the line, best first."""
        out = []
        for key in snap.own["key"]:
            m = self.margin(snap, key)
            if m is not None and m.below(self.settings.alpha):
                out.append((str(key), m))
        return sorted(out, key=lambda km: km[1].diff)

    def reserve(self, snap: Snapshot) -> int:
        """Confirmations to keep for re-confirming candidate wins on held-out tokens."""
        return min(len(self.candidate_wins(snap)), self.settings.reserve())

    def reconfirmed(self, tests: list[tuple[str, Paired]]) -> list[str]:
        """Of the held-out margins of the candidate wins re-measured, the wins Holm's procedure keeps."""
        return holm(tests, self.settings.alpha)


def spread(cands: list[tuple[str, Paired]], bpw: dict[str, float], spacing: float = 0.1) -> list[tuple[str, Paired]]:
    """Candidates best first, but one per ``spacing``-bpw neighbourhood before any second one: the held-out
    budget re-confirms wins across the size range, not five near-copies of the best."""
    first: list[tuple[str, Paired]] = []
    for k, m in cands:
        if all(abs(bpw[k] - bpw[j]) >= spacing for j, _ in first):
            first.append((k, m))
    return first + [c for c in cands if c not in first]
