"""Seeding a model: measure the configs people already use and keep every result as a record.

Candidates are the standard llama.cpp presets plus any recipes and GGUF-derived configs, adapted to
this model. A candidate whose effective per-tensor types were already measured (in the store, or
earlier in this run) is skipped before any work: it is the same file. Each record is appended as soon
as it is measured, so Ctrl-C or kill -9 loses nothing finished and a re-run continues where it
stopped. A llama.cpp failure becomes a ``failed`` record with its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mqpredict.errors import InputError, MqError
from mqpredict.llama.engine import Engine
from mqpredict.measure.corpus import EvalSpec
from mqpredict.quant.config import Config
from mqpredict.quant.presets import IMATRIX_PRESETS, Preset, require_preset
from mqpredict.quant.resolve import types_key
from mqpredict.records.convert import Provenance, failed, from_measurement
from mqpredict.records.identity import identify
from mqpredict.records.ingest import GGUFConfig, Recipe, adapt
from mqpredict.records.context import Context
from mqpredict.records.schema import Record, Source
from mqpredict.records.store import Store
from mqpredict.tracking import Tracker

#: the presets every seed measures (the ones people publish), high to low
SEED_PRESETS: tuple[Preset, ...] = (
    Preset.Q8_0, Preset.Q6_K, Preset.Q5_K_M, Preset.Q5_K_S, Preset.Q5_0, Preset.Q5_1, Preset.Q4_K_M,
    Preset.Q4_K_S, Preset.Q4_0, Preset.Q4_1, Preset.IQ4_NL, Preset.IQ4_XS, Preset.Q3_K_L, Preset.Q3_K_M,
    Preset.Q3_K_S, Preset.Q2_K,
)  # fmt: skip


@dataclass(frozen=True)
class Candidate:
    config: Config
    source: Source
    prov: Provenance = Provenance()
    label: str = ""


@dataclass
class SeedReport:
    measured: list[Record] = field(default_factory=list)
    failed: list[Record] = field(default_factory=list)
    same_file: list[tuple[str, str]] = field(default_factory=list)  # (config, the config/record it duplicates)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (config, reason it cannot apply here)
    notes: list[str] = field(default_factory=list)
    keys: dict[int, str] = field(default_factory=dict)  # candidate index → the key of the record that holds it

    def to_json(self) -> dict:
        return {
            "measured": [r["config"] for r in self.measured],
            "failed": [{"config": r["config"], "reason": r["status_reason"]} for r in self.failed],
            "same_file": [{"config": c, "as": other} for c, other in self.same_file],
            "skipped": [{"config": c, "reason": why} for c, why in self.skipped],
            "notes": self.notes,
        }


def config_candidates(configs: list[Config], source: Source) -> list[Candidate]:
    return [Candidate(c, source) for c in configs]


def seed_presets(imatrix: bool, moe: bool = False) -> tuple[Preset, ...]:
    """The presets a seed measures: the 16 standard ones, with an imatrix also the 11 made for one, and on a
    mixture of experts llama.cpp's MoE preset (routed experts MXFP4, everything else Q8_0)."""
    return SEED_PRESETS + (IMATRIX_PRESETS if imatrix else ()) + ((Preset.MXFP4_MOE,) if moe else ())


def pick_presets(imatrix: bool, moe: bool = False, only: Iterable[str] = (), reference: bool = False) -> tuple[Preset, ...]:
    """The seed presets named in ``only`` (all of them when it is empty; with ``reference``, Q8_0 too: a
    campaign's reference), in the seed's order. A name that is not a preset, or not one a seed measures
    here (an imatrix preset without an imatrix, MXFP4_MOE on a dense model), is a one-line error."""
    every = seed_presets(imatrix, moe)
    chosen = {require_preset(o) for o in only}
    if not chosen:
        return every
    missing = chosen - set(every)
    if missing:
        raise InputError(f"--only {', '.join(sorted(p.value for p in missing))}: not a preset a seed measures here",
                         "IQ3_M … IQ1_S need an imatrix and MXFP4_MOE a mixture of experts")  # fmt: skip
    return tuple(p for p in every if p in chosen or (reference and p is Preset.Q8_0))


def preset_candidates(presets=SEED_PRESETS) -> list[Candidate]:
    return [Candidate(Config.from_preset(p), Source.preset, label=p.value) for p in presets]


def recipe_candidates(recipes: list[Recipe]) -> list[Candidate]:
    return [Candidate(r.config, Source.recipe, Provenance(str(r.file), r.url, r.author), r.file.name) for r in recipes]


def gguf_candidates(ggufs: list[GGUFConfig]) -> list[Candidate]:
    out = []
    for g in ggufs:
        author = g.model.header.get("general.organization") or g.model.header.get("general.author")
        out.append(Candidate(g.config, Source.community, Provenance(str(g.model.path), None, author), g.model.path.name))
    return out


def summarize(name: str, notes: list[str]) -> list[str]:
    """One line per candidate: what adapting it to this model dropped or moved."""
    dropped = [n for n in notes if " dropped " in n]
    moved = [n for n in notes if " dropped " not in n]
    out = [f"{name}: {m}" for m in moved]
    if dropped:
        first = dropped[0].split(" dropped ")[0]
        out.append(f"{name}: {len(dropped)} pattern(s)/group(s) match nothing here and were dropped (e.g. {first})")
    return out


def seed(
    engine: Engine,
    store: Store,
    candidates: list[Candidate],
    progress: Callable[[str, int, int], None] | None = None,
    say: Callable[[str], None] | None = None,
    keep_vectors: bool = True,
    tracker: Tracker | None = None,
    own_run: bool = True,
    executor=None,
    spec: EvalSpec | None = None,
) -> SeedReport:
    """Measure every candidate not yet in ``store`` for this (model, corpus, slice, build).

    ``keep_vectors=False`` stores no per-token vectors (a dataset meant for git stays small);
    ``own_run=False`` logs into the caller's open MLflow run (a campaign) instead of a seed run;
    ``executor`` runs the measurements (default: one after another on ``engine``; a campaign passes its
    own, e.g. Ray); ``spec`` is the token slice (default: the engine's)."""
    from mqpredict.execute.executor import LocalExecutor

    progress = progress or (lambda *a: None)
    say = say or (lambda s: None)
    tracker = tracker or Tracker()
    spec = spec or engine.spec
    executor = executor or LocalExecutor(engine)
    report = SeedReport()
    executor.prepare([spec])  # a corpus problem shows before any work
    params = {"corpus": engine.corpus.id, "ctx": spec.ctx, "n_chunks": spec.n_chunks, "chunk_offset": spec.chunk_offset,
              "scoring": spec.scoring.value,
              "engine": engine.name, "llama_version": engine.version(), "candidates": len(candidates)}  # fmt: skip
    run = _Seeding(engine, store, candidates, progress, say, keep_vectors, tracker, spec, report, executor)
    if not own_run:
        run()
        return report
    with tracker.parent("seed", identify(engine.model).columns(), params):
        run()
        tracker.log_metrics({"measured": len(report.measured), "failed": len(report.failed),
                             "same_file": len(report.same_file), "skipped": len(report.skipped)})  # fmt: skip
    return report


@dataclass
class _Seeding:
    engine: Engine
    store: Store
    candidates: list[Candidate]
    progress: Callable
    say: Callable
    keep_vectors: bool
    tracker: Tracker
    spec: EvalSpec
    report: SeedReport
    executor: object

    def __call__(self) -> None:
        """Plan (adapt, resolve, skip what is measured), submit everything, store each result as it lands."""
        from mqpredict.execute.job import Job, measure

        engine, spec, report = self.engine, self.spec, self.report
        ident = identify(engine.model)
        context = Context.of(engine, ident.model_id, spec)
        planned: dict[str, str] = {}  # record key → config that claims it in this run
        jobs: dict[int, tuple[Candidate, Config, dict, str]] = {}
        stored = {r.key: r for r in self.store.records()}
        for i, cand in enumerate(self.candidates):
            cfg, notes = adapt(cand.config, engine.model)
            name = cand.label or cfg.key
            report.notes += summarize(name, notes)
            try:
                types = engine.resolve(cfg)
            except MqError as e:
                report.skipped.append((name, e.message))
                self.say(f"skip {name}: {e.message}")
                continue
            key = context.key(types_key(engine.model, types), engine.build_id())
            report.keys[i] = key
            if key in planned or key in stored:
                other = planned.get(key) or stored[key]["config"]
                report.same_file.append((name, other))
                self.say(f"{name}: the same file as {other if len(other) < 70 else other[:69] + '…'} (already measured)")
                continue
            planned[key] = name
            jobs[i] = (cand, cfg, types, key)
        for i, (_cand, cfg, _types, _key) in jobs.items():
            self.executor.submit(Job(i, measure, (cfg, spec)))
        for done, res in enumerate(self.executor.drain()):
            self.progress("seed", done, len(jobs))
            cand, cfg, types, key = jobs[res.job.id]
            self.say(f"[{done + 1}/{len(jobs)}] {cand.label or cfg.key}")
            self._store(res, cand, cfg, types, key, ident)
        self.progress("seed", len(jobs), len(jobs))

    def _store(self, res, cand: Candidate, cfg: Config, types, key: str, ident) -> None:
        engine, store, i = self.engine, self.store, res.job.id
        if res.error is not None:
            rec = failed(engine, ident, cfg, types, self.spec, cand.source, res.error, cand.prov)
            store.append([rec.replace(mlflow_run_id=self.tracker.log_record(rec, i))])
            self.report.failed.append(rec)
            return
        m = res.measurement
        pt = store.attach_vector(key, m.per_token_path) if m.per_token_path and self.keep_vectors else None
        rec = from_measurement(engine, ident, m, self.spec, cand.source, cand.prov, per_token_path=pt)
        assert rec.key == key, (rec.key, key)
        rec = rec.replace(mlflow_run_id=self.tracker.log_record(rec, i))
        store.append([rec])
        self.report.measured.append(rec)
