"""``mqpredict campaign run|resume``, ``propose`` and ``report``: the main job and its outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import json as js
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mqpredict.cli.common import (
    DEFAULTS, CtxOpt, EngineName, EngineOpt, ExperimentOpt, ImatrixOpt, JsonOpt, LlamaBinOpt, NoImatrixOpt, NoTrackOpt,
    ScoringOpt, ThreadsOpt, TrackingUriOpt, emit_json, err, imatrix_or_default, load_imatrix, make_engine,
    make_tracker, out, progress_bar, scoring_for,
)  # fmt: skip
from mqpredict.cli.model_cmds import BaseArg, _base
from mqpredict.errors import InputError
from mqpredict.measure.corpus import Scoring

app = typer.Typer(help="The main job: propose likely nonlinear wins, confirm them for real, report the survivors.",
                  no_args_is_help=True)  # fmt: skip

CAMPAIGN_TOKENS = 2048  # 8 windows of 512: the search slice (the next 8 are held out)
StoreOpt = Annotated[Path | None, typer.Option("--store", help="Records store (default: $MQPREDICT_STORE or ./records).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Campaign folder: state, survivors table, plot, recipes.")]
TargetSizeOpt = Annotated[str | None, typer.Option("--target-size", help="Pick the best survivor up to this file size (3.2GB).")]
TargetBpwOpt = Annotated[float | None, typer.Option("--target-bpw", help="… or up to this bpw.")]
VramOpt = Annotated[str | None, typer.Option("--vram", help="… or that runs in this VRAM (24GB) at --vram-ctx: weights + "
                                             "F16 KV cache + a stated compute allowance.")]  # fmt: skip
VramCtxOpt = Annotated[int, typer.Option("--vram-ctx", help="Context length for --vram and the VRAM column.")]
SpacingOpt = Annotated[float, typer.Option("--spacing", help="Survivors closer than this many bpw collapse to one.")]
MinGainOpt = Annotated[float, typer.Option("--min-gain", help="ln KLD a bigger survivor must gain over a smaller one.")]
ExecutorOpt = Annotated[str, typer.Option("--executor", help="Where measurements run: local (here, one after another) or "
                                          "ray (each build+measure a Ray task; see docs/scale-out.md).")]  # fmt: skip
AddressOpt = Annotated[str, typer.Option("--address", help="Ray cluster: auto (the one `ray start` made on this node) "
                                         "or HEAD:PORT.")]  # fmt: skip
TaskCpusOpt = Annotated[float, typer.Option("--task-cpus", help="CPUs per measurement task (also llama.cpp's threads).")]
TaskGpusOpt = Annotated[float, typer.Option("--task-gpus", help="GPUs per measurement task (tools engine with your GPU "
                                            "build: --engine tools --llama-bin DIR).")]  # fmt: skip
TaskMemOpt = Annotated[str | None, typer.Option("--task-memory", help="Memory a task needs (e.g. 48GB), for Ray's placement.")]
RetriesOpt = Annotated[int, typer.Option("--retries", help="Re-runs of a task whose worker died; then it is recorded failed.")]
SyncOpt = Annotated[bool, typer.Option("--sync", help="Ray, synchronous: batches of --batch, results in order — the "
                                       "same records as --executor local for the same seed and budget. Default: "
                                       "asynchronous (refit and ask whenever a worker is free; records may differ).")]  # fmt: skip
ShipOpt = Annotated[str, typer.Option("--ship", help="How base and corpus reach workers: auto (shared path, else Ray's "
                                      "object store up to 256 MB), path, object-store.")]  # fmt: skip


def _executor_options(executor: str, address: str, task_cpus: float, task_gpus: float, task_memory: str | None,
                      retries: int, sync: bool, ship: str, llama_bin):  # fmt: skip
    from mqpredict.execute.factory import ExecutorName, ExecutorOptions, Ship
    from mqpredict.report.budget import parse_size

    try:
        kind, how = ExecutorName(executor), Ship(ship)
    except ValueError:
        raise InputError(f"--executor {executor!r} / --ship {ship!r}: use local|ray and auto|path|object-store") from None
    return ExecutorOptions(kind, address, task_cpus, task_gpus, parse_size(task_memory, "--task-memory") if task_memory else None,
                           retries, sync, how, str(llama_bin) if llama_bin else None)  # fmt: skip


def _store(store: Path | None):
    from mqpredict.records.store import Store, default_store

    return Store(store or default_store())


def campaign_imatrix(st, imatrix: Path | None = None):
    """The importance matrix a campaign quantizes with (its own, or ``imatrix`` if that is the same file)."""
    if not st.imatrix_id:
        if imatrix is not None:
            raise InputError(f"this campaign quantizes without an imatrix; --imatrix {imatrix} would change that",
                             "start a new campaign (another --out) to use one")  # fmt: skip
        return None
    im = load_imatrix(imatrix or Path(st.imatrix))
    if im.id != st.imatrix_id:
        raise InputError(f"{im.path} is not the imatrix this campaign quantizes with (id {im.id}, the campaign's "
                         f"{st.imatrix_id})", f"restore {st.imatrix}, or pass that file with --imatrix")  # fmt: skip
    return im


def _engine_of(st, llama_bin, threads: int, progress, imatrix: Path | None = None):
    """The engine a campaign ran on (its base, corpus, imatrix, search slice and engine kind), per-token KLD kept."""
    return make_engine(Path(st.base), Path(st.corpus_path), st.search, EngineName(st.engine), llama_bin, threads,
                       False, progress, tools_kld="logits", imatrix=campaign_imatrix(st, imatrix))  # fmt: skip


def _types(text: str) -> tuple[str, ...]:
    """``--types Q8_0,Q6_K,…`` → quant type names (checked)."""
    from mqpredict.quant.types import TARGET_TYPES

    names = [t.strip().upper() for t in text.split(",") if t.strip()]
    known = {t.name for t in TARGET_TYPES}
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise InputError(f"--types {text!r}: {', '.join(bad) or 'no type'} is not a quant type llama.cpp writes",
                         "give type names separated by commas, e.g. Q8_0,Q6_K,Q4_K")  # fmt: skip
    return tuple(dict.fromkeys(names))


def _budget(target_size, target_bpw, vram, vram_ctx):
    from mqpredict.report.budget import Budget, parse_size

    return Budget(parse_size(target_size) if target_size else None, target_bpw,
                  parse_size(vram, "--vram") if vram else None, vram_ctx)  # fmt: skip


def _run(campaign, rules, budget, vram_ctx, json: bool) -> None:
    from mqpredict.report.campaign_report import write_report

    holder = {}
    # stdout carries only the result: what a cluster prints (Ray's "(raylet) …" notices) goes to stderr
    with contextlib.redirect_stdout(sys.stderr), campaign.executor:
        res = campaign.run(on_finish=lambda c: holder.setdefault("report", write_report(c, rules, budget, vram_ctx)))
    rep = holder["report"]
    doc = {"campaign_id": res.state.id, "out": str(campaign.out), "store": str(campaign.store.root),
           "confirmations": res.spent, "budget": campaign.settings.budget, "wins": rep.wins,
           "forward_tokens": res.forward_tokens, "stopped": res.stopped, "survivors": rep.rows,
           "chosen": rep.chosen, "table": str(rep.table_md), "plot": str(rep.plot),
           "executor": campaign.executor.describe()}  # fmt: skip
    if json:
        emit_json(doc)
        return
    _print_survivors(rep.rows, f"survivors · {campaign.engine.model.name}")
    out.print(f"{res.spent}/{campaign.settings.budget} confirmations · {rep.wins} re-confirmed nonlinear win(s) · "
              f"{res.forward_tokens:,} forward-pass tokens · {res.stopped}", highlight=False)  # fmt: skip
    out.print(f"table: {rep.table_md}\nplot:  {rep.plot}", highlight=False)


def _print_survivors(rows: list[dict], title: str) -> None:
    import math

    from mqpredict.report.write import found_by

    t = Table(title=title, show_edge=False)
    speed = any("speed_tg_ts" in r for r in rows)
    cols = ("name", "size MB", "bpw", "KLD mean", "p99", "vs line", "held-out", "win", "from") + (("pp t/s", "tg t/s") if speed else ())
    for c in cols + ("config",):
        t.add_column(c, justify="left" if c in ("name", "config", "win", "from") else "right", no_wrap=c == "name")
    pct = lambda x: "" if x is None else f"{100 * math.expm1(x):+.1f}%"  # noqa: E731
    for r in rows:
        sp = (f"{r['speed_pp_ts']:.1f}", f"{r['speed_tg_ts']:.1f}") if speed else ()
        t.add_row(("* " if r["chosen"] else "") + r["name"], f"{r['size_mb']:.2f}", f"{r['bpw']:.3f}", f"{r['kld_mean']:.4f}",
                  f"{r['kld_p99']:.3f}", pct(r["margin_ln"]), pct(r["heldout_margin_ln"]), "yes" if r["nonlinear_win"] else "",
                  found_by(r["source"]), *sp, r["effective_config"][:60])  # fmt: skip
    out.print(t)


@app.command("run")
def run(
    base: BaseArg = "smollm2",
    corpus: Annotated[Path, typer.Option("--corpus", help="UTF-8 evaluation text (default: the bundled corpus).")] = DEFAULTS["corpus"],
    budget: Annotated[int, typer.Option("--budget", help="Confirmations to spend: proposed configs measured (full or "
                                        "stopped early) and held-out re-confirmations; seeds are free.")] = 20,  # fmt: skip
    batch: Annotated[int, typer.Option("--batch", help="Configs proposed per round (spread over the size range).")] = 4,
    imatrix: ImatrixOpt = None,
    no_imatrix: NoImatrixOpt = False,
    out_dir: OutOpt = Path("out/campaign"),
    store: StoreOpt = None,
    ctx: CtxOpt = DEFAULTS["ctx"],
    tokens: Annotated[int, typer.Option("--tokens", help="Scored tokens of the search slice; the same number right "
                                        "after it is held out for re-confirmation.")] = CAMPAIGN_TOKENS,  # fmt: skip
    probes: Annotated[str, typer.Option("--probes", help="Isolation probes first: auto (when the model is outside the "
                                        "surrogate's range and they fit the budget), yes, no.")] = "auto",  # fmt: skip
    alpha: Annotated[float, typer.Option("--alpha", help="One-sided level of every paired test (t over windows; "
                                         "Bonferroni/Holm-corrected where several are made).")] = 0.05,  # fmt: skip
    stage: Annotated[float, typer.Option("--stage", help="First stage of a confirmation, as a share of the search slice.")] = 0.25,
    stop_at_line: Annotated[bool, typer.Option("--stop-at-line", help="Stop a confirmation whose first stage is "
                                               "significantly above the presets' line (cheaper: only likely wins are "
                                               "measured in full). Default: stop only one a measured config of at most "
                                               "its size beats, so the hybrids between the presets are measured too.")] = False,  # fmt: skip
    warm_start: Annotated[int, typer.Option("--warm-start", help="Configs of the zero-run allocator (`mqpredict allocate`) "
                                            "measured first, at sizes spread over the presets' range: the free answers "
                                            "the search has to beat (-1: a fifth of the budget, at most 4; 0: none).")] = -1,  # fmt: skip
    seed: Annotated[int, typer.Option("--seed", help="Seed of the search and the surrogate.")] = 0,
    scoring: ScoringOpt = None,
    types: Annotated[str | None, typer.Option("--types", help="Comma-separated quant types the search may give a group "
                                              "(default: Q8_0,Q6_K,Q5_K,Q5_0,Q4_K,Q4_0,IQ4_NL,IQ4_XS,Q3_K,Q2_K; "
                                              "F16 is always allowed for embeddings and lm_head).")] = None,  # fmt: skip
    only: Annotated[list[str] | None, typer.Option("--only", metavar="PRESET", help="Seed only this preset "
                                                   "(repeatable; Q8_0, the reference, always joins): a cheap line on a "
                                                   "big model, e.g. --only Q6_K --only Q4_K_M --only Q3_K_M.")] = None,  # fmt: skip
    force: Annotated[bool, typer.Option("--force", help="Start over in --out even if it holds a campaign with other "
                                        "settings (its state and report go; the records store keeps every record).")] = False,  # fmt: skip
    engine: EngineOpt = EngineName.inprocess,
    llama_bin: LlamaBinOpt = None,
    threads: ThreadsOpt = 0,
    target_size: TargetSizeOpt = None,
    target_bpw: TargetBpwOpt = None,
    vram: VramOpt = None,
    vram_ctx: VramCtxOpt = 8192,
    spacing: SpacingOpt = 0.1,
    min_gain: MinGainOpt = 0.02,
    executor: ExecutorOpt = "local",
    address: AddressOpt = "auto",
    task_cpus: TaskCpusOpt = 1,
    task_gpus: TaskGpusOpt = 0,
    task_memory: TaskMemOpt = None,
    retries: RetriesOpt = 2,
    sync: SyncOpt = False,
    ship: ShipOpt = "auto",
    tracking_uri: TrackingUriOpt = None,
    experiment: ExperimentOpt = None,
    no_track: NoTrackOpt = False,
    json: JsonOpt = False,
) -> None:
    """Run a campaign on one base: seed the presets → fit the surrogate → propose → confirm for real → refit.

    Every build is quantized with an importance matrix — by default one computed (and cached) on the
    shipped calibration text, which is disjoint from the evaluation corpus; --imatrix FILE uses yours,
    --no-imatrix none. With one, the seed line also holds the presets made for it (IQ3_M … IQ1_S).

    Ends with the survivors table (survivors.md/.csv), the Pareto plot (pareto.png) and per-survivor
    recipes + build manifests in --out. Stop it any time (Ctrl-C, kill -9): `campaign resume DIR`
    continues with nothing lost and nothing measured twice. Default: SmolLM2-135M + the bundled corpus.
    With --executor ray the measurements run as Ray tasks on a cluster; this process stays the only
    writer of the store and MLflow.
    """
    from mqpredict.measure.corpus import EvalSpec
    from mqpredict.report.survivors import Rules
    from mqpredict.workflows.campaign import Campaign, Probes, Settings

    if budget < 1 or batch < 1:
        raise InputError("--budget and --batch must be at least 1")
    try:
        pm = Probes(probes)
    except ValueError:
        raise InputError(f"--probes {probes!r} is not one of: auto, yes, no") from None
    settings = Settings(budget=budget, batch=batch, stage_fraction=stage, alpha=alpha, probes=pm, seed=seed,
                        warm_start=warm_start, presets=tuple(only or ()), stop_at_line=stop_at_line,
                        **({"types": _types(types)} if types is not None else {}))  # fmt: skip
    spec = EvalSpec.from_tokens(tokens, ctx, scoring=scoring_for(scoring, engine))
    rules, bud = Rules(spacing, min_gain, alpha), _budget(target_size, target_bpw, vram, vram_ctx)
    xo = _executor_options(executor, address, task_cpus, task_gpus, task_memory, retries, sync, ship, llama_bin)
    with progress_bar(not json) as progress:
        path = _base(base, progress)
        if only:  # checked before the imatrix is computed: a refusal costs nothing
            from mqpredict.quant.model import ModelInfo
            from mqpredict.workflows.seed import pick_presets

            pick_presets(imatrix is not None or not no_imatrix, bool(ModelInfo.load(path).n_expert), only, reference=True)
        im = imatrix_or_default(path, imatrix, no_imatrix, threads, progress)
        # paired decisions need per-token KLD: the tools engine scores llama-perplexity's saved log-probs
        eng = make_engine(path, corpus, spec, engine, llama_bin, threads, False, progress, tools_kld="logits", imatrix=im)
        with eng:
            c = Campaign.start(eng, _store(store), out_dir, settings, force, tracker=make_tracker(no_track, tracking_uri, experiment),
                               say=lambda s: err.print(s, highlight=False), progress=progress,
                               executor=xo.build(eng, settings.batch))  # fmt: skip
            _run(c, rules, bud, vram_ctx, json)


@app.command("resume")
def resume(
    out_dir: Annotated[Path, typer.Argument(help="The campaign folder (its --out).")] = Path("out/campaign"),
    store: StoreOpt = None,
    budget: Annotated[int | None, typer.Option("--budget", help="Raise (or keep) the budget.")] = None,
    imatrix: Annotated[Path | None, typer.Option("--imatrix", help="The campaign's imatrix, if it moved (checked by "
                                                 "content: it must be the same file).")] = None,  # fmt: skip
    threads: ThreadsOpt = 0,
    llama_bin: LlamaBinOpt = None,
    executor: ExecutorOpt = "local",
    address: AddressOpt = "auto",
    task_cpus: TaskCpusOpt = 1,
    task_gpus: TaskGpusOpt = 0,
    task_memory: TaskMemOpt = None,
    retries: RetriesOpt = 2,
    sync: SyncOpt = False,
    ship: ShipOpt = "auto",
    tracking_uri: TrackingUriOpt = None,
    experiment: ExperimentOpt = None,
    no_track: NoTrackOpt = False,
    json: JsonOpt = False,
) -> None:
    """Continue a campaign after Ctrl-C or kill -9 (or with a larger --budget): what is in the store stays.

    Only what the store does not hold is measured again (a Ray campaign's tasks die with its driver: resume
    with the same --executor ray options, or any other executor)."""
    import dataclasses

    from mqpredict.report.survivors import Rules
    from mqpredict.report.budget import Budget
    from mqpredict.workflows.campaign import Campaign, State

    st = State.load(out_dir)
    if budget is not None:
        st = dataclasses.replace(st, settings=dataclasses.replace(st.settings, budget=budget))
        st.save(out_dir)
    xo = _executor_options(executor, address, task_cpus, task_gpus, task_memory, retries, sync, ship, llama_bin)
    with progress_bar(not json) as progress:
        eng = _engine_of(st, llama_bin, threads, progress, imatrix)
        with eng:
            c = Campaign(eng, _store(store), out_dir, st, make_tracker(no_track, tracking_uri, experiment),
                         lambda s: err.print(s, highlight=False), progress, executor=xo.build(eng, st.settings.batch))  # fmt: skip
            if c.ident.model_id != st.model_id:
                raise InputError(f"{st.base} is not the base this campaign started on", "restore the file, or start anew")
            _run(c, Rules(alpha=st.settings.alpha), Budget(), 8192, json)


def report(
    out_dir: Annotated[Path, typer.Argument(help="The campaign folder.")] = Path("out/campaign"),
    store: StoreOpt = None,
    target_size: TargetSizeOpt = None,
    target_bpw: TargetBpwOpt = None,
    vram: VramOpt = None,
    vram_ctx: VramCtxOpt = 8192,
    spacing: SpacingOpt = 0.1,
    min_gain: MinGainOpt = 0.02,
    alpha: Annotated[float | None, typer.Option("--alpha", help="Level of the paired test of a real gain (default: "
                                                "the campaign's).")] = None,  # fmt: skip
    speed: Annotated[bool, typer.Option("--speed", help="Build each survivor and measure prompt (pp) and generation "
                                        "(tg) tokens/s with llama-bench on this machine (5 repeats, median ± spread).")] = False,  # fmt: skip
    objective: Annotated[str, typer.Option("--objective", help="How the budget's best survivor is chosen: kld, speed "
                                           "(fastest tg) or balanced (ln KLD − ln tg tok/s); the last two need --speed.")] = "kld",  # fmt: skip
    threads: ThreadsOpt = 0,
    json: JsonOpt = False,
) -> None:
    """(Re)write a campaign's survivors table, Pareto plot, recipes and manifests from the records store;
    --target-size / --target-bpw / --vram pick the best survivor that fits; --speed adds tokens/s."""
    from mqpredict.report.campaign_report import write_report
    from mqpredict.report.survivors import Rules
    from mqpredict.workflows.campaign import Campaign, State

    st = State.load(out_dir)
    with progress_bar(not json) as progress:
        eng = _engine_of(st, None, threads, progress)
        with eng:
            c = Campaign(eng, _store(store), out_dir, st, None, lambda s: err.print(s, highlight=False), progress)
            rep = write_report(c, Rules(spacing, min_gain, alpha if alpha is not None else st.settings.alpha),
                               _budget(target_size, target_bpw, vram, vram_ctx), vram_ctx, speed, objective, threads,
                               progress)  # fmt: skip
    if json:
        emit_json({"out": str(out_dir), "survivors": rep.rows, "chosen": rep.chosen, "wins": rep.wins,
                   "table": str(rep.table_md), "plot": str(rep.plot)})  # fmt: skip
        return
    _print_survivors(rep.rows, f"survivors · {Path(st.base).name}")
    if rep.chosen:
        out.print(f"best within the budget: {rep.chosen['name']} ({rep.chosen['config']})", highlight=False)
    out.print(f"table: {rep.table_md}\nplot:  {rep.plot}", highlight=False)


def propose(
    base: BaseArg,
    n: Annotated[int, typer.Option("--n", help="How many configs to propose.")] = 8,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where to write recipes and commands.")] = Path("out/proposals"),
    corpus: Annotated[Path, typer.Option("--corpus", help="The corpus your measurements use.")] = DEFAULTS["corpus"],
    store: StoreOpt = None,
    ctx: CtxOpt = DEFAULTS["ctx"],
    tokens: Annotated[int, typer.Option("--tokens", help="Scored tokens of your measurements.")] = CAMPAIGN_TOKENS,
    imatrix: ImatrixOpt = None,
    scoring: ScoringOpt = None,
    threads: ThreadsOpt = 0,
    json: JsonOpt = False,
) -> None:
    """Export the next batch as llama-quantize recipes + commands, for measuring on your own GPU machines;
    bring the results back with `mqpredict data import` and propose again.

    Needs this model's presets measured in --store (seed them with `mqpredict seed`, or import yours) in the
    same context: with --imatrix, measured with that imatrix (then the candidates may take the types that need
    one, and the commands quantize with it). Nothing is measured here.
    """
    from mqpredict.measure.corpus import EvalSpec
    from mqpredict.quant.resolve import quantize_command, tensor_type_lines
    from mqpredict.search.policy import Probes
    from mqpredict.surrogate.weight_error import error_table
    from mqpredict.workflows.campaign import Campaign, Settings, State
    from mqpredict.util.atomic import atomic_write_text

    spec = EvalSpec.from_tokens(tokens, ctx, scoring=scoring_for(scoring))
    im = load_imatrix(imatrix)
    with progress_bar(not json) as progress:
        path = _base(base, progress)
        eng = make_engine(path, corpus, spec, EngineName.inprocess, None, threads, False, progress, imatrix=im)
        with eng:
            from mqpredict.records.identity import identify

            ident = identify(eng.model)
            st = State("propose", str(path), eng.corpus.id, str(corpus), eng.name, spec.ctx, spec.n_chunks, 0,
                       ident.model_id, ident.family, Settings(probes=Probes.no), "", str(im.path) if im else "",
                       im.id if im else "", spec.scoring.value)  # fmt: skip
            out_dir.mkdir(parents=True, exist_ok=True)
            c = Campaign(eng, _store(store), out_dir, st, None, lambda s: err.print(s, highlight=False), progress)
            c.all_sources = True
            ok = c._records(spec)
            if ok.empty or not (ok["config"] == "preset=Q8_0").any():
                with_im = f" with imatrix {im.path.name}" if im is not None else " without an imatrix"
                raise InputError(f"{store or 'the store'} holds no measured Q8_0 of {path.name} on this corpus and slice"
                                 f"{with_im}, scoring {spec.scoring.value}",
                                 f"seed it first: mqpredict seed {path} --corpus {corpus} --tokens {tokens} "
                                 f"--scoring {spec.scoring.value}"
                                 + (f" --imatrix {imatrix}" if im is not None else " --no-imatrix"))  # fmt: skip
            table = error_table(eng, ident.model_id, progress=progress)
            policy = c.policy(table)  # the campaign's policy: the same proposals a campaign would make next
            props = policy.ask(c.snapshot(), n)
            rows = []
            for i, p in enumerate(props, 1):
                name = f"proposal-{i:02d}"
                tt = out_dir / f"{name}.tensor-types.txt"
                atomic_write_text(tt, "\n".join(tensor_type_lines(eng.model, p.config)) + "\n")
                cmd = " ".join(quantize_command(eng.model, p.config, f"{name}.gguf", tt.name, imatrix=im))
                rows.append({"name": name, **p.to_json(), "recipe": str(tt), "command": cmd})
            atomic_write_text(out_dir / "proposals.json", js.dumps(rows, indent=2) + "\n")
    if json:
        emit_json(rows)
        return
    for r in rows:
        out.print(f"{r['name']} · {r['bpw']:.3f} bpw · predicted {r['kld_pred']:.4f} [{r['kld_lo']:.4f}, {r['kld_hi']:.4f}]"
                  f"\n  {r['config']}\n  {r['command']}", highlight=False, soft_wrap=True)  # fmt: skip
    out.print(f"wrote {out_dir / 'proposals.json'} and the recipes; measure them, then `mqpredict data import`", highlight=False)


def clone(
    variant: Annotated[Path, typer.Argument(help="A fine-tune of the campaign's base (same architecture and shapes).")],
    from_dir: Annotated[Path, typer.Option("--from", help="The campaign folder whose survivors to apply.")],
    survivor: Annotated[list[str] | None, typer.Option("--survivor", help="Survivor name(s) from survivors.csv "
                                                       "(default: the re-confirmed wins, else the chosen one).")] = None,  # fmt: skip
    corpus: Annotated[Path | None, typer.Option("--corpus", help="Evaluation text (default: the campaign's).")] = None,
    imatrix: Annotated[Path | None, typer.Option("--imatrix", help="The variant's own importance matrix (default: the "
                                                 "campaign's, if it quantized with one — same tensors and shapes).")] = None,  # fmt: skip
    keep: Annotated[Path | None, typer.Option("--out", "-o", help="Folder to keep the built GGUFs in.")] = None,
    store: StoreOpt = None,
    scoring: Annotated[Scoring | None, typer.Option("--scoring", help="stream or windows (default: the campaign's).",
                                                    case_sensitive=False)] = None,  # fmt: skip
    threads: ThreadsOpt = 0,
    json: JsonOpt = False,
) -> None:
    """Apply a campaign's survivor to a variant of its base: check the tensor layout matches, build it,
    and confirm it with real KLD runs against the variant's own weights — with the two presets of the
    campaign's line around it, so the margin to the line is measured on the variant."""
    import pandas as pd

    from mqpredict.quant.config import Config
    from mqpredict.quant.model import ModelInfo
    from mqpredict.workflows.campaign import State
    from mqpredict.search.clone import check_layout, clone as do_clone
    from mqpredict.pareto import Line, Point
    from mqpredict.search.paired import line_weights

    st = State.load(from_dir)
    table_path = from_dir / "survivors.csv"
    if not table_path.exists():
        raise InputError(f"{from_dir} has no survivors.csv", f"write it with: mqpredict report {from_dir}")
    table = pd.read_csv(table_path)
    if survivor:
        missing = [n for n in survivor if n not in set(table["name"])]
        if missing:
            raise InputError(f"no survivor named {missing[0]} in {table_path}", f"one of: {', '.join(table['name'])}")
        picked = table[table["name"].isin(survivor)]
    else:
        picked = table[table["nonlinear_win"]]
        if picked.empty:
            picked = table[table["chosen"]] if table["chosen"].any() else table[table["source"] != "preset"].head(1)
    if picked.empty:
        raise InputError(f"{table_path} holds no win, no chosen survivor and no hybrid", "give --survivor NAME")
    check_layout(ModelInfo.load(st.base), ModelInfo.load(variant))
    from mqpredict.records.context import Context

    recs = _store(store).load()
    ctx = Context(st.model_id, st.corpus, st.ctx, st.search.n_batch, st.chunk_offset, st.n_chunks,
                  st.search.scoring.value, st.imatrix_id or None)  # fmt: skip
    pres = recs[ctx.mask(recs) & (recs["source"] == "preset") & (recs["status"] == "ok")]
    line = Line.from_presets([Point(float(r.bpw), float(r.kld_mean), r.config) for r in pres.itertuples()])
    spec = st.search if scoring is None else dataclasses.replace(st.search, scoring=Scoring(scoring))
    results = []
    with progress_bar(not json) as progress:
        im = load_imatrix(imatrix) if imatrix is not None else (load_imatrix(Path(st.imatrix)) if st.imatrix_id else None)
        if im is not None and imatrix is None:
            err.print(f"quantizing the variant with the campaign's imatrix {im.path.name} (same tensors); --imatrix "
                      "gives the variant's own", highlight=False)  # fmt: skip
        eng = make_engine(variant, corpus or Path(st.corpus_path), spec, EngineName.inprocess, None, threads, False,
                          progress, imatrix=im)  # fmt: skip
        with eng:
            for r in picked.itertuples():
                ws = line_weights(line, float(r.bpw)) or []
                around = [Config.parse(name) for w, name in ws if w > 0]
                err.print(f"{r.name}: building and measuring on {variant.name} with {', '.join(c.key for c in around) or 'no preset'}",
                          highlight=False)  # fmt: skip
                out_file = keep / f"{variant.stem}-{r.name}.gguf" if keep else None
                if keep:
                    keep.mkdir(parents=True, exist_ok=True)
                results.append({"name": r.name, **do_clone(eng, Config.parse(r.config), float(r.kld_mean), around, out_file).to_json(),
                                "gguf": str(out_file) if out_file else None})  # fmt: skip
    if json:
        emit_json(results)
        return
    import math

    for x in results:
        mg = "" if x["margin_ln"] is None else f" · {100 * math.expm1(x['margin_ln']):+.1f}% ± {100 * x['margin_se']:.1f}% vs the line on the variant"
        out.print(f"{x['name']}: KLD {x['kld_mean']:.4f} on {variant.name} (campaign base: {x['campaign_kld_mean']:.4f}){mg}"
                  + (f" · kept {x['gguf']}" if x["gguf"] else ""), highlight=False)  # fmt: skip


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="campaign")
    root.command()(propose)
    root.command()(report)
    root.command()(clone)
