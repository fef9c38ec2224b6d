"""Benchmark: how fast each search method finds the Pareto front of an exhaustively measured space.

A ground truth (``datasets/ground_truth/*``, made by ``benchmarks/search_ground_truth.py``) holds every
config of one model's reduced space — the tiny model's six groups × Q8_0/Q6_K/Q4_K/Q3_K (4096 files),
SmolLM2's six groups × Q8_0/Q5_0/IQ4_NL with an imatrix (729 files) — and its seed presets, each measured
on the same windows with its per-token KLD vector: the first ``search_chunks`` windows are what a search
confirms on, the rest are held out for re-confirmation. A search here is a **simulation**: an oracle
reveals a config's measurement from the table when a method asks for it; llama.cpp never runs. Every
method starts with the presets measured (seeds, free, as in a campaign) and spends its budget on space
configs; a config already revealed (or the same file as a preset) is never charged twice. A truth whose
generation did not finish (``meta.json``: ``complete`` false) is benchmarked on the configs it holds, and
every figure says so.

Methods (each given a seed):

* ``mqpredict`` — **the campaign's own policy object** (:class:`mqpredict.search.policy.Policy`, the
  one ``campaign run`` drives), asked and told through the oracle instead of an executor: the surrogate
  refitted before every batch on the shipped dataset **without the truth's family** plus what the
  simulated search has revealed (checked by the :class:`~mqpredict.search.policy.Learner`), warm-started as a
  campaign is with the allocator's answers at ``min(4, B // 5)`` sizes inside the presets' range
  (:func:`warm_start_rows`; at the level of the space, since a campaign's per-tensor answers are not files
  of the truth), per-candidate intervals, EHVI batches, the policy's staged confirmations (its own rule, :func:`~mqpredict.search.
  confirm.judge`, on the first stage's windows of the truth's vectors; a stopped config costs one
  confirmation, a quarter of the tokens, and its partial result is told to the policy), its reserve for
  held-out re-confirmation, and its re-confirmation decisions (Holm) on the held-out windows. One run per
  budget (a campaign of that budget), not prefixes of one run. One LightGBM thread, seeded by the run's
  seed.
* ``random`` — space configs in a seeded random order.
* ``greedy`` — from the cheapest config (every group at the last type), measure every one-step upgrade
  of one group, move to the one with the best −Δln KLD / Δbytes, repeat until all at the first type.
* ``evolutionary`` — EvoPress-style search on real measurements: a population of everything measured,
  parents chosen by tournament (3) on the margin to the measured frontier inside a random fifth of the
  size range, children by EvoPress's level switch or a single-group ±1 level mutation; started from
  the uniform configs.
* ``probes`` — the isolation probes (one group changed on all-first-type) in seeded order, then every
  config predicted additively and measured in order of predicted margin to the presets' line.
* ``allocator`` — the zero-run allocator (:mod:`mqpredict.search.allocator`, llama.cpp PR #15550's method;
  ``mqpredict allocate``) at the level of this space: one type per group from the space's types, each
  group's (bytes, plain-MSE weight error) Pareto front from the model's weight-error table (sampled rows
  quantized in memory; imatrix-weighted when the truth ships its imatrix), solved at 256 size targets spread evenly over the
  space's range (a space this small is solved exactly: the least summed error within each size). Its
  distinct answers (47 on the shipped ground truth) are measured in
  coverage order (farthest point in bpw first), which gives evenly spaced size targets for any budget;
  it stops when they are all measured. No KLD run chooses anything: its spread over seeds is zero.

Metrics, for each method and seed (then mean and standard deviation over seeds):

* **HV fraction** — hypervolume, in (bpw, ln KLD over all the truth's windows), both minimised, of the
  space configs the method measured in full, divided by that of the whole space; reference point (max
  bpw, max ln KLD) over the space. At budgets of B confirmations (every run counts one, stopped-early
  ones and held-out re-confirmations included) and of B × the forward-pass tokens of one full run.
* **HV fraction with the presets** — HV(presets ∪ found) / HV(presets ∪ space): what a user can choose
  from.
* **True wins found** — distinct true nonlinear wins measured in full within B confirmations. A **true
  win** is a space config significantly below the presets' line on *all* the truth's windows (paired,
  window-block error, one-sided t test at the policy's alpha).
* **Declared wins, false wins** (mqpredict) — the wins a run re-confirmed on the held-out windows, and
  those of them that are not true wins; the **false-win rate** is false / declared over all runs.
* **Runs to the first true win**.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from mqpredict.errors import InputError
from mqpredict.quant.config import Config
from mqpredict.quant.imatrix import Imatrix
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.types import QuantType
from mqpredict.pareto import Line, Point, hypervolume
from mqpredict.search.paired import margin_to_line
from mqpredict.search.policy import PolicySettings
from mqpredict.surrogate.weight_error import ErrorTable
from mqpredict.util.paths import DATASETS

DEFAULT_TRUTH = DATASETS / "ground_truth" / "tiny256-s0"
METHODS = ("mqpredict", "random", "greedy", "evolutionary", "probes", "allocator")
ALLOCATOR_TARGETS = 256
BUDGETS = (10, 20, 50, 100)
POLICY = PolicySettings()  # the campaign's defaults (batch 4, stage 0.25, alpha 0.05)
ALPHA = POLICY.alpha


# ============================================================================ the ground truth
@dataclass
class Truth:
    """The measured table, its vectors, the model it was measured on, and what is true about it."""

    folder: Path
    meta: dict
    df: pd.DataFrame
    V: np.ndarray  # per-token KLD, float64, one row per df row
    table: ErrorTable
    model: ModelInfo
    space_rows: np.ndarray  # df rows of the space configs (one per distinct file)
    A: np.ndarray  # (n_space, n_free) type indices of each space row
    preset_rows: np.ndarray
    bpw: np.ndarray  # per df row
    ln_kld: np.ndarray
    size: np.ndarray
    row_of_key: dict[str, int]  # space types_key → df row
    space_pos: dict[int, int] = field(init=False)  # df row → index into space_rows / A
    preset_keys: set[str] = field(init=False)
    keys: np.ndarray = field(init=False)  # types_key per df row
    line: Line = field(init=False)
    hv_true: float = field(init=False)
    hv_true_presets: float = field(init=False)  # of the space and the presets together
    hv_presets: float = field(init=False)  # of the presets alone
    ref_point: tuple[float, float] = field(init=False)
    wins: set[int] = field(init=False)  # df rows of true nonlinear wins

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete", True))

    @property
    def search_windows(self) -> int:
        return int(self.meta.get("search_chunks") or self.meta["n_chunks"])

    @property
    def heldout_windows(self) -> int:
        return int(self.meta["n_chunks"]) - self.search_windows

    def search_vec(self, r: int) -> np.ndarray:
        return self.V[r][: self.search_windows * self.per_window]

    def heldout_vec(self, r: int) -> np.ndarray:
        return self.V[r][self.search_windows * self.per_window :]

    def __post_init__(self) -> None:
        self.space_pos = {int(r): i for i, r in enumerate(self.space_rows)}
        keys = self.df["types_key"].astype(str).to_numpy()
        self._key_by_idx = {tuple(int(x) for x in self.A[i]): keys[r] for i, r in enumerate(self.space_rows)}
        self.preset_keys = {keys[r] for r in self.preset_rows}
        self.keys = keys
        self.line = Line.from_presets(self.point(int(r)) for r in self.preset_rows)
        sp = self.space_rows
        self.ref_point = (float(self.bpw[sp].max()), float(self.ln_kld[sp].max()))
        self.hv_true = hypervolume([(self.bpw[r], self.ln_kld[r]) for r in sp], self.ref_point)
        both = [*sp, *self.preset_rows]
        self.hv_true_presets = hypervolume([(self.bpw[r], self.ln_kld[r]) for r in both], self.ref_point)
        self.hv_presets = hypervolume([(self.bpw[r], self.ln_kld[r]) for r in self.preset_rows], self.ref_point)
        vec = {str(int(r)): self.V[r] for r in self.preset_rows}
        self.wins = set()
        for r in sp:
            m = margin_to_line(self.V[r], float(self.bpw[r]), self.line, vec, self.per_window)
            if m is not None and m.below(ALPHA):
                self.wins.add(int(r))

    @property
    def per_window(self) -> int:
        return int(self.meta["scored_per_chunk"])

    @property
    def full_tokens(self) -> int:  # forward-pass tokens of one full run on the search windows (windows × ctx)
        return self.search_windows * int(self.meta["ctx"])

    @property
    def free(self) -> list[str]:
        return list(self.meta["free_groups"])

    @property
    def types(self) -> list[QuantType]:
        return [QuantType[t] for t in self.meta["space_types"]]

    def point(self, r: int) -> Point:
        return Point(float(self.bpw[r]), float(math.exp(self.ln_kld[r])), str(r))

    @cached_property
    def allocator_inputs(self) -> AllocatorInputs:
        """The allocator's inputs (its weight-error table computed once per truth, not once per run)."""
        return AllocatorInputs.of(self)

    def hv(self, rows) -> float:
        """Hypervolume of these rows as a fraction of the whole space's."""
        return hypervolume([(self.bpw[r], self.ln_kld[r]) for r in rows], self.ref_point) / self.hv_true

    def hv_with_presets(self, rows) -> float:
        """The same with the (free) presets added on both sides: what the user can choose from."""
        p = [*self.preset_rows]
        return hypervolume([(self.bpw[r], self.ln_kld[r]) for r in [*p, *rows]], self.ref_point) / self.hv_true_presets

    def row_of(self, idx) -> int:
        """The df row of a space config given as type indices per free group."""
        return self.row_of_key[self.key_of(idx)]

    def key_of(self, idx) -> str:
        return self._key_by_idx[tuple(int(i) for i in idx)]

    def fractions(self, r: int) -> dict:
        fr = self.df["fractions"].iloc[r]
        if isinstance(fr, str) and fr:
            return json.loads(fr)
        fixed = {g: {t: 1.0} for g, t in self.meta["fixed"].items()}
        return {**fixed, **{g: {self.types[int(i)].name: 1.0} for g, i in zip(self.free, self.A[self.space_pos[r]])}}

    @classmethod
    def load(cls, folder: str | Path = DEFAULT_TRUTH, model_path: Path | None = None) -> Truth:
        from mqpredict.records.identity import identify

        folder = Path(folder)
        if not (folder / "truth.csv").exists():
            raise InputError(f"{folder} holds no truth.csv", "make it with benchmarks/search_ground_truth.py")
        meta = json.loads((folder / "meta.json").read_text())
        df = pd.read_csv(folder / "truth.csv", keep_default_na=False, na_values={"kld_mean": [""]})
        with np.load(folder / "vectors.npz", allow_pickle=False) as z:
            V = z["kld"].astype(np.float64)
        if len(V) != len(df):
            raise InputError(f"{folder}: vectors.npz has {len(V)} rows, truth.csv {len(df)}")
        table = ErrorTable.load(folder / "error_table.json")
        path = model_path or _base_of(meta)
        model = ModelInfo.load(path)
        ident = identify(model)
        if ident.model_id != meta["model_id"]:
            raise InputError(f"{path} is model {ident.model_id}, the ground truth was measured on {meta['model_id']}",
                             "delete the cached model so that it is written again")  # fmt: skip
        keep = df["kld_mean"].notna().to_numpy()  # a partial truth: rows not measured yet are dropped
        if not keep.all():
            df, V = df[keep].reset_index(drop=True), V[keep]
            meta = {**meta, "complete": False}
        space = df["source"] == "space"
        space_rows = np.flatnonzero(space.to_numpy())
        preset_rows = np.flatnonzero((df["source"] == "preset").to_numpy())
        A = df.loc[space, [f"t_{g}" for g in meta["free_groups"]]].to_numpy(dtype=np.int64)
        kld = df["kld_mean"].to_numpy(dtype=float)
        t = cls(folder, meta, df, V, table, model, space_rows, A, preset_rows, df["bpw"].to_numpy(dtype=float),
                np.log(kld), df["size_bytes"].to_numpy(dtype=np.int64),
                dict(zip(df.loc[space, "types_key"], space_rows)))  # fmt: skip
        return t


def _base_of(meta: dict) -> Path:
    """The base the truth was measured on: the tiny model written from its seed, or an embedded base."""
    from mqpredict.util.paths import cache_dir

    base = meta.get("base") or {"kind": "testmodel", "seed": meta["model_seed"]}
    if base["kind"] == "embedded":
        from mqpredict.base.embedded import resolve_base

        return resolve_base(base["name"])
    from mqpredict.base.testmodel import write_test_model

    path = cache_dir() / "bench" / f"tiny-256-s{base['seed']}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_test_model(path, int(base["seed"]))
    return path


# ============================================================================ a method's run
@dataclass
class Event:
    row: int  # df row asked for
    complete: bool  # measured in full (False: stopped after the first stage, or a held-out re-confirmation)
    tokens: int  # forward-pass tokens spent
    heldout: bool = False  # a re-confirmation on the held-out windows (no new config)


@dataclass
class Run:
    method: str
    seed: int
    events: list[Event] = field(default_factory=list)
    stopped: str = ""
    seconds: float = 0.0


class Oracle:
    """Reveals measurements from the ground truth and keeps the books of one run."""

    def __init__(self, truth: Truth, max_confirm: int, max_tokens: int) -> None:
        self.t = truth
        self.max_confirm, self.max_tokens = max_confirm, max_tokens
        self.events: list[Event] = []
        self.tokens = 0
        self.known: set[str] = set(truth.preset_keys)  # the seeds: measured before any budget is spent
        self.full: list[int] = []  # space rows measured in full, in order
        self._full_keys: set[str] = set(truth.preset_keys)
        self._n_files = len(set(truth.keys))

    def done(self) -> bool:
        """Both budgets spent (confirmations and tokens), or every file known."""
        spent = len(self.events) >= self.max_confirm and self.tokens >= self.max_tokens
        return spent or len(self.known) >= self._n_files

    def is_known(self, r: int) -> bool:
        return self.t.keys[r] in self.known

    def measure(self, r: int) -> None:
        """A full run of space row ``r`` (nothing, and no charge, if its file is known)."""
        k = self.t.keys[r]
        if k in self.known:
            return
        self.known.add(k)
        self._full_keys.add(k)
        self.events.append(Event(int(r), True, self.t.full_tokens))
        self.tokens += self.t.full_tokens
        self.full.append(int(r))

    def stop_early(self, r: int, windows: int) -> None:
        """A staged run stopped after ``windows`` windows: one confirmation, its tokens, no full result."""
        self.known.add(self.t.keys[r])
        self.events.append(Event(int(r), False, windows * int(self.t.meta["ctx"])))
        self.tokens += windows * int(self.t.meta["ctx"])

    def reconfirm(self, r: int) -> None:
        """A held-out re-confirmation of a config measured in full: one confirmation, the held-out tokens."""
        tok = self.t.heldout_windows * int(self.t.meta["ctx"])
        self.events.append(Event(int(r), False, tok, heldout=True))
        self.tokens += tok

    def ln_kld(self, r: int) -> float:
        """ln KLD of a row whose file was measured in full (by this run, or a preset)."""
        if self.t.keys[r] not in self._full_keys:
            raise AssertionError(f"row {r} was not revealed")  # a method peeking at the truth
        return float(self.t.ln_kld[r])


# ============================================================================ baselines
def run_random(t: Truth, seed: int, o: Oracle) -> str:
    rng = np.random.default_rng(seed)
    for r in rng.permutation(t.space_rows):
        if o.done():
            return "budget spent"
        o.measure(int(r))
    return "space exhausted"


def run_greedy(t: Truth, seed: int, o: Oracle) -> str:
    rng = np.random.default_rng(seed)
    n_types = len(t.types)
    cur = np.full(len(t.free), n_types - 1)  # the cheapest: every free group at the last (lowest) type
    o.measure(t.row_of(cur))
    while True:
        ups = [j for j in range(len(cur)) if cur[j] > 0]
        if not ups:
            return "reached the top (all Q8_0)"
        best, best_gain = None, -math.inf
        r0 = t.row_of(cur)
        for j in rng.permutation(ups):
            nb = cur.copy()
            nb[j] -= 1
            r = t.row_of(nb)
            if not o.is_known(r):
                if o.done():
                    return "budget spent"
                o.measure(r)
            gain = (o.ln_kld(r0) - o.ln_kld(r)) / max(int(t.size[r] - t.size[r0]), 1)
            if gain > best_gain:
                best, best_gain = nb, gain
        cur = best


def _frontier_margin(t: Truth, o: Oracle, rows: list[int]) -> np.ndarray:
    from mqpredict.pareto import frontier, frontier_at

    pts = [t.point(int(r)) for r in t.preset_rows] + [t.point(r) for r in o.full]
    front = frontier(pts)
    b = t.bpw[rows]
    f = frontier_at(front, b)
    return np.where(np.isnan(f), 0.0, t.ln_kld[rows] - np.nan_to_num(f))


def run_evolutionary(t: Truth, seed: int, o: Oracle, tournament: int = 3, bands: int = 5) -> str:
    rng = np.random.default_rng(seed)
    n_types, n_g = len(t.types), len(t.free)
    for k in range(1, n_types):  # uniform starting points (all-Q8_0 is the Q8_0 preset's file: known)
        if o.done():
            return "budget spent"
        o.measure(t.row_of(np.full(n_g, k)))
    lo, hi = float(t.bpw[t.space_rows].min()), float(t.bpw[t.space_rows].max())
    top = t.row_of(np.zeros(n_g, dtype=np.int64))
    while not o.done():
        pop = list(dict.fromkeys(o.full + [top]))
        margin = dict(zip(pop, _frontier_margin(t, o, pop)))
        b = rng.integers(bands)
        a_lo, a_hi = lo + (hi - lo) * b / bands, lo + (hi - lo) * (b + 1) / bands
        inside = [r for r in pop if a_lo <= t.bpw[r] <= a_hi] or pop
        cand = [inside[i] for i in rng.choice(len(inside), size=min(tournament, len(inside)), replace=False)]
        parent = t.A[t.space_pos[min(cand, key=lambda r: margin[r])]]
        child_row = None
        for _ in range(100):
            c = parent.copy()
            if rng.random() < 0.5:  # EvoPress level switch: one group up a level, another down a level
                up = [j for j in range(n_g) if c[j] > 0]
                down = [j for j in range(n_g) if c[j] < n_types - 1]
                if up and down:
                    j = int(rng.choice(up))
                    down = [d for d in down if d != j]
                    if down:
                        c[j] -= 1
                        c[int(rng.choice(down))] += 1
            else:
                j = int(rng.integers(n_g))
                c[j] = min(n_types - 1, max(0, c[j] + (1 if rng.random() < 0.5 else -1)))
            r = t.row_of(c)
            if not o.is_known(r):
                child_row = r
                break
            parent = c  # a walk: keep mutating from the known child
        if child_row is None:
            unknown = [int(r) for r in t.space_rows if not o.is_known(int(r))]
            if not unknown:
                return "space exhausted"
            child_row = int(rng.choice(unknown))
        o.measure(child_row)
    return "budget spent"


def probe_indices(t: Truth) -> list[np.ndarray]:
    out = []
    for j in range(len(t.free)):
        for k in range(1, len(t.types)):
            a = np.zeros(len(t.free), dtype=np.int64)
            a[j] = k
            out.append(a)
    return out


def run_probes(t: Truth, seed: int, o: Oracle) -> str:
    rng = np.random.default_rng(seed)
    probes = probe_indices(t)
    for i in rng.permutation(len(probes)):
        if o.done():
            return "budget spent"
        o.measure(t.row_of(probes[i]))
    k_ref = math.exp(o.ln_kld(t.row_of(np.zeros(len(t.free), dtype=np.int64))))
    inc = np.zeros((len(t.free), len(t.types)))
    for a in probes:
        j = int(np.flatnonzero(a)[0])
        inc[j, a[j]] = math.exp(o.ln_kld(t.row_of(a))) - k_ref
    pred = k_ref + sum(inc[j, t.A[:, j]] for j in range(len(t.free)))
    ln_pred = np.log(np.maximum(pred, 1e-12))
    line = np.array([t.line.ln_kld_at(float(b)) for b in t.bpw[t.space_rows]], dtype=float)
    margin = np.where(np.isnan(line), np.inf, ln_pred - np.nan_to_num(line, nan=0.0))
    for i in np.argsort(margin, kind="stable"):
        if o.done():
            return "budget spent"
        o.measure(int(t.space_rows[i]))
    return "space exhausted"


@dataclass(frozen=True)
class AllocatorInputs:
    """What the allocator needs at the level of a truth's space: one type per group from the space's types
    (fixed groups at theirs), the imatrix the truth ships (errors weighted by it), its weight-error table."""

    allowed: dict[str, tuple[QuantType, ...]]
    types: tuple[QuantType, ...]
    imatrix: Imatrix | None
    table: ErrorTable

    @classmethod
    def of(cls, t: Truth) -> AllocatorInputs:
        from mqpredict.surrogate.weight_error import compute

        fixed = {g: (QuantType[q],) for g, q in t.meta["fixed"].items()}
        allowed = fixed | {g: tuple(t.types) for g in t.free}
        types = tuple(dict.fromkeys([*t.types, *(q for qs in fixed.values() for q in qs)]))
        im = None  # a truth measured with an imatrix ships it: the allocator weighs the errors by it
        if (t.folder / "imatrix.gguf").exists():
            im = Imatrix.load(t.folder / "imatrix.gguf")
        return cls(allowed, types, im, compute(t.model, t.meta["model_id"], im, types, threads=1))


def allocator_rows(t: Truth, sizes) -> list[int]:
    """The distinct space rows the allocator answers at the size targets ``sizes`` (bytes), at the level of
    the space (:class:`AllocatorInputs`, made once per truth)."""
    from mqpredict.quant.resolve import types_key
    from mqpredict.search.allocator import Target, allocate

    a_in = t.allocator_inputs
    rows: list[int] = []
    for s in sizes:
        a = allocate(t.model, a_in.table, Target(size_bytes=int(s)), a_in.types, a_in.imatrix, by="group",
                     allowed=a_in.allowed)  # fmt: skip
        r = t.row_of_key.get(types_key(t.model, a.types))
        if r is not None and int(r) not in rows:
            rows.append(int(r))
    return rows


def allocator_order(t: Truth) -> list[int]:
    """Space rows the allocator answers at evenly spaced size targets, in coverage order (see the module doc)."""
    sizes = t.size[t.space_rows]
    rows = allocator_rows(t, np.linspace(sizes.min(), sizes.max(), ALLOCATOR_TARGETS))
    b = t.bpw
    return _coverage(rows, b, float(b[t.space_rows].min()), float(b[t.space_rows].max()))


def warm_start_rows(t: Truth, budget: int, warm_start: int = -1) -> list[int]:
    """What a campaign of ``budget`` measures first (``CampaignSettings.n_warm_start``: a fifth of the budget,
    at most 4, or ``warm_start`` configs as ``campaign run --warm-start`` sets): the allocator's answers at that
    many sizes spread inside the presets' hull, here at the level of the space (a campaign's per-tensor answers
    are not files of the truth)."""
    from mqpredict.workflows.campaign import Settings

    k = Settings(budget=budget, warm_start=warm_start).n_warm_start()
    hull = [t.size[int(p.name)] for p in t.line.hull]
    if k <= 0 or len(hull) < 2:
        return []
    lo, hi = min(hull), max(hull)
    step = (hi - lo) / (k + 1)
    return allocator_rows(t, [lo + step * (i + 1) for i in range(k)])


def _coverage(items: list[int], b: np.ndarray, lo: float, hi: float) -> list[int]:
    """Farthest-point order in bpw (the top of the range is known: all-Q8_0 is a preset's file)."""
    picked: list[int] = []
    anchors = [hi]
    rest = list(items)
    while rest:
        d = [min(abs(b[i] - a) for a in anchors) for i in rest]
        k = int(np.argmax(d))
        picked.append(rest.pop(k))
        anchors.append(float(b[picked[-1]]))
    return picked


def run_allocator(t: Truth, seed: int, o: Oracle) -> str:
    for r in allocator_order(t):
        if o.done():
            return "budget spent"
        o.measure(r)
    return "every config the allocator returns is measured"


# ============================================================================ mqpredict
class MqPredict:
    """The campaign's :class:`~mqpredict.search.policy.Policy` run on the oracle (module docstring)."""

    def __init__(self, t: Truth, say: Callable[[str], None] | None = None, settings: PolicySettings = POLICY,
                 warm_start: int = -1) -> None:  # fmt: skip
        from mqpredict.search.policy import Learner
        from mqpredict.surrogate import service

        self.t = t
        self.say = say or (lambda s: None)
        self.settings = settings
        self.warm_start = warm_start  # the campaign's --warm-start (-1: its default, min(4, B/5))
        self.learner = Learner.without_family(t.meta["family"], t.meta["model_id"], t.table, service.DEFAULT_STORE,
                                              service.DEFAULT_TABLES, service.DEFAULT_SURROGATE)  # fmt: skip
        self.allowed = {g: (QuantType[q],) for g, q in t.meta["fixed"].items()} | {g: tuple(t.types) for g in t.free}
        self._records: dict[int, dict] = {}
        self.outside: list[str] = []

    def training(self) -> dict:
        """What the surrogate learns from besides the revealed records (for the benchmark's output)."""
        return self.learner.describe()

    # ------------------------------------------------------------------ the snapshot the policy decides on
    def _record(self, r: int, partial: bool = False) -> dict:
        """Row ``r`` as the store's record of its search-slice measurement (or of its first stage)."""
        if (r, partial) in self._records:
            return self._records[r, partial]
        t, m = self.t, self.t.meta
        row = t.df.iloc[r]
        win = self._stage_windows if partial else t.search_windows
        x = t.V[r][: win * t.per_window]
        rec = {**m["identity"], "key": f"r{r}" + ("p" if partial else ""), "types_key": t.keys[r],
               "corpus": m["corpus"], "ctx": m["ctx"], "n_batch": m["n_batch"], "chunk_offset": m["chunk_offset"],
               "n_chunks": win, "build": m["build"], "imatrix_id": m.get("imatrix_id"),
               "status": "partial" if partial else "ok", "config": row["config"], "fractions": t.fractions(r),
               "bpw": float(row["bpw"]), "size_bytes": int(row["size_bytes"]), "kld_mean": float(x.mean()),
               "kld_mean_err": float(x.std(ddof=1) / math.sqrt(len(x))), "kld_p99": float(np.quantile(x, 0.99)),
               "same_top_p": float(row["same_top_p"]),
               "source": "preset" if row["source"] == "preset" else "proposed"}  # fmt: skip
        self._records[r, partial] = rec
        return rec

    @property
    def _stage_windows(self) -> int:
        return max(1, round(self.t.search_windows * self.settings.stage_fraction))

    def snapshot(self, o: Oracle, stopped: list[int]):
        from mqpredict.search.snapshot import Snapshot

        t = self.t
        full = [int(r) for r in t.preset_rows] + list(o.full)
        ok = pd.DataFrame([self._record(r) for r in full])
        part = pd.DataFrame([self._record(r, True) for r in stopped])
        vectors = {f"r{r}": t.search_vec(r) for r in full}
        return Snapshot(ok, vectors, t.per_window, part, frozenset(o.known))

    # ------------------------------------------------------------------ one campaign of ``budget`` confirmations
    def run(self, seed: int, o: Oracle, budget: int) -> dict:
        from mqpredict.search.confirm import judge
        from mqpredict.search.policy import Policy, spread, told_from

        t = self.t
        st = dataclasses.replace(self.settings, budget=budget, seed=seed, reconfirm=t.heldout_windows >= 2)
        warm = tuple(Config.parse(t.df["config"].iloc[r]) for r in warm_start_rows(t, budget, self.warm_start))
        policy = Policy(t.model, t.table, self.learner, st, tuple(t.types), self.allowed, warm_start=warm)
        stopped: list[int] = []
        why = "budget spent"
        stage_tok = self._stage_windows * t.per_window
        while not o.done():
            snap = self.snapshot(o, stopped)
            room = budget - len(o.events) - policy.reserve(snap)
            if room <= 0:
                break
            props = policy.ask(snap, min(st.batch, room))
            self.outside = policy.outside_
            if not props:
                why = policy.stopped
                break
            ref = policy.reference(snap)
            told = []
            for p in props:
                if o.done():
                    break
                r = t.row_of_key.get(p.types_key)
                if r is None:  # a warm start outside the space (not in this truth): nothing to reveal
                    continue
                if p.source != "probe" and t.search_windows > self._stage_windows:
                    _m, reason = judge(t.V[r][:stage_tok], float(t.bpw[r]), ref)
                    if reason is not None:
                        o.stop_early(r, self._stage_windows)
                        stopped.append(r)
                        told.append(told_from(p.types_key, t.V[r][:stage_tok], t.per_window, False))
                        continue
                o.measure(r)
                told.append(told_from(p.types_key, t.search_vec(r), t.per_window, True))
            policy.tell(told)
        # re-confirm the candidate wins on the held-out windows, within what is left of the budget
        declared: list[int] = []
        if t.heldout_windows >= 2:
            snap = self.snapshot(o, stopped)
            cands = policy.candidate_wins(snap)
            bpw = {k: float(t.bpw[int(k[1:])]) for k, _ in cands}
            hvec = {str(int(r)): t.heldout_vec(int(r)) for r in t.preset_rows}
            hline = Line.from_presets(Point(float(t.bpw[r]), float(hvec[str(int(r))].mean()), str(int(r)))
                                      for r in t.preset_rows)  # fmt: skip
            tests = []
            for key, _m in spread(cands, bpw):
                if len(o.events) >= budget:
                    break
                r = int(key[1:])
                o.reconfirm(r)
                hm = margin_to_line(t.heldout_vec(r), float(t.bpw[r]), hline, hvec, t.per_window)
                if hm is not None:
                    tests.append((key, hm))
            declared = [int(k[1:]) for k in policy.reconfirmed(tests)]
        return {"stopped": why, "declared": declared}


# ============================================================================ scoring a run
def _prefix_conf(run: Run, b: int) -> list[Event]:
    return run.events[:b]


def _prefix_tokens(run: Run, budget_tokens: int, full: int) -> list[Event]:
    out, spent = [], 0
    for e in run.events:
        if spent + full > budget_tokens:  # a run starts only while a full one still fits
            break
        out.append(e)
        spent += e.tokens
    return out


def score(t: Truth, run: Run, budgets: list[int]) -> dict:
    full, bmax = t.full_tokens, max(budgets)
    hv_c = {b: t.hv([e.row for e in _prefix_conf(run, b) if e.complete]) for b in budgets}
    hv_p = {b: t.hv_with_presets([e.row for e in _prefix_conf(run, b) if e.complete]) for b in budgets}
    hv_t = {b: t.hv([e.row for e in _prefix_tokens(run, b * full, full) if e.complete]) for b in budgets}
    wins = {b: len({e.row for e in _prefix_conf(run, b) if e.complete and e.row in t.wins}) for b in budgets}
    first, first_tok, spent = None, None, 0
    for i, e in enumerate(run.events[:bmax]):
        spent += e.tokens
        if e.complete and e.row in t.wins:
            first, first_tok = i + 1, spent / full
            break
    return {"hv_conf": hv_c, "hv_tokens": hv_t, "hv_with_presets": hv_p, "wins_found": wins, "first_win_runs": first,
            "first_win_full_runs_of_tokens": first_tok, "n_runs": len(_prefix_conf(run, bmax)),
            "n_stopped_early": sum(not e.complete and not e.heldout for e in _prefix_conf(run, bmax)),
            "n_heldout": sum(e.heldout for e in _prefix_conf(run, bmax)),
            "n_runs_token_budget": len(_prefix_tokens(run, bmax * full, full)),
            "n_runs_simulated": len(run.events), "stopped": run.stopped, "seconds": run.seconds,
            "events": [[e.row, int(e.complete)] for e in run.events]}  # fmt: skip


# ============================================================================ the benchmark
RUNNERS = {"random": run_random, "greedy": run_greedy, "evolutionary": run_evolutionary, "probes": run_probes,
           "allocator": run_allocator}  # fmt: skip


HV_KEYS = ("hv_conf", "hv_tokens", "hv_with_presets", "wins_found")  # per-budget metrics


def simulate(t: Truth, method: str, seed: int, budgets: list[int], mq: MqPredict | None = None) -> dict:
    """One method, one seed → its scores at every budget (see the module docstring)."""
    bmax = max(budgets)
    if method != "mqpredict":
        o = Oracle(t, bmax, bmax * t.full_tokens)
        t0 = time.perf_counter()
        stopped = RUNNERS[method](t, seed, o)
        run = Run(method, seed, o.events, stopped, time.perf_counter() - t0)
        return score(t, run, budgets)
    mq = mq or MqPredict(t)
    merged: dict = {"declared_wins": {}, "false_wins": {}, "seconds": 0.0}
    for b in sorted(budgets):  # one campaign per budget
        o = Oracle(t, b, b * t.full_tokens)
        t0 = time.perf_counter()
        got = mq.run(seed, o, b)
        run = Run(method, seed, o.events, got["stopped"], time.perf_counter() - t0)
        sc = score(t, run, [b])
        for k in HV_KEYS:
            merged.setdefault(k, {})[b] = sc[k][b]
        merged["declared_wins"][b] = len(got["declared"])
        merged["false_wins"][b] = sum(r not in t.wins for r in got["declared"])
        merged["seconds"] += sc["seconds"]
        if b == bmax:
            merged.update({k: v for k, v in sc.items() if k not in (*HV_KEYS, "seconds")})
    return merged


def _agg(values: list[float | None]) -> dict:
    v = [x for x in values if x is not None]
    return {"mean": float(np.mean(v)) if v else None, "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 if v else None,
            "n": len(v), "of": len(values)}  # fmt: skip


def run(truth: Truth, methods: list[str], seeds: list[int], budgets: list[int],
        say: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    say = say or (lambda s: None)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise InputError(f"unknown method(s) {', '.join(bad)}", f"choose from {', '.join(METHODS)}")
    budgets = sorted(set(int(b) for b in budgets))
    two_pct = math.ceil(0.02 * len(truth.space_rows))
    per_budget = sorted(set(budgets) | {two_pct})  # 2% of the space: always reported (the issue's target)
    mq = MqPredict(truth, say) if "mqpredict" in methods else None
    raw: dict[str, list[dict]] = {}
    t_all = time.perf_counter()
    for m in methods:
        raw[m] = []
        for s in seeds:
            t0 = time.perf_counter()
            raw[m].append({"seed": s, **simulate(truth, m, s, per_budget, mq)})
            say(f"{m} seed {s}: {time.perf_counter() - t0:.1f} s · HV@{max(per_budget)} "
                f"{raw[m][-1]['hv_conf'][max(per_budget)]:.3f} · first win after {raw[m][-1]['first_win_runs']} runs")
    summary = {}
    for m, rs in raw.items():
        summary[m] = {
            **{k: {str(b): _agg([r[k][b] for r in rs]) for b in per_budget} for k in HV_KEYS},
            "first_win_runs": _agg([r["first_win_runs"] for r in rs]),
            "first_win_full_runs_of_tokens": _agg([r["first_win_full_runs_of_tokens"] for r in rs]),
            "n_runs": _agg([r["n_runs"] for r in rs]),
            "n_stopped_early": _agg([r["n_stopped_early"] for r in rs]),
            "n_runs_token_budget": _agg([r["n_runs_token_budget"] for r in rs]),
            "seconds": _agg([r["seconds"] for r in rs]),
        }
        if m == "mqpredict":
            dec = sum(sum(r["declared_wins"].values()) for r in rs)
            false = sum(sum(r["false_wins"].values()) for r in rs)
            summary[m]["declared_wins"] = {str(b): _agg([r["declared_wins"][b] for r in rs]) for b in per_budget}
            summary[m]["false_win_rate"] = {"false": false, "declared": dec, "rate": false / dec if dec else None,
                                            "over": f"every run: {len(rs)} seed(s) × {len(per_budget)} budget(s)"}  # fmt: skip
    for rs in raw.values():
        for r in rs:
            for k in (*HV_KEYS, "declared_wins", "false_wins"):
                if k in r:
                    r[k] = {str(b): v for b, v in r[k].items()}
    return {
        "truth": {"folder": str(truth.folder), "model_id": truth.meta["model_id"], "family": truth.meta["family"],
                  "n_space": int(len(truth.space_rows)), "n_presets": int(len(truth.preset_rows)),
                  "n_true_wins": len(truth.wins), "hv_true": truth.hv_true,
                  "hv_true_with_presets": truth.hv_true_presets, "hv_presets_alone": truth.hv_presets, "reference_point": list(truth.ref_point),
                  "full_run_tokens": truth.full_tokens, "two_percent_budget": two_pct,
                  "complete": truth.complete, "search_windows": truth.search_windows,
                  "heldout_windows": truth.heldout_windows, "imatrix_id": truth.meta.get("imatrix_id"),
                  "probes_outside_range": mq.outside if mq else None},  # fmt: skip
        "surrogate_training": mq.training() if mq else None,
        "settings": {"methods": methods, "seeds": seeds, "budgets": budgets,
                     "policy": {k: (v.value if hasattr(v, "value") else v)
                                for k, v in dataclasses.asdict(mq.settings if mq else POLICY).items()}},  # fmt: skip
        "summary": summary,
        "runs": raw,
        "seconds": time.perf_counter() - t_all,
    }


def _cell(a: dict, digits: int = 3) -> str:
    if a["mean"] is None:
        return "—"
    s = f"{a['mean']:.{digits}f} ± {a['std']:.{digits}f}"
    return s if a["n"] == a["of"] else f"{s} ({a['n']}/{a['of']})"


def markdown(res: dict) -> str:
    tr, st, sm = res["truth"], res["settings"], res["summary"]
    bs = sorted({int(b) for m in sm.values() for b in m["hv_conf"]})
    head = "| method | " + " | ".join(f"B={b}" for b in bs)
    rule = "|---|" + "---:|" * len(bs)
    lines = [
        f"Ground truth `{tr['folder']}`{'' if tr['complete'] else ' (**incomplete**: only the configs measured so far)'}: "
        f"{tr['n_space']} space configs (distinct files) + {tr['n_presets']} presets "
        f"(free seeds); {tr['n_true_wins']} true nonlinear wins (significantly below the presets' line at "
        f"{st['policy']['alpha']:g}, paired t over all {tr['search_windows'] + tr['heldout_windows']} windows); searches "
        f"confirm on {tr['search_windows']} windows, re-confirm on {tr['heldout_windows']} held out. HV in (bpw, ln KLD) with reference point "
        f"({tr['reference_point'][0]:.3f}, {tr['reference_point'][1]:.3f}) = (max bpw, max ln KLD) of the space; "
        f"2% of the space = {tr['two_percent_budget']} runs. {len(st['seeds'])} seeds: mean ± std.",
        "",
        "**Fraction of the space's true Pareto hypervolume, by confirmations (B runs; a stopped run counts one)**",
        "",
        head + f" | runs to 1st true win | true wins found (B={bs[-1]}) | stopped early (of {bs[-1]}) |",
        rule + "---:|---:|---:|",
    ]
    for m, a in sm.items():
        lines.append(f"| {m} | " + " | ".join(_cell(a["hv_conf"][str(b)]) for b in bs)
                     + f" | {_cell(a['first_win_runs'], 1)} | {_cell(a['wins_found'][str(bs[-1])], 1)} "
                     f"| {a['n_stopped_early']['mean']:.1f} |")  # fmt: skip
    lines += [
        "",
        f"**The same, by forward-pass tokens (B × {tr['full_run_tokens']} tokens = B full runs; a run stopped after "
        "its first stage costs a quarter)**",
        "",
        head + " | full runs' tokens to 1st true win | runs made at B max |",
        rule + "---:|---:|",
    ]
    for m, a in sm.items():
        lines.append(f"| {m} | " + " | ".join(_cell(a["hv_tokens"][str(b)]) for b in bs)
                     + f" | {_cell(a['first_win_full_runs_of_tokens'], 1)} | {a['n_runs_token_budget']['mean']:.0f} |")
    lines += [
        "",
        f"**With the presets on both sides (what a user can choose from): HV(presets ∪ found) / HV(presets ∪ space); "
        f"the presets alone give {tr['hv_presets_alone'] / tr['hv_true_with_presets']:.3f}**",
        "",
        head + " | s per seed |",
        rule + "---:|",
    ]
    for m, a in sm.items():
        lines.append(f"| {m} | " + " | ".join(_cell(a["hv_with_presets"][str(b)]) for b in bs)
                     + f" | {a['seconds']['mean']:.1f} |")
    lines += ["", "(k/n): only k of n seeds found a true win within the largest budget; the mean is over those k."]
    fw = sm.get("mqpredict", {}).get("false_win_rate")
    if fw:
        rate = "—" if fw["rate"] is None else f"{fw['rate']:.3f}"
        lines += ["", f"**mqpredict's declared wins** (re-confirmed on the held-out windows, Holm): "
                  + ", ".join(f"B={b}: {_cell(sm['mqpredict']['declared_wins'][str(b)], 1)}" for b in bs)
                  + f"; false wins {fw['false']} of {fw['declared']} declared (rate {rate}; {fw['over']})."]
    return "\n".join(lines)
