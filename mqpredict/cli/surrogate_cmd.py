"""``mqpredict train`` and ``mqpredict predict``: the surrogate."""

from __future__ import annotations

import json as js
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mqpredict.cli.common import (
    ConfigsOpt, ExperimentOpt, ImatrixOpt, JsonOpt, load_imatrix, NoTrackOpt, TrackingUriOpt, emit_json, err, fmt_mb,
    make_tracker, out, progress_bar, spec_from, DEFAULTS, CtxOpt, TokensOpt, ThreadsOpt, ScoringOpt, scoring_for,
)  # fmt: skip
from mqpredict.cli.model_cmds import BaseArg, _base
from mqpredict.errors import InputError

StoreArg = Annotated[Path, typer.Option("--store", help="Records to learn from (default: the shipped dataset).")]
TablesArg = Annotated[Path, typer.Option("--tables", help="Weight-error tables of those models.")]
SurrogateOpt = Annotated[Path, typer.Option("--surrogate", help="A surrogate folder (default: models/default).")]


def _defaults():
    from mqpredict.surrogate import service

    return service


def train(
    store: StoreArg = None,
    tables: TablesArg = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where to save it (LightGBM text + JSON).")] = Path("models/default"),
    cv: Annotated[bool, typer.Option("--cv", help="Leave-one-family-out evaluation against the baselines.")] = False,
    exclude_family: Annotated[list[str] | None, typer.Option("--exclude-family", help="Leave a family out of "
                                                             "training (repeatable).")] = None,  # fmt: skip
    tracking_uri: TrackingUriOpt = None,
    experiment: ExperimentOpt = None,
    no_track: NoTrackOpt = False,
    json: JsonOpt = False,
) -> None:
    """Train the surrogate on records (LightGBM; intervals calibrated on leave-one-family-out residuals).

    With --cv, each family is held out in turn and the surrogate is compared with three baselines (bpw
    alone, additive isolation probes measured on the held-out model, the zero-run allocator's summed
    weight error); the table is saved as cv.csv beside the model and in its metadata. Tables are looked up
    per (model, imatrix): records quantized with an imatrix need their imatrix's table.
    """
    from mqpredict.surrogate.cv import evaluate, summary
    from mqpredict.surrogate.data import build, load_tables
    from mqpredict.surrogate.model import Surrogate
    from mqpredict.records.store import Store

    svc = _defaults()
    store, tables = store or svc.DEFAULT_STORE, tables or svc.DEFAULT_TABLES
    excl = tuple(exclude_family or ())
    tracker = make_tracker(no_track, tracking_uri, experiment or "mqpredict-surrogate")
    with progress_bar(not json) as progress, tracker.parent("train", {"family": "surrogate", "model_id": str(out_dir)},
                                                           {"store": str(store), "excluded": ",".join(excl)}):  # fmt: skip
        progress("train", 0, 1)
        s, meta = svc.train(store, tables, excl)
        progress("train", 1, 1)
        doc = {"out": str(out_dir), "rows": meta["train_records"]["n"], "unused_records": meta["unused_records"],
               "families": s.train_families_, "halfwidth_ln": dict(zip(("kld", "p99", "miss"), s.halfwidth_)),
               "calibrated": s.calibrated_}  # fmt: skip
        if cv:
            data = build(Store(store, create=False).load(), load_tables(tables), excl)
            table = evaluate(data, lambda: Surrogate(**s.get_params()), progress)
            summ = summary(table)
            out_dir.mkdir(parents=True, exist_ok=True)
            table.to_csv(out_dir / "cv.csv", index=False)
            meta["cv_summary"] = js.loads(summ.to_json(orient="records"))
            doc["cv"] = meta["cv_summary"]
            for r in meta["cv_summary"]:
                if r["mode"] == "reference" and r["method"] == "surrogate" and r["rows"] == "all":
                    tracker.log_metrics({f"cv_{r['kind']}_{k}": v for k, v in r.items() if isinstance(v, float)})
        s.save(out_dir, meta)
        for f in sorted(out_dir.iterdir()):
            tracker.log_artifact(f)
    if json:
        emit_json(doc)
        return
    err.print(f"saved {out_dir} · {doc['rows']} rows from {len(doc['families'])} families · 80% interval ±"
              f"{doc['halfwidth_ln']['kld']:.2f} in ln KLD ({'calibrated on held-out families' if s.calibrated_ else 'not calibrated'})",
              highlight=False)  # fmt: skip
    if doc["unused_records"]:
        err.print(f"records not used: {svc.unused(doc['unused_records'])}", highlight=False)
    if cv:
        print_cv_summary(meta["cv_summary"], "leave-one-family-out (mean over held-out models)")


def print_cv_summary(summary: list[dict], title: str) -> None:
    """The CV summary (one row per kind, mode and method) as a table."""
    t = Table(title=title, show_edge=False)
    cols = ["kind", "rows", "mode", "method", "n_models", "spearman", "spearman_band", "spearman_margin",
            "precision_at_k", "regret", "mae_log10", "coverage"]  # fmt: skip
    for c in cols:
        t.add_column(c, justify="left" if c in cols[:4] else "right")
    for r in summary:  # a summary stored before rows/n_models existed shows them empty
        t.add_row(*[str(r.get(c, "")) if c in cols[:5] else ("" if r.get(c) is None else f"{r[c]:.3f}") for c in cols])
    out.print(t)


def predict(
    base: BaseArg,
    config: ConfigsOpt = None,
    corpus: Annotated[Path | None, typer.Option("--corpus", help="Measure the Q8_0 reference on this text (or reuse "
                                                "its record in --store) and predict relative to it.")] = None,  # fmt: skip
    store: Annotated[Path | None, typer.Option("--store", help="Records where a measured reference may already be.")] = None,
    target_size: Annotated[str | None, typer.Option("--target-size", help="Best predicted configs up to this size "
                                                    "(e.g. 3.2GB).")] = None,  # fmt: skip
    target_bpw: Annotated[float | None, typer.Option("--target-bpw", help="… or up to this bpw.")] = None,
    top: Annotated[int, typer.Option("--top", help="How many configs --target-* returns.")] = 10,
    candidates: Annotated[int, typer.Option("--candidates", help="Random hybrids screened for --target-*.")] = 4000,
    surrogate: SurrogateOpt = None,
    imatrix: ImatrixOpt = None,
    ctx: CtxOpt = DEFAULTS["ctx"],
    tokens: TokensOpt = DEFAULTS["tokens"],
    scoring: ScoringOpt = None,
    threads: ThreadsOpt = 0,
    json: JsonOpt = False,
) -> None:
    """Predicted KLD (80% interval) and exact size of configs on a model, without measuring them.

    With --imatrix the configs are quantized with that importance matrix: its imatrix-weighted weight
    errors are the features, --target-* also screens the types that need one, and the reference is the
    Q8_0 measured with it.

    With --corpus the Q8_0 reference is measured (or its record reused) and configs are predicted relative
    to it (mode "reference"); without, everything is predicted (mode "zero-shot", less certain). With
    --target-size/--target-bpw, the best predicted configs within the budget come back with their
    llama-quantize recipes. A surrogate never uses records of the model's own family.
    """
    import numpy as np

    from mqpredict.llama.inprocess import InProcessEngine
    from mqpredict.llama.quantize import dry_run_types
    from mqpredict.quant.config import Config
    from mqpredict.quant.resolve import quantize_command, tensor_type_lines
    from mqpredict.records.identity import identify
    from mqpredict.search.space import CandidateSpace
    from mqpredict.surrogate.weight_error import error_table

    svc = _defaults()
    im = load_imatrix(imatrix)
    if not config and target_size is None and target_bpw is None:
        raise InputError("nothing to predict", "give --config CFG (repeatable), or --target-size / --target-bpw")
    with progress_bar(not json) as progress:
        path = _base(base, progress)
        spec = spec_from(ctx, tokens, 0, scoring_for(scoring))
        eng = InProcessEngine(path, corpus, spec, threads=threads, progress=progress, imatrix=im)
        with eng:
            ident = identify(eng.model)
            s, _ = svc.surrogate_for(ident, surrogate or svc.DEFAULT_SURROGATE, say=lambda m: err.print(m, highlight=False))
            table = error_table(eng, ident.model_id, progress=progress)
            if config:
                cfgs = [Config.parse(c) for c in config]
            else:
                from mqpredict.report.budget import parse_size

                budget = parse_size(target_size) if target_size else None
                space = CandidateSpace(eng.model, imatrix=im)
                pool = [Config.parse("default=Q8_0"), *space.probes(), *space.sample(candidates, np.random.default_rng(0))]
                cfgs = pool
            resolver = lambda m, c: dry_run_types(m, c, imatrix=im)  # noqa: E731
            scored = svc.score_configs(eng.model, table, cfgs, resolver, im)
            ref_x = svc.score_configs(eng.model, table, [Config.parse("default=Q8_0")], imatrix=im)[0].features
            ln_ref, ref_row = None, None
            if corpus is not None:
                ln_ref, ref_row = _reference(eng, ident, store, spec)
            rows = svc.predict_rows(s, scored, ln_ref, ref_x)
            if not config:
                lim = (lambda r: r["size_bytes"] <= budget) if budget else (lambda r: r["bpw"] <= target_bpw)
                seen, picked = set(), []
                for r, x in sorted(zip(rows, scored), key=lambda rx: (rx[0]["kld_pred"], rx[0]["size_bytes"])):
                    if lim(r) and r["types_key"] not in seen:
                        seen.add(r["types_key"])
                        r["tensor_types"] = tensor_type_lines(eng.model, x.config)
                        r["command"] = " ".join(quantize_command(eng.model, x.config, "OUT.gguf", "tensor-types.txt",
                                                                 imatrix=im))  # fmt: skip
                        picked.append(r)
                if not picked:
                    raise InputError("no config fits that budget", "raise --target-size / --target-bpw")
                rows = picked[:top]
    if ref_row:
        rows.append(ref_row)
    if json:
        emit_json(rows)
        return
    t = Table(title=f"{path.name} · surrogate prediction ({rows[0]['mode']})", show_edge=False)
    calibrated = all(r.get("interval_calibrated", True) for r in rows)
    for c in ("config", "size MB", "bpw", "KLD predicted", "80% interval" if calibrated else "interval (uncalibrated)", "notes"):
        t.add_column(c, justify="left" if c in ("config", "notes") else "right", no_wrap=c == "config")
    for r in rows:
        note = "measured reference" if r.get("reference") else "; ".join(r["out_of_range"]) or ""
        t.add_row(r["config"][:70], fmt_mb(r["size_bytes"]), f"{r['bpw']:.3f}", f"{r['kld_pred']:.4f}",
                  f"{r['kld_lo']:.4f} – {r['kld_hi']:.4f}", note)  # fmt: skip
    out.print(t)
    if not calibrated:
        err.print("the interval is not calibrated (too few families with references to calibrate zero-shot "
                  "predictions): it is twice the reference mode's width, a guess, not an 80% interval")
    for r in rows:
        if "command" in r:
            out.print(f"{r['config']}: {r['command']}  # with tensor-types.txt: {' '.join(r['tensor_types'])}",
                      highlight=False, soft_wrap=True)  # fmt: skip


def _reference(eng, ident, store: Path | None, spec) -> tuple[float, dict]:
    """ln KLD of the Q8_0 reference in this context (corpus, slice, imatrix): a stored record if there is one,
    else measured."""
    import math

    from mqpredict.quant.config import Config
    from mqpredict.records.context import Context
    from mqpredict.records.store import Store

    here = Context.of(eng, ident.model_id, spec)
    if store is not None and (store / "STORE.json").exists():
        for r in Store(store).records():
            v = r.values
            if v["config"] == "preset=Q8_0" and v["status"] == "ok" and here.matches(v):
                return math.log(v["kld_mean"]), {"config": "preset=Q8_0", "size_bytes": v["size_bytes"], "bpw": v["bpw"],
                                                  "kld_pred": v["kld_mean"], "kld_lo": v["kld_mean"], "kld_hi": v["kld_mean"],
                                                  "mode": "reference", "reference": True, "out_of_range": []}  # fmt: skip
    m = eng.measure(Config.parse("Q8_0"))
    return math.log(m.stats.kld_mean), {"config": m.config, "size_bytes": m.size_bytes, "bpw": m.bpw,
                                        "kld_pred": m.stats.kld_mean, "kld_lo": m.stats.kld_mean,
                                        "kld_hi": m.stats.kld_mean, "mode": "reference", "reference": True,
                                        "out_of_range": []}  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command()(predict)
