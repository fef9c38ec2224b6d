"""Benchmark: how fast each search method finds the Pareto front of an exhaustively measured space.

The ground truth (``datasets/ground_truth/tiny256-s0``, made by ``benchmarks/search_ground_truth.py``)
holds every config of one tiny model's reduced space (embeddings at Q8_0, six groups × Q8_0/Q6_K/Q4_K/
Q3_K = 4096 distinct files) and the 16 seed presets, each measured once on the same 8 windows of 128
tokens, with its per-token KLD vector. A search here is a **simulation**: an oracle reveals a config's
measurement from the table when a method asks for it; llama.cpp never runs. Every method starts with
the presets measured (seeds, free, as in a campaign) and spends its budget on space configs; a config
already revealed (or the same file as a preset) is never charged twice.

Methods (each given a seed):

* ``mqpredict`` — the campaign's loop (:mod:`mqpredict.workflows.campaign`): the surrogate is refitted
  before every batch of 4 on the shipped dataset **without the family** ``synthetic-tiny-256`` plus the
  records revealed so far (checked: that family never enters training), the real :class:`Proposer`
  asks by expected improvement below the frontier, ``probes=auto`` decides on isolation probes first,
  and it stops when no candidate's EI reaches the campaign's threshold. Proposals are confirmed in
  stages as :func:`mqpredict.search.confirm.confirm` does: the first 2 of the 8 windows are judged
  (:func:`~mqpredict.search.confirm.judge`, paired, z = 2) and a config that cannot win stops there
  (a partial record: one confirmation, a quarter of the tokens, not a found config). Differences from
  a real campaign: no held-out slice (the ground truth has none), so no budget is reserved for
  re-confirmation; the surrogate uses the default model's hyper-parameters with ``seed`` = the run's
  seed (the only source of run-to-run spread: the space is small enough to be scored exhaustively)
  and one LightGBM thread (deterministic, identical results, much faster on a shared machine).
* ``random`` — space configs in a seeded random order.
* ``greedy`` — from the cheapest config (all Q3_K), measure every one-step upgrade of one group
  (Q3_K→Q4_K→Q6_K→Q8_0), move to the one with the best −Δln KLD / Δbytes, repeat until all Q8_0
  (the seed shuffles the order inside a step, which matters only when the budget ends mid-step).
* ``evolutionary`` — EvoPress-style search on real measurements: a population of everything measured,
  parents chosen by tournament (3) on the margin to the measured frontier inside a random fifth of the
  size range (crowding: every size keeps being explored), children by EvoPress's level switch (one
  group one level up, another one level down) or a single-group ±1 level mutation; started from the
  uniform configs.
* ``probes`` — the 18 isolation probes (one group changed on all-Q8_0) in seeded order, then every
  config predicted additively (KLD = KLD_Q8_0 + Σ probe increments) and measured in order of predicted
  margin to the presets' line, most negative first.
* ``weight-error`` — no KLD run to choose: configs ranked by share-weighted weight error (the
  model's :class:`ErrorTable`) along size; the predicted front (then the next non-dominated layers)
  is measured in coverage order (farthest point in bpw first), which approximates allocating the
  weight error to evenly spaced size targets for any budget. Deterministic: its spread is zero.

Metrics, for each method and seed (then mean and standard deviation over seeds):

* **HV fraction** — hypervolume, in (bpw, ln KLD), both minimised, of the space configs the method
  measured in full, divided by that of the whole space. Reference point: (max bpw, max ln KLD) over the
  space (all-Q8_0's bpw, all-Q3_K-ish KLD), so every space config counts; presets are not counted
  (they are not in the space and would push the fraction above 1). At budgets of B confirmations
  (every run counts one, stopped-early ones included) and of B × the forward-pass tokens of one full run
  (8 windows × 128), where a stopped run costs a quarter: a run is started only while a full one still
  fits in the tokens left.
* **HV fraction with the presets** — HV(presets ∪ found) / HV(presets ∪ space), same reference point:
  what a user can choose from. mqpredict's staged confirmations stop configs that are above the
  presets' line on purpose (a preset is better there), so the space-only fraction undercounts what it
  is built for; this one does not.
* **True wins found** — distinct true nonlinear wins (below) measured in full within B confirmations.
* **Runs to the first true nonlinear win** — confirmations until the method first measures in full a
  space config whose **ground-truth** paired margin to the presets' line (all 8 windows, per-window
  errors) is below zero by more than 2 paired errors; censored at the largest budget.

Each method runs once per seed up to the largest budget and the smaller budgets are prefixes of that
run (for mqpredict one run per probe decision, which depends on the budget; a campaign with a smaller
budget would differ only in how its last batch of 4 is cut).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mqpredict.errors import InputError
from mqpredict.quant.config import Config
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.types import QuantType
from mqpredict.workflows.campaign import Settings
from mqpredict.pareto import Line, Point, hypervolume
from mqpredict.search.paired import margin_to_line
from mqpredict.surrogate.weight_error import ErrorTable
from mqpredict.util.paths import DATASETS

DEFAULT_TRUTH = DATASETS / "ground_truth" / "tiny256-s0"
METHODS = ("mqpredict", "random", "greedy", "evolutionary", "probes", "weight-error")
BUDGETS = (10, 20, 50, 100)
STAGE_WINDOWS = 2  # first stage of a staged confirmation: 2 of the 8 windows (the campaign's 0.25)
Z = Settings.z


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
            if m is not None and m.below(Z):
                self.wins.add(int(r))

    @property
    def per_window(self) -> int:
        return int(self.meta["scored_per_chunk"])

    @property
    def full_tokens(self) -> int:  # forward-pass tokens of one full run (windows × ctx)
        return int(self.meta["n_chunks"]) * int(self.meta["ctx"])

    @property
    def free(self) -> list[str]:
        return list(self.meta["free_groups"])

    @property
    def types(self) -> list[QuantType]:
        return [QuantType[t] for t in self.meta["space_types"]]

    def point(self, r: int) -> Point:
        return Point(float(self.bpw[r]), float(math.exp(self.ln_kld[r])), str(r))

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
        from mqpredict.base.testmodel import write_test_model
        from mqpredict.records.identity import identify
        from mqpredict.util.paths import cache_dir

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
        path = model_path or cache_dir() / "bench" / f"tiny-256-s{meta['model_seed']}.gguf"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_test_model(path, int(meta["model_seed"]))
        model = ModelInfo.load(path)
        ident = identify(model)
        if ident.model_id != meta["model_id"]:
            raise InputError(f"{path} is model {ident.model_id}, the ground truth was measured on {meta['model_id']}",
                             "delete the cached model so that it is written again")  # fmt: skip
        space = df["source"] == "space"
        space_rows = np.flatnonzero(space.to_numpy())
        preset_rows = np.flatnonzero((df["source"] == "preset").to_numpy())
        A = df.loc[space, [f"t_{g}" for g in meta["free_groups"]]].to_numpy(dtype=np.int64)
        kld = df["kld_mean"].to_numpy(dtype=float)
        t = cls(folder, meta, df, V, table, model, space_rows, A, preset_rows, df["bpw"].to_numpy(dtype=float),
                np.log(kld), df["size_bytes"].to_numpy(dtype=np.int64),
                dict(zip(df.loc[space, "types_key"], space_rows)))  # fmt: skip
        return t


# ============================================================================ a method's run
@dataclass
class Event:
    row: int  # df row asked for
    complete: bool  # measured in full (False: stopped after the first stage)
    tokens: int  # forward-pass tokens spent


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


def weight_error_order(t: Truth) -> list[int]:
    """Space rows: non-dominated layers in (bpw, share-weighted weight error), each in coverage order."""
    tb = t.table
    werr = np.zeros(len(t.space_rows))
    for g, fr in t.meta["fixed"].items():
        werr += tb.shares[g] * tb.mse(g, fr)
    for j, g in enumerate(t.free):
        werr += tb.shares[g] * np.array([tb.mse(g, q.name) for q in t.types])[t.A[:, j]]
    b = t.bpw[t.space_rows]
    left = np.arange(len(b))
    lo, hi = float(b.min()), float(b.max())
    order: list[int] = []
    while len(left):
        idx = left[np.lexsort((werr[left], b[left]))]
        front, best = [], math.inf
        for i in idx:  # Pareto front in (bpw, werr)
            if werr[i] < best:
                front.append(i)
                best = werr[i]
        order += _coverage(list(front), b, lo, hi)
        left = np.setdiff1d(left, front)
    return [int(t.space_rows[i]) for i in order]


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


def run_weight_error(t: Truth, seed: int, o: Oracle) -> str:
    for r in weight_error_order(t):
        if o.done():
            return "budget spent"
        o.measure(r)
    return "space exhausted"


# ============================================================================ mqpredict
class MqSearch:
    """The campaign's loop on the oracle (see the module docstring for what differs)."""

    def __init__(self, t: Truth, say: Callable[[str], None] | None = None) -> None:
        from mqpredict.records.store import Store
        from mqpredict.search.space import DEFAULT_TYPES
        from mqpredict.surrogate import service
        from mqpredict.surrogate.data import load_tables

        self.t = t
        self.say = say or (lambda s: None)
        fam = t.meta["family"]
        shipped = Store(service.DEFAULT_STORE, create=False).load()
        self.shipped = shipped[shipped["family"] != fam].reset_index(drop=True)
        if fam in set(self.shipped["family"]) or t.meta["model_id"] in set(self.shipped["model_id"]):
            raise InputError(f"the surrogate would learn from {fam}'s shipped records")  # never
        self.tables = load_tables(service.DEFAULT_TABLES)
        self.tables[t.meta["model_id"]] = t.table
        meta = service.DEFAULT_SURROGATE / "metadata.json"
        self.params = json.loads(meta.read_text()).get("params", {}) if meta.exists() else {}
        self.params["n_jobs"] = 1
        self.allowed = {g: (QuantType[q],) for g, q in t.meta["fixed"].items()} | {g: tuple(t.types) for g in t.free}
        self.default_types = DEFAULT_TYPES
        self._records_cache: dict[int, dict] = {}
        self.settings = Settings()
        self._probe_decision: bool | None = None
        self._outside: list[str] = []

    def training(self) -> dict:
        """What the surrogate learns from besides the revealed records (for the benchmark's output)."""
        import hashlib

        keys = "\n".join(sorted(self.shipped["key"]))
        return {"shipped_records": int(len(self.shipped)), "families": sorted(set(self.shipped["family"])),
                "excluded_family": self.t.meta["family"], "keys_sha256": hashlib.sha256(keys.encode()).hexdigest()[:16],
                "params": self.params}  # fmt: skip

    # ------------------------------------------------------------------ records the surrogate learns from
    def _record(self, r: int) -> dict:
        if r in self._records_cache:
            return self._records_cache[r]
        t, m = self.t, self.t.meta
        row = t.df.iloc[r]
        rec = {**m["identity"], "corpus": m["corpus"], "ctx": m["ctx"], "n_batch": m["n_batch"],
               "chunk_offset": m["chunk_offset"], "n_chunks": m["n_chunks"], "build": m["build"],
               "status": "ok", "config": row["config"], "fractions": t.fractions(r), "bpw": float(row["bpw"]),
               "size_bytes": int(row["size_bytes"]), "kld_mean": float(row["kld_mean"]),
               "kld_mean_err": float(row["kld_mean_err"]), "kld_p99": float(row["kld_p99"]),
               "same_top_p": float(row["same_top_p"]),
               "source": "preset" if row["source"] == "preset" else "proposed"}  # fmt: skip
        self._records_cache[r] = rec
        return rec

    def fit(self, full_rows: list[int], seed: int):
        from mqpredict.surrogate.data import build
        from mqpredict.surrogate.model import Surrogate

        own = pd.DataFrame([self._record(int(r)) for r in [*self.t.preset_rows, *full_rows]])
        recs = pd.concat([self.shipped, own], ignore_index=True)
        data = build(recs, self.tables)
        s = Surrogate(**{**self.params, "seed": seed}).fit(data)
        if set(data.rows.loc[data.rows["family"] == self.t.meta["family"], "config"]) - set(own["config"]):
            raise InputError("the surrogate learnt from ground-truth rows the search has not revealed")  # never
        return s

    def uses_probes(self, budget: int) -> bool:
        """``probes=auto``: probes first iff the model is outside the surrogate's range and they fit budget // 3."""
        if self._probe_decision is None:
            from mqpredict.surrogate import features as F
            from mqpredict.surrogate.service import score_configs

            s = self.fit([], 0)
            x = score_configs(self.t.model, self.t.table, [Config.parse("default=Q8_0")])[0].features
            self._outside = s.out_of_range(F.matrix([x]))[0]
            self._probe_decision = bool(self._outside)
        return self._probe_decision and len(probe_indices(self.t)) <= budget // 3

    # ------------------------------------------------------------------ the loop
    def run(self, seed: int, o: Oracle, budget: int) -> str:
        from mqpredict.pareto import frontier
        from mqpredict.search.confirm import Reference, judge
        from mqpredict.search.proposer import Proposer

        t, cfg = self.t, self.settings
        proposer = Proposer(t.model, t.table, tuple(t.types), seed=seed, allowed=self.allowed)
        ln_ref = float(t.ln_kld[t.row_of(np.zeros(len(t.free), dtype=np.int64))])
        predictions: dict[int, float] = {}  # row → predicted ln KLD
        first = True
        while not o.done():
            ok_rows = [int(r) for r in t.preset_rows] + list(o.full)
            ref = Reference(t.line, {str(r): t.V[r] for r in ok_rows}, [(float(t.bpw[r]), str(r)) for r in ok_rows],
                            t.per_window)  # fmt: skip
            s = self.fit(o.full, seed)
            hw = float(s.halfwidth_[0])
            res = [abs(t.ln_kld[r] - p) for r, p in predictions.items() if r in o.full]
            if len(res) >= 3:
                hw = max(hw, float(np.quantile(res, s.coverage)))
            if first and self.uses_probes(budget):
                first = False
                self.say(f"  mqpredict: outside the surrogate's range ({'; '.join(self._outside)}): probes first")
                for a in probe_indices(t):
                    if o.done():
                        break
                    o.measure(t.row_of(a))
                continue
            first = False
            front = frontier([t.point(r) for r in ok_rows])
            measured = set(o.known)
            props = proposer.ask(cfg.batch, s, ln_ref, hw, front, measured, s.coverage)
            if not props or max(p.ei for p in props) < cfg.ei_threshold:
                return "no candidate is expected to improve the frontier by more than the threshold"
            for p in props:
                if o.done():
                    break
                r = t.row_of_key[p.types_key]
                predictions[r] = math.log(p.kld_pred)
                x1 = t.V[r][: STAGE_WINDOWS * t.per_window]
                _m, reason = judge(x1, float(t.bpw[r]), ref, cfg.z)
                if reason is not None:
                    o.stop_early(r, STAGE_WINDOWS)
                else:
                    o.measure(r)
        return "budget spent"


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
            "n_stopped_early": sum(not e.complete for e in _prefix_conf(run, bmax)),
            "n_runs_token_budget": len(_prefix_tokens(run, bmax * full, full)),
            "n_runs_simulated": len(run.events), "stopped": run.stopped, "seconds": run.seconds,
            "events": [[e.row, int(e.complete)] for e in run.events]}  # fmt: skip


# ============================================================================ the benchmark
RUNNERS = {"random": run_random, "greedy": run_greedy, "evolutionary": run_evolutionary, "probes": run_probes,
           "weight-error": run_weight_error}  # fmt: skip


HV_KEYS = ("hv_conf", "hv_tokens", "hv_with_presets", "wins_found")  # per-budget metrics


def simulate(t: Truth, method: str, seed: int, budgets: list[int], mq: MqSearch | None = None) -> dict:
    """One method, one seed → its scores at every budget (see the module docstring)."""
    bmax = max(budgets)
    if method != "mqpredict":
        o = Oracle(t, bmax, bmax * t.full_tokens)
        t0 = time.perf_counter()
        stopped = RUNNERS[method](t, seed, o)
        run = Run(method, seed, o.events, stopped, time.perf_counter() - t0)
        return score(t, run, budgets)
    mq = mq or MqSearch(t)
    groups: dict[bool, list[int]] = {}
    for b in budgets:
        groups.setdefault(mq.uses_probes(b), []).append(b)
    merged: dict = {}
    for _probes, bs in sorted(groups.items()):
        o = Oracle(t, max(bs), max(bs) * t.full_tokens)
        t0 = time.perf_counter()
        stopped = mq.run(seed, o, max(bs))
        run = Run(method, seed, o.events, stopped, time.perf_counter() - t0)
        sc = score(t, run, bs)
        if not merged or max(bs) == bmax:
            merged = {**sc, **{k: {**merged.get(k, {}), **sc[k]} for k in HV_KEYS},
                      "seconds": merged.get("seconds", 0.0) + sc["seconds"]}  # fmt: skip
        else:
            for k in HV_KEYS:
                merged[k].update(sc[k])
            merged["seconds"] += sc["seconds"]
    merged["probes_used"] = {str(b): mq.uses_probes(b) for b in budgets}
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
    per_budget = sorted(set(budgets) | ({two_pct} if two_pct <= max(budgets) else set()))
    mq = MqSearch(truth, say) if "mqpredict" in methods else None
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
    for rs in raw.values():
        for r in rs:
            for k in HV_KEYS:
                r[k] = {str(b): v for b, v in r[k].items()}
    return {
        "truth": {"folder": str(truth.folder), "model_id": truth.meta["model_id"], "family": truth.meta["family"],
                  "n_space": int(len(truth.space_rows)), "n_presets": int(len(truth.preset_rows)),
                  "n_true_wins": len(truth.wins), "hv_true": truth.hv_true,
                  "hv_true_with_presets": truth.hv_true_presets, "hv_presets_alone": truth.hv_presets, "reference_point": list(truth.ref_point),
                  "full_run_tokens": truth.full_tokens, "two_percent_budget": two_pct,
                  "probes_outside_range": mq._outside if mq else None},  # fmt: skip
        "surrogate_training": mq.training() if mq else None,
        "settings": {"methods": methods, "seeds": seeds, "budgets": budgets, "z": Z, "stage_windows": STAGE_WINDOWS,
                     "batch": Settings.batch, "ei_threshold": Settings.ei_threshold},  # fmt: skip
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
        f"Ground truth `{tr['folder']}`: {tr['n_space']} space configs (distinct files) + {tr['n_presets']} presets "
        f"(free seeds); {tr['n_true_wins']} true nonlinear wins (ground-truth paired margin below the presets' line by "
        f"> {st['z']:g} errors on all 8 windows). HV in (bpw, ln KLD) with reference point "
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
    return "\n".join(lines)
