"""The campaign: seed → ask the policy → confirm for real → record → tell, until the budget is spent.

A campaign is three things: the search :class:`~mqpredict.search.policy.Policy` (every decision: what
to propose, when a staged confirmation stops, which configs are wins), a scheduler (the
:class:`~mqpredict.execute.executor.Executor` the jobs run on) and a recorder (the records store, MLflow,
the console). ``bench search`` runs the same policy against a ground truth's oracle.

One campaign works on one base model, one corpus and one **search slice** of it (``ctx`` × ``n_chunks``
windows); a second slice of the same size right after it is **held out** and used only to re-confirm
survivors. Its folder (``--out``) holds ``campaign.json`` (what it is: base, corpus, slices, settings, an
id), ``predictions.jsonl`` and ``batches.jsonl`` (every batch asked, written before any of it runs);
everything measured lives in the records store, appended as soon as it is measured. So ``resume`` is
simply running again: seeds already there are skipped, the spent budget is counted from the store
(records tagged with the campaign id), a batch a killed process had started is finished as it was asked
(same configs, same steps, judged against the same records) before anything new is asked, and a config
already measured is never proposed again — a campaign killed any number of times ends with the records
of one never interrupted (``mqpredict bench faults`` checks it). The surrogate is refitted before every
batch on the shipped dataset *without the model's family* plus this campaign's own records of the model.

Wins: a config is a **candidate win** when its paired margin to the line on the search slice is
significantly below zero (window-block error, one-sided t test at ``alpha``); it becomes a **nonlinear
win** when the same holds on the held-out slice, against the line of the same presets measured there,
with Holm's correction over the candidates re-confirmed (winning the best of many candidates picks up
noise; the held-out slice does not). Held-out re-measurements count against the budget: budget is every
run the campaign spends beyond seeds.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path

import numpy as np
import pandas as pd

from mqpredict.errors import InputError
from mqpredict.execute.executor import Executor, LocalExecutor
from mqpredict.execute.job import Job, JobResult
from mqpredict.llama.engine import Engine, load_scores
from mqpredict.measure.corpus import EvalSpec, Scoring
from mqpredict.pareto import Line, Point, hypervolume
from mqpredict.quant.config import Config
from mqpredict.quant.types import QuantType
from mqpredict.records.context import Context
from mqpredict.records.convert import Provenance, failed, from_measurement
from mqpredict.records.identity import ModelIdentity, identify
from mqpredict.records.schema import Source, Status
from mqpredict.records.store import Store
from mqpredict.search.confirm import Outcome, Reference, confirm, stage_specs
from mqpredict.search.paired import Paired, holm, margin_to_line
from mqpredict.search.policy import Learner, Policy, PolicySettings, Probes, spread, told_from
from mqpredict.search.proposer import Proposal
from mqpredict.search.snapshot import Snapshot
from mqpredict.search.space import DEFAULT_TYPES
from mqpredict.tracking import Tracker
from mqpredict.util import faults
from mqpredict.workflows.seed import Candidate, pick_presets, preset_candidates, seed
from mqpredict.util.atomic import atomic_write_text

STATE = "campaign.json"
PREDICTIONS = "predictions.jsonl"
BATCHES = "batches.jsonl"  # one line per batch asked, written whole before any of its jobs is submitted
CAMPAIGN_PREFIX = "campaign:"  # provenance_file of the records a campaign measures: campaign:<id>


@dataclass(frozen=True)
class Settings:
    budget: int = 20
    batch: int = 4
    stage_fraction: float = 0.25  # first stage of a confirmation: this share of the search slice
    alpha: float = 0.05  # one-sided level of every paired test (Bonferroni/Holm where several are made)
    stop_share: float = 1e-4  # stop when no candidate's EHVI reaches this share of the front's hypervolume
    probes: Probes = Probes.auto
    types: tuple[str, ...] = tuple(t.name for t in DEFAULT_TYPES)
    seed: int = 0
    max_heldout: int = 0  # re-confirmations kept in reserve (0: PolicySettings.reserve's default, an eighth)
    #: the zero-run allocator's configs measured first (a warm start, and the answer to beat), spread over the
    #: presets' sizes; -1: a fifth of the budget, at most 4
    warm_start: int = -1
    #: the seed line's presets (empty: every preset a seed measures here); Q8_0, the reference, is always one
    presets: tuple[str, ...] = ()
    #: a first stage above the presets' line stops the run (only wins measured in full); default: only a dominated one
    stop_at_line: bool = False

    def n_warm_start(self) -> int:
        return min(4, self.budget // 5) if self.warm_start < 0 else self.warm_start

    def policy(self) -> PolicySettings:
        return PolicySettings(self.budget, self.batch, self.stage_fraction, self.alpha, self.stop_share, self.probes,
                              self.seed, self.max_heldout, stop_above_line=self.stop_at_line)  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> Settings:
        """Settings from ``campaign.json`` (one written before ``alpha`` had ``z``: the same one-sided level)."""
        from scipy.stats import norm

        d = dict(d)
        if "z" in d and "alpha" not in d:
            d["alpha"] = float(norm.sf(d["z"]))
        d["probes"] = Probes(d["probes"])
        d["types"] = tuple(d["types"])
        d["presets"] = tuple(d.get("presets", ()))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class State:
    """``campaign.json``: enough to resume, and to know what the campaign was."""

    id: str
    base: str  # path of the base GGUF
    corpus: str  # corpus id
    corpus_path: str
    engine: str  # engine name (inprocess / tools)
    ctx: int
    n_chunks: int
    chunk_offset: int
    model_id: str
    family: str
    settings: Settings
    created: str
    imatrix: str = ""  # the importance matrix every build is quantized with ("" : none)
    imatrix_id: str = ""
    scoring: str = Scoring.windows.value  # campaigns started before the scoring mode existed scored windows

    @property
    def search(self) -> EvalSpec:
        return EvalSpec(self.ctx, self.n_chunks, self.chunk_offset, scoring=Scoring(self.scoring))

    @property
    def heldout(self) -> EvalSpec:
        return self.search.part(self.chunk_offset + self.n_chunks, self.n_chunks)

    @property
    def tag(self) -> str:
        return CAMPAIGN_PREFIX + self.id

    def save(self, out: Path) -> None:
        d = asdict(self)
        d["settings"]["probes"] = self.settings.probes.value
        atomic_write_text(out / STATE, json.dumps(d, indent=2) + "\n")

    def differences(self, asked: State) -> list[str]:
        """What ``asked`` (a new ``campaign run``) sets otherwise than this campaign, one phrase each
        (``budget 20 in the folder, 6 asked``); paths of the same content and the id do not count."""
        mine = {**{f.name: getattr(self, f.name) for f in fields(self) if f.name not in _SAME_CAMPAIGN_ANYWAY},
                **{f.name: getattr(self.settings, f.name) for f in fields(self.settings)}}  # fmt: skip
        theirs = {**{f.name: getattr(asked, f.name) for f in fields(asked) if f.name not in _SAME_CAMPAIGN_ANYWAY},
                  **{f.name: getattr(asked.settings, f.name) for f in fields(asked.settings)}}  # fmt: skip
        out = []
        for k, v in mine.items():
            if theirs.get(k) != v:
                if k == "model_id":
                    v, w = f"{Path(self.base).name} ({v[:12]})", f"{Path(asked.base).name} ({theirs[k][:12]})"
                else:
                    v, w = _shown(v), _shown(theirs.get(k))
                out.append(f"{_OPTION.get(k, k)} {v} in the folder, {w} asked")
        return out

    @classmethod
    def load(cls, out: Path) -> State:
        p = out / STATE
        if not p.exists():
            raise InputError(f"{out} holds no {STATE}", "give the --out folder of a campaign started with 'campaign run'")
        try:
            d = json.loads(p.read_text())
            return cls(settings=Settings.from_json(d.pop("settings")), **d)
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{p} is not a campaign state file ({e})", "start a new campaign with 'campaign run'") from e


#: sizes at which the allocator's answers join EHVI's candidates (spread evenly over the presets' range)
ALLOCATOR_CANDIDATES = 24
_SOURCE = {"probe": Source.probe, "warm-start": Source.allocator, "allocator": Source.allocator}  # a proposal's source → its records'
#: State fields that do not make two campaigns different: identity, creation time, and paths whose content
#: is checked by id (base → model_id, corpus → corpus id, imatrix → imatrix_id)
_SAME_CAMPAIGN_ANYWAY = frozenset({"id", "created", "base", "corpus_path", "imatrix", "family", "settings"})
#: how the user sets each field (campaign run's options)
_OPTION = {"model_id": "base", "n_chunks": "slice (--tokens/--ctx windows)", "chunk_offset": "slice offset",
           "imatrix_id": "imatrix", "scoring": "scoring", "stage_fraction": "stage", "max_heldout": "held-out reserve",
           "presets": "seed presets (--only)",
           "stop_at_line": "stop at the line (--stop-at-line)"}  # fmt: skip
#: the files a campaign writes into its folder (what --force removes; the records store is elsewhere)
CAMPAIGN_FILES = (STATE, PREDICTIONS, BATCHES, "survivors.md", "survivors.csv", "pareto.png", "recipes", "surrogate")


def _shown(v) -> str:
    if isinstance(v, StrEnum):
        return v.value
    if isinstance(v, tuple):
        return ",".join(map(str, v)) or "all"
    return "none" if v in ("", None) else str(v)


@dataclass
class Step:
    """What one confirmation gave (for progress, MLflow and the report)."""

    config: str
    bpw: float
    kld_pred: float | None
    kld: float | None
    status: str
    margin: float | None
    margin_se: float | None
    reason: str | None = None
    heldout: bool = False


@dataclass
class Result:
    state: State
    steps: list[Step] = field(default_factory=list)
    spent: int = 0
    forward_tokens: int = 0
    wins: list[str] = field(default_factory=list)  # types keys of re-confirmed nonlinear wins
    stopped: str = ""


def clear(out: Path) -> None:
    """Remove a campaign's own files from ``out`` (state, predictions, report); nothing else there, and
    nothing in the records store."""
    import shutil

    for name in CAMPAIGN_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


class Campaign:
    """One campaign on one engine (base + corpus) and one store; ``run()`` runs or resumes it."""

    def __init__(self, engine: Engine, store: Store, out: Path, state: State, tracker: Tracker | None = None,
                 say: Callable[[str], None] | None = None, progress=None,
                 surrogate_folder: Path | None = None, train_store: Path | None = None,
                 train_tables: Path | None = None, executor: Executor | None = None) -> None:  # fmt: skip
        from mqpredict.surrogate import service

        self.engine, self.store, self.out, self.state = engine, store, out, state
        self.tracker = tracker or Tracker()
        self.say = say or (lambda s: None)
        self.progress = progress or (lambda *a: None)
        self.surrogate_folder = surrogate_folder or service.DEFAULT_SURROGATE
        self.train_store = train_store or service.DEFAULT_STORE
        self.train_tables = train_tables or service.DEFAULT_TABLES
        self.ident: ModelIdentity = identify(engine.model)
        self.settings = state.settings
        #: where measurements run (default: here, one after another); the campaign alone writes store and MLflow
        self.executor = executor or LocalExecutor(engine, self.settings.batch)
        self.types = tuple(QuantType[t] for t in self.settings.types)
        #: learn from every record of the model in the store (``propose``: the user's own measurements), not
        #: only presets and this campaign's
        self.all_sources = False
        self._vectors: dict[str, np.ndarray] = {}
        self.surrogate_ = None  # the last refitted surrogate (saved into the campaign folder at the end)
        self._table = None  # the base's weight-error table (set by run)
        self.policy_: Policy | None = None
        #: configs the policy measures first (warm start). The hook for the zero-run allocator's answers
        #: (``mqpredict allocate``: its configs across the size range are candidates and a warm start);
        #: empty until that library function is on this branch
        self.warm_start: tuple[Config, ...] = ()
        self.candidates: tuple[Config, ...] = ()  # the allocator's configs EHVI may choose (per-tensor, many sizes)
        self._predictions = self._load_predictions()

    # ------------------------------------------------------------------------ construction
    @classmethod
    def start(cls, engine: Engine, store: Store, out: Path, settings: Settings, force: bool = False, **kw) -> Campaign:
        """A new campaign in ``out``, or the one already there if it has exactly these settings (a campaign with
        other settings is an error naming them: it is never silently continued with the old ones);
        ``force`` starts over in ``out`` (the campaign's files there go; the records store keeps every record)."""
        out.mkdir(parents=True, exist_ok=True)
        ident = identify(engine.model)
        spec = engine.spec
        im = engine.imatrix
        state = State(uuid.uuid4().hex[:12], str(engine.model.path), engine.corpus.id, str(engine.corpus.path),
                      engine.name, spec.ctx, spec.n_chunks,
                      spec.chunk_offset, ident.model_id, ident.family, settings, time.strftime("%Y-%m-%dT%H:%M:%S"),
                      str(im.path.resolve()) if im else "", im.id if im else "", spec.scoring.value)  # fmt: skip
        if (out / STATE).exists() and not force:
            old = State.load(out)
            diff = old.differences(state)
            if diff:
                raise InputError(f"{out} holds campaign {old.id} with other settings: {'; '.join(diff)}",
                                 f"continue it with 'mqpredict campaign resume {out}' (--budget N raises its budget), "
                                 "choose another --out, or add --force to start over there (the records store keeps "
                                 "every measurement)")  # fmt: skip
            return cls(engine, store, out, old, **kw)
        if force:
            clear(out)
        state.save(out)
        return cls(engine, store, out, state, **kw)

    # ------------------------------------------------------------------------ records view
    def _records(self, spec: EvalSpec, status: str | None = "ok", without: frozenset[str] = frozenset(),
                 df: pd.DataFrame | None = None) -> pd.DataFrame:  # fmt: skip
        """This model's records on ``spec``'s slice with this build: presets and this campaign's own (but
        not its own of the types keys ``without``: the store as it was before a batch was asked). ``df`` is
        the store already loaded for this decision (else it is read)."""
        df = self.store.load() if df is None else df
        if df.empty:
            return df
        e = self.engine
        m = Context.of(e, self.ident.model_id, spec).mask(df) & (df["build"] == e.build_id())
        if not self.all_sources:
            m &= (df["source"] == Source.preset.value) | (df["provenance_file"] == self.state.tag)
        if status:
            m &= df["status"] == status
        if without:
            m &= ~((df["provenance_file"] == self.state.tag) & df["types_key"].isin(without))
        return df[m]

    def _taken(self, df: pd.DataFrame | None = None) -> set[str]:
        """Types keys never to propose: measured by anyone (another campaign in the same store too), with any
        status, on the search slice or its first stage with this build. Measuring one again would only meet
        the record already stored (a duplicate, not counted against this campaign's budget), and the loop
        would propose it again and again."""
        df = self.store.load() if df is None else df
        if df.empty:
            return set()
        e, st = self.engine, self.state
        first, _rest = stage_specs(st.search, self.settings.stage_fraction)
        m = Context.of(e, self.ident.model_id, st.search).mask(df) | Context.of(e, self.ident.model_id, first).mask(df)
        return set(df.loc[m & (df["build"] == e.build_id()), "types_key"])

    def _spent(self, df: pd.DataFrame | None = None) -> pd.DataFrame:
        df = self.store.load() if df is None else df
        if df.empty:
            return df
        return df[(df["provenance_file"] == self.state.tag) & (df["model_id"] == self.ident.model_id)]

    def _vector(self, row: pd.Series) -> np.ndarray:
        """The per-token KLD of a record (from the store; re-measured once if the store has none)."""
        key = row["key"]
        if key in self._vectors:
            return self._vectors[key]
        p = row.get("per_token_path")
        if isinstance(p, str) and p and (self.store.root / p).exists():
            v = np.load(self.store.root / p, allow_pickle=False)
        else:
            scoring = row.get("scoring")
            spec = EvalSpec(int(row["ctx"]), int(row["n_chunks"]), int(row["chunk_offset"]),
                            scoring=Scoring(scoring if isinstance(scoring, str) and scoring else Scoring.windows))
            m = self.engine.measure(Config.parse(row["config"]), spec=spec)
            if m.per_token_path is None:
                raise InputError(f"no per-token KLD for {row['config']}", "use the in-process engine or --tools-kld logits")
            self.store.attach_vector(key, m.per_token_path)
            v = load_scores(m.per_token_path).kld
        self._vectors[key] = v.astype(np.float64)
        return self._vectors[key]

    @staticmethod
    def _points(df: pd.DataFrame) -> list[Point]:
        return [Point(float(r.bpw), float(r.kld_mean), r.key) for r in df.itertuples()]

    def _line(self, spec: EvalSpec, df: pd.DataFrame | None = None) -> tuple[Line, pd.DataFrame]:
        """The presets' line on ``spec``'s slice (from ``df``, its ok records, when already loaded)."""
        df = self._records(spec) if df is None else df
        presets = df[df["source"] == Source.preset.value]
        return Line.from_presets(self._points(presets)), presets

    # ------------------------------------------------------------------------ predictions log
    def _load_predictions(self) -> dict[str, dict]:
        p = self.out / PREDICTIONS
        out = {}
        if p.exists():
            for line in p.read_text().splitlines():
                try:
                    d = json.loads(line)
                    out[d["types_key"]] = d
                except (ValueError, KeyError):
                    continue  # a line cut by a kill: the prediction is only lost, never wrong
        return out

    def _note_prediction(self, p: Proposal) -> None:
        d = p.to_json()
        self._predictions[p.types_key] = d
        with open(self.out / PREDICTIONS, "a") as f:
            f.write(json.dumps(d) + "\n")
            f.flush()
        faults.point("propose", p.types_key)

    # ------------------------------------------------------------------------ batch journal
    def _journal(self) -> list[list[dict]]:
        """The jobs of every batch asked so far (``batches.jsonl``; a line cut by a kill is a batch that was
        never submitted, and is asked again from the same records)."""
        p = self.out / BATCHES
        out = []
        if p.exists():
            for line in p.read_text().splitlines():
                try:
                    out.append(list(json.loads(line)["jobs"]))
                except (ValueError, KeyError, TypeError):
                    continue
        return out

    def _note_batch(self, jobs: list[tuple[int, Proposal]]) -> None:
        """A batch, before any of it is submitted: one line, written and synced at once."""
        line = json.dumps({"jobs": [{"step": s_, "config": p.config.key, "source": p.source, "types_key": p.types_key,
                                     "proposal": p.to_json()} for s_, p in jobs]})  # fmt: skip
        with open(self.out / BATCHES, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        faults.point("propose", f"batch@{jobs[0][0] if jobs else 'none'}")

    def _unfinished(self, spent: pd.DataFrame) -> list[tuple[int, Proposal]]:
        """The jobs of noted batches that have no record yet (a killed process's batch), in step order."""
        done = set(spent["types_key"]) if len(spent) else set()
        out = []
        for jobs in self._journal():
            for j in jobs:
                if j["types_key"] not in done:
                    d = j["proposal"]
                    out.append((int(j["step"]), Proposal(Config.parse(d["config"]), d["types_key"], d["size_bytes"],
                                                         d["bpw"], d["kld_pred"], d["kld_lo"], d["kld_hi"], d["ei"],
                                                         d.get("source", "proposed"), d.get("inflation", 1.0))))  # fmt: skip
        return sorted(out, key=lambda x: x[0])

    # ------------------------------------------------------------------------ the policy
    def policy(self, table) -> Policy:
        """The search policy of this campaign, with what it proposed and measured so far (a resume continues)."""
        learner = Learner.without_family(self.ident.family, self.ident.model_id, table, self.train_store,
                                         self.train_tables, self.surrogate_folder)  # fmt: skip
        pol = Policy(self.engine.model, table, learner, self.settings.policy(), self.types, say=self.say,
                     warm_start=self.warm_start, candidates=self.candidates, imatrix=self.engine.imatrix)  # fmt: skip
        for d in self._predictions.values():
            pol.remember(d)
        snap = self.snapshot()
        per_window = self.state.search.scored_per_chunk
        pol.tell(told_from(r["types_key"], snap.vectors[r["key"]], per_window, r["status"] == Status.ok.value)
                 for df in (snap.own, snap.partial) if len(df) for _, r in df.iterrows()
                 if r["types_key"] in self._predictions and r["key"] in snap.vectors)  # fmt: skip
        return pol

    def snapshot(self, pending: set[str] = frozenset(), without: frozenset[str] = frozenset()) -> Snapshot:
        """The store read once for one decision: this campaign's context on the search slice (without its own
        records of the types keys ``without``: the store as it was when a batch was asked)."""
        st = self.state
        df = self.store.load()  # once: every view below reads the same store state
        ok = self._records(st.search, without=without, df=df)
        spent = self._spent(df)
        if without and len(spent):
            spent = spent[~spent["types_key"].isin(without)]
        part = spent[spent["status"] == Status.partial.value] if len(spent) else spent
        vectors = {r["key"]: self._vector(r) for d in (ok, part) if len(d) for _, r in d.iterrows()}
        measured = set(self._records(st.search, status=None, df=df)["types_key"]) if len(ok) else set()
        measured |= set(spent["types_key"]) if len(spent) else set()
        measured |= self._taken(df)  # by anyone in the store (another campaign too): never proposed again
        return Snapshot(ok, vectors, st.search.scored_per_chunk, part, frozenset(measured | set(pending)))

    # ------------------------------------------------------------------------ the loop
    def run(self, on_finish: Callable[[Campaign], object] | None = None) -> Result:
        """Seed, loop, re-confirm, then ``on_finish(self)`` (the report) inside the campaign's MLflow run."""
        st, e = self.state, self.engine
        res = Result(st)
        ex = self.executor
        try:  # the base of both slices in one go (corpus problems show before any work)
            ex.prepare([st.search.part(st.chunk_offset, st.heldout.end - st.chunk_offset)])
        except InputError as err:
            ex.prepare([st.search])  # the search slice itself does not fit: say that
            raise InputError(f"the corpus has no room for a held-out slice after the search slice: {err.message}",
                             "give fewer --tokens, a smaller --ctx or a longer corpus") from None  # fmt: skip
        params = {"campaign_id": st.id, "corpus": e.corpus.id, "ctx": st.ctx, "n_chunks": st.n_chunks,
                  "imatrix_id": e.imatrix_id, "imatrix_corpus": e.imatrix.corpus_id if e.imatrix else None,
                  "scoring": st.scoring, "engine": e.name, "llama_version": e.version(),
                  **{f"setting.{k}": v for k, v in asdict(self.settings).items() if k not in ("types", "presets")},
                  "setting.types": ",".join(self.settings.types), "setting.presets": ",".join(self.settings.presets) or "all", **ex.describe()}  # fmt: skip
        with self.tracker.parent("campaign", self.ident.columns(), params, resume=st.id):  # one run, however often resumed
            if not ex.synchronous:
                self.say(f"{ex.name} executor, asynchronous: which configs are proposed depends on which results come "
                         "back first, so records may differ from run to run (--sync reproduces the local path's)")  # fmt: skip
            self.say(f"campaign {st.id}: seeding the presets on {st.search.n_tokens} tokens")
            seed(e, self.store, preset_candidates(self._seed_line()), self.progress, self.say, tracker=self.tracker,
                 own_run=False, executor=ex, spec=st.search)  # fmt: skip
            table = self._table = self._error_table()
            if not self.warm_start:
                self.warm_start = self._allocator_configs(table)
            if not self.candidates:
                self.candidates = self._allocator_candidates(table)
            self.policy_ = self.policy(table)
            self._loop(self.policy_, res)
            self._heldout(res)
            self._finish(res)
            if on_finish:
                on_finish(self)
        return res

    def _seed_line(self) -> tuple:
        """The presets seeded: every one a seed measures here, or the chosen ones (``--only``) and Q8_0."""
        return pick_presets(self.engine.imatrix is not None, bool(self.engine.model.n_expert), self.settings.presets,
                            reference=True)  # fmt: skip

    def _allocator_configs(self, table) -> tuple[Config, ...]:
        """What ``mqpredict allocate`` answers at ``n_warm_start`` sizes spread inside the presets' range (the
        search's own types, the campaign's imatrix): measured first, they are the free answers to beat."""
        from mqpredict.search.allocator import allocations_across

        k = self.settings.n_warm_start()
        span = self._presets_span()
        if k <= 0 or span is None:
            return ()
        lo, hi = span
        step = (hi - lo) / (k + 1)
        allocs = allocations_across(self.engine.model, table, k, lo + step, hi - step, self.types, self.engine.imatrix)
        if allocs:
            self.say(f"warm start: the allocator's configs at {', '.join(f'{a.bpw:.2f}' for a in allocs)} bpw")
        return tuple(a.config for a in allocs)

    def _allocator_candidates(self, table) -> tuple[Config, ...]:
        """The allocator's answers at ``ALLOCATOR_CANDIDATES`` sizes across the presets' range: candidates EHVI
        weighs with the space's own (not measured unless chosen)."""
        from mqpredict.search.allocator import allocations_across

        span = self._presets_span()
        if span is None:
            return ()
        return tuple(a.config for a in allocations_across(self.engine.model, table, ALLOCATOR_CANDIDATES, *span,
                                                          self.types, self.engine.imatrix))  # fmt: skip

    def _presets_span(self) -> tuple[float, float] | None:
        """The bpw range of the presets' line on the search slice (None: no preset measured)."""
        line, _ = self._line(self.state.search)
        return (line.hull[0].bpw, line.hull[-1].bpw) if line.hull else None

    def _error_table(self):
        """The base's weight-error table: from the driver's cache, else computed once by the executor (on a
        worker: a 70B base's pure quantizations are no job for the driver) and kept in the driver's cache."""
        from mqpredict.surrogate.weight_error import cached_table, error_table, table_path

        path = table_path(self.engine, self.ident.model_id)
        table = cached_table(path)
        if table is not None:
            return table
        self.say("computing the base's weight-error table (sampled rows quantized in memory; once per model and imatrix)")
        table = self.executor.call(error_table, self.ident.model_id)
        table.save(path)
        return table

    def _measured(self, without: frozenset[str] = frozenset()) -> tuple[Line, float, pd.DataFrame]:
        """The line, the reference's ln KLD and the ok records (without this campaign's records of the types
        keys ``without``: the store as it was when a batch was asked). What a first stage is judged against
        is the policy's :meth:`~mqpredict.search.policy.Policy.reference`, not made here."""
        snap = self.snapshot(without=without)
        if not snap.line.hull:
            raise InputError("no preset could be measured on this model", "see the failed records: mqpredict data list")
        if snap.ln_ref is None:
            raise InputError("the Q8_0 reference could not be measured on this model", "see mqpredict data list")
        return snap.line, snap.ln_ref, snap.ok

    def _candidate_wins(self, line: Line, ok: pd.DataFrame) -> list[tuple[str, Paired]]:
        """Measured configs of this campaign significantly below the line on the search slice, best first."""
        out = []
        for _, r in ok[ok["provenance_file"] == self.state.tag].iterrows():
            m = margin_to_line(self._vector(r), float(r["bpw"]), line, self._vectors_by_key(ok),
                               self.state.search.scored_per_chunk)  # fmt: skip
            if m is not None and m.below(self.settings.alpha):
                out.append((r["key"], m))
        return sorted(out, key=lambda km: km[1].diff)

    def _vectors_by_key(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        return {r["key"]: self._vector(r) for _, r in df.iterrows()}

    def _loop(self, policy: Policy, res: Result) -> None:
        """Ask → submit → tell, as the executor allows: a synchronous executor takes a batch of
        ``settings.batch`` and returns it whole before the next ask (the same records wherever the jobs
        run); an asynchronous one is topped up with new proposals whenever a job returns."""
        st, cfg, ex = self.state, self.settings, self.executor
        spent = self._spent()
        resumed = self._unfinished(spent)
        step = max([len(spent)] + [s_ for s_, _ in resumed])
        pending: dict[int, Proposal] = {}  # job id → proposal
        if resumed:  # finish what a killed process had asked, judged against the records it was asked on
            unfinished = {p.types_key for _, p in resumed}
            before = frozenset(j["types_key"] for jobs in self._journal() if unfinished & {j["types_key"] for j in jobs}
                               for j in jobs)  # fmt: skip
            ref = policy.reference(self.snapshot(without=before))
            self.say(f"finishing the batch a stopped run had started ({len(resumed)} config(s))")
            for s_, p in resumed:
                fraction = cfg.stage_fraction if p.source != "probe" else 1.0
                ex.submit(Job(s_, confirm, (p.config, st.search, ref, fraction)))
                pending[s_] = p
        asking = True
        while True:
            snap = self.snapshot({p.types_key for p in pending.values()})  # running now: never measured twice
            res.spent = len(self._spent())
            reserve = policy.reserve(snap)
            room = cfg.budget - res.spent - reserve - len(pending)
            free = min(ex.free(), room) if asking else 0
            if room <= 0 and not pending:
                res.stopped = "budget spent" if reserve == 0 else f"budget spent (kept {reserve} for held-out re-confirmation)"
                return
            if free > 0:
                self.say(f"asking the policy ({len(snap.ok)} records of this model + the shipped dataset without "
                         f"{self.ident.family})")  # fmt: skip
                n = min(cfg.batch, room) if ex.synchronous else free
                props = policy.ask(snap, n)
                self.surrogate_ = policy.surrogate_
                if not props:
                    res.stopped = policy.stopped
                    asking = False
                ref = policy.reference(snap) if props else None
                jobs = [(step + i, p) for i, p in enumerate(props, 1)]
                step += len(jobs)
                for _, p in jobs:
                    self._note_prediction(p)
                if jobs:
                    self._note_batch(jobs)  # from here on, a resume finishes this batch rather than asking anew
                for s_, p in jobs:
                    fraction = cfg.stage_fraction if p.source != "probe" else 1.0
                    ex.submit(Job(s_, confirm, (p.config, st.search, ref, fraction)))
                    pending[s_] = p
            if not pending:
                return
            r = ex.wait()
            p = pending.pop(r.job.id)
            self._tell(r, p.config, p, _SOURCE.get(p.source, Source.proposed), res)
            self.progress("campaign", min(res.spent + 1, cfg.budget), cfg.budget)  # _tell stored one record
            if not pending or not ex.synchronous:
                self._log_progress(r.job.id)

    def _log_progress(self, step: int) -> None:
        """Best margin so far and hypervolume, by step, on the campaign's parent run."""
        line, presets = self._line(self.state.search)
        ok = self._records(self.state.search)
        margins = [line.margin(p) for p in self._points(ok[ok["source"] != Source.preset.value])]
        margins = [m for m in margins if m is not None]
        ref_pt = (float(presets["bpw"].max()), math.log(float(presets["kld_mean"].max())))
        self.tracker.log_metrics({"best_margin_ln": min(margins) if margins else None,
                                  "hypervolume": hypervolume([(p.bpw, p.ln_kld) for p in self._points(ok)], ref_pt)},
                                 step)  # fmt: skip

    def _tell(self, r: JobResult, c: Config, p: Proposal | None, source: Source, res: Result, heldout: bool = False) -> None:
        """Store what a job gave: its measurement (``ok`` or ``partial``), or a ``failed`` record with the reason."""
        st, e, step = self.state, self.engine, r.job.id
        prov = Provenance(st.tag, None, "mqpredict campaign")
        if r.error is not None:
            spec = next(a for a in r.job.args if isinstance(a, EvalSpec))  # the slice the job was to measure
            rec = failed(e, self.ident, c, e.resolve(c), spec, source, r.error, prov)
            self.store.append([rec.replace(mlflow_run_id=self.tracker.log_record(rec, step))])
            res.steps.append(Step(c.key, rec["bpw"], p.kld_pred if p else None, None, "failed", None, None, r.error, heldout))
            self.say(f"[{step}] {c.key}: measurement failed ({r.error}); recorded as failed, going on")
            return
        res.forward_tokens += r.value.forward_tokens
        self._store_outcome(r.value, c, p, source, prov, res, step, heldout)
        m = r.value.measurement
        if p is not None and not heldout and m.per_token_path and self.policy_ is not None:
            x = load_scores(m.per_token_path).kld
            self.policy_.tell([told_from(m.types_key, x, self.state.search.scored_per_chunk, r.value.complete)])

    def _store_outcome(self, o: Outcome, c: Config, p: Proposal | None, source: Source, prov: Provenance,
                       res: Result, step: int, heldout: bool = False) -> None:  # fmt: skip
        st, e, m = self.state, self.engine, o.measurement
        spec = st.search.part(m.chunk_offset, m.n_chunks)
        status = Status.ok if o.complete else Status.partial
        pt = None
        rec0 = from_measurement(e, self.ident, m, spec, source, prov, status=status, reason=o.reason)
        if m.per_token_path:
            pt = self.store.attach_vector(rec0.key, m.per_token_path)
        rec = rec0.replace(per_token_path=pt)
        metrics = {"kld_pred": p.kld_pred if p else None,
                   "pred_error_ln": math.log(m.stats.kld_mean) - math.log(p.kld_pred) if p else None,
                   "margin_ln": o.margin.diff if o.margin else None, "margin_se": o.margin.se if o.margin else None,
                   "forward_tokens": o.forward_tokens}  # fmt: skip
        win = bool(o.complete and o.margin is not None and o.margin.below(self.settings.alpha))
        tags = {"nonlinear_win": "candidate" if win and not heldout else ("yes" if win else "no"),
                "campaign_id": st.id, "slice": "held-out" if heldout else "search"}  # fmt: skip
        rec = rec.replace(mlflow_run_id=self.tracker.log_record(rec, step, metrics, tags))
        self.store.append([rec])
        res.steps.append(Step(c.key, m.bpw, p.kld_pred if p else None, m.stats.kld_mean, status.value,
                              o.margin.diff if o.margin else None, o.margin.se if o.margin else None, o.reason, heldout))  # fmt: skip
        pred = f"predicted {p.kld_pred:.4f} [{p.kld_lo:.4f}, {p.kld_hi:.4f}] · " if p else ""
        mg = f" · {o.margin.diff:+.3f} ± {o.margin.se:.3f} vs line" if o.margin else ""
        what = "held-out " if heldout else ("" if o.complete else "stopped early · ")
        why = f" ({o.reason.removeprefix('stopped early: ')})" if o.reason else ""
        self.say(f"[{step}] {what}{c.key} · {m.bpw:.3f} bpw · {pred}measured {m.stats.kld_mean:.4f}{mg}{why}")

    # ------------------------------------------------------------------------ held-out re-confirmation
    def _heldout(self, res: Result) -> None:
        st, cfg, e = self.state, self.settings, self.engine
        line, _, ok = self._measured()
        cands = self._candidate_wins(line, ok)
        if not cands:
            return
        # the presets of the line, on the held-out slice (seeds: they do not count against the budget)
        hull_keys = {p.name for p in line.hull}
        hull_cfgs = [Config.parse(r["config"]) for _, r in ok.iterrows() if r["key"] in hull_keys]
        self.say(f"re-confirming on the held-out slice ({st.scoring} chunks {st.heldout.chunk_offset}…"
                 f"{st.heldout.end - 1}): the line's presets first")  # fmt: skip
        seed(e, self.store, [Candidate(c, Source.preset) for c in hull_cfgs], self.progress, self.say,
             tracker=self.tracker, own_run=False, executor=self.executor, spec=st.heldout)  # fmt: skip
        hline, hpresets = self._line(st.heldout)
        hvec = self._vectors_by_key(hpresets)
        href = Reference(hline, hvec, [], st.heldout.scored_per_chunk, cfg.alpha)
        done = self._records(st.heldout, status=None)
        done_types = set(done["types_key"]) if len(done) else set()
        by_key = ok.set_index("key")
        step = len(self._spent())
        configs: dict[int, tuple[Config, Source]] = {}
        for key, _m in spread(cands, {k: float(by_key.loc[k, "bpw"]) for k, _ in cands}):
            r = by_key.loc[key]
            if r["types_key"] in done_types:
                continue
            if step >= cfg.budget:
                self.say(f"no budget left to re-confirm {r['config']} on held-out tokens")
                continue
            step += 1
            configs[step] = (Config.parse(r["config"]), Source(r["source"]))
            self.executor.submit(Job(step, confirm, (configs[step][0], st.heldout, href, 1.0)))
        for r in self.executor.drain():
            c, source = configs[r.job.id]
            self._tell(r, c, None, source, res, heldout=True)

    # ------------------------------------------------------------------------ results
    def wins(self) -> dict[str, tuple[Paired, Paired]]:
        """Types key → (search margin, held-out margin) of every re-confirmed nonlinear win: the candidate wins
        re-measured on the held-out slice that Holm's procedure keeps (family-wise level ``alpha``)."""
        st = self.state
        line, _, ok = self._measured()
        hline, hpresets = self._line(st.heldout)
        held = self._records(st.heldout)
        hvec = self._vectors_by_key(hpresets)
        types = dict(zip(ok["key"], ok["types_key"]))
        tests, search = [], {}
        for key, m in self._candidate_wins(line, ok):
            tk = types[key]
            h = held[(held["types_key"] == tk) & (held["provenance_file"] == st.tag)]
            if h.empty:
                continue
            hr = h.iloc[0]
            hm = margin_to_line(self._vector(hr), float(hr["bpw"]), hline, hvec, st.heldout.scored_per_chunk)
            if hm is not None:
                tests.append((tk, hm))
                search[tk] = m
        held_m = dict(tests)
        return {tk: (search[tk], held_m[tk]) for tk in holm(tests, self.settings.alpha)}

    def _finish(self, res: Result) -> None:
        st = self.state
        _line, _, ok = self._measured()
        res.spent = len(self._spent())
        w = self.wins()
        res.wins = list(w)
        pts = [(float(r.bpw), math.log(float(r.kld_mean))) for r in ok.itertuples()]
        presets = ok[ok["source"] == Source.preset.value]
        ref_pt = (float(presets["bpw"].max()), math.log(float(presets["kld_mean"].max())))
        hv_presets = hypervolume([(float(r.bpw), math.log(float(r.kld_mean))) for r in presets.itertuples()], ref_pt)
        self.tracker.log_metrics({"confirmations": res.spent, "wins": len(w), "forward_tokens": res.forward_tokens,
                                  "hypervolume": hypervolume(pts, ref_pt), "hypervolume_presets": hv_presets,
                                  "forward_tokens_per_win": res.forward_tokens / len(w) if w else None})  # fmt: skip
        if self.surrogate_ is None and self.policy_ is not None and (asked := self._journal()):
            # resumed after the last ask: the surrogate it was asked with, from the records it was asked on
            snap = self.snapshot(without=frozenset(j["types_key"] for j in asked[-1]))
            self.surrogate_ = self.policy_.learner.fit(snap.ok, self.settings.policy().seed)
        if self.surrogate_ is not None:  # the surrogate that made the last proposals: LightGBM text + JSON
            folder = self.surrogate_.save(self.out / "surrogate", {"campaign": st.id, "model_id": st.model_id})
            for f in sorted(Path(folder).iterdir()):
                self.tracker.log_artifact(f, "surrogate")
        for r in ok[ok["types_key"].isin(w)].itertuples():
            self.tracker.set_tags(r.mlflow_run_id if isinstance(r.mlflow_run_id, str) else None, {"nonlinear_win": "yes"})
        self.say(f"campaign {st.id}: {res.spent}/{self.settings.budget} confirmations, {len(w)} re-confirmed "
                 f"nonlinear win(s), {res.forward_tokens} forward-pass tokens; {res.stopped}")  # fmt: skip
