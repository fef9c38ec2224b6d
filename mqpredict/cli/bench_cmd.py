"""``mqpredict bench …``: benchmarks that print ratios measured side by side in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mqpredict.cli.common import DEFAULTS, CorpusOpt, CtxOpt, JsonOpt, ThreadsOpt, TokensOpt, emit_json, out, progress_bar
from mqpredict.cli.model_cmds import BaseArg, _base
from mqpredict.errors import InputError

app = typer.Typer(help="Benchmarks (ratios measured side by side in one run; never timed unit tests).",
                  no_args_is_help=True)  # fmt: skip


@app.command()
def measure(
    base: BaseArg = "smollm2",
    corpus: CorpusOpt = DEFAULTS["corpus"],
    ctx: CtxOpt = DEFAULTS["ctx"],
    tokens: TokensOpt = DEFAULTS["tokens"],
    threads: ThreadsOpt = 0,
    repeats: Annotated[int, typer.Option(help="Side-by-side repetitions per config.")] = 2,
    json: JsonOpt = False,
) -> None:
    """Seconds per config: InProcessEngine vs llama-perplexity --kl-divergence (same files, interleaved), stream
    scoring per scored token against the tool's, and seconds per hybrid build: stitching vs llama-quantize
    --tensor-type-file. Prints the ratios."""
    from mqpredict.bench.measure import BUILD_CONFIG, EVAL_CONFIGS, llama_perplexity_version, run
    from mqpredict.cli.common import spec_from

    spec = spec_from(ctx, tokens, 0)
    with progress_bar() as progress:
        res = run(_base(base, progress), corpus, spec, threads, repeats, progress)
    if json:
        emit_json({**res.to_json(), "llama_perplexity": llama_perplexity_version()})
        return
    t = Table(title=f"{res.model} · {res.n_chunks}×{res.ctx} · {res.threads} threads · {res.repeats} repeats, "
                    f"interleaved", show_edge=False)  # fmt: skip
    for c in ("what", "mqpredict (s)", "llama.cpp tool (s)", "ratio", "target"):
        t.add_column(c, justify="left" if c == "what" else "right")
    t.add_row(f"evaluate one config ({len(EVAL_CONFIGS)} configs)", f"{res.eval_inprocess_s:.2f}",
              f"{res.eval_tool_s:.2f}", f"{res.eval_ratio:.2f}×", "≤ 1.0× (aim 0.8×)")  # fmt: skip
    t.add_row(f"stream scoring, per scored token ({res.tokens_stream} vs {res.tokens_windows} tokens)",
              f"{res.eval_stream_s:.2f}", f"{res.eval_tool_s:.2f}", f"{res.stream_ratio:.2f}×",
              "≤ 0.55×")  # fmt: skip
    t.add_row("  of which llama_decode alone (forward passes; scoring, I/O, start-up free)", f"{res.decode_stream_s:.2f}",
              f"{res.eval_tool_s:.2f}", f"{res.stream_decode_ratio:.2f}×", "")  # fmt: skip
    t.add_row("  stream / in-process windows, llama_decode alone per scored token", f"{res.decode_stream_s:.2f}",
              f"{res.decode_inprocess_s:.2f} (windows)", f"{res.stream_decode_vs_windows:.2f}×",
              f"floor {res.stream_floor:.2f}×")  # fmt: skip
    t.add_row(f"build {BUILD_CONFIG}", f"{res.build_stitch_s:.3f}", f"{res.build_tool_s:.3f}",
              f"{res.build_ratio:.3f}×", "≤ 0.1×")  # fmt: skip
    out.print(t)
    out.print(
        f"mean KLD agreement between the two: within {100 * res.kld_agreement:.4f}% · one-off set-up: base log-probs "
        f"{res.setup_base_logprobs_s:.1f} s (both engines), stream {res.setup_stream_base_s:.1f} s, pure-quantization "
        f"cache {res.setup_pure_cache_s:.1f} s",
        highlight=False,
    )
    out.print("mean KLD stream / windows: " + ", ".join(f"{c} {r:.3f}" for c, r in res.kld_stream_vs_windows.items()),
              highlight=False)  # fmt: skip


@app.command()
def surrogate(
    base: Annotated[list[str] | None, typer.Argument(help="Models to screen (default: smollm2 and a 256-wide tiny model).")] = None,
    limit: Annotated[int, typer.Option(help="Candidates enumerated per model.")] = 1_000_000,
    model_dir: Annotated[Path, typer.Option("--surrogate", help="The surrogate to screen with.")] = Path("models/default"),
    threads: ThreadsOpt = 0,
    json: JsonOpt = False,
) -> None:
    """Configs scored per second (enumeration, exact sizes, dedup, features, mean prediction; target 10^6 in
    under 10 s), weight-error feature seconds per billion parameters, and the stored CV table."""
    from mqpredict.base.testmodel import write_test_model
    from mqpredict.bench.surrogate import screen
    from mqpredict.surrogate.model import Surrogate
    from mqpredict.util.paths import cache_dir

    s, meta = Surrogate.load(model_dir)
    targets = base or ["smollm2", "tiny-256"]
    results = []
    with progress_bar(not json) as progress:
        for b in targets:
            if b == "tiny-256":
                path = cache_dir() / "bench" / "tiny-256.gguf"
                if not path.exists():
                    write_test_model(path, 0)
            else:
                path = _base(b, progress)
            results.append(screen(path, s, limit, threads, progress).to_json())
    if json:
        emit_json({"screening": results, "cv_summary": meta.get("cv_summary")})
        return
    t = Table(title="surrogate screening (one process, 2 cores)", show_edge=False)
    for c in ("model", "candidates", "distinct files", "enumerate+size+dedup s", "features s", "predict s", "total s",
              "candidates/s", "weight errors s/1e9 params"):  # fmt: skip
        t.add_column(c, justify="left" if c == "model" else "right")
    for r in results:
        t.add_row(r["model"], f"{r['n_candidates']:,}", f"{r['n_unique']:,}", f"{r['seconds_enumerate_size_dedup']:.2f}",
                  f"{r['seconds_features']:.2f}", f"{r['seconds_predict']:.2f}", f"{r['seconds_total']:.2f}",
                  f"{r['per_second']:,.0f}", f"{r['table_seconds_per_billion_params']:.0f}")  # fmt: skip
    out.print(t)
    if meta.get("cv_summary"):
        from mqpredict.cli.surrogate_cmd import print_cv_summary

        print_cv_summary(meta["cv_summary"], f"{model_dir}: leave-one-family-out (stored)")


@app.command()
def weights(
    base: BaseArg = "smollm2",
    imatrix: Annotated[Path | None, typer.Option("--imatrix", help="Also time the new table with this imatrix "
                                                 "(imatrix-weighted, with the low-bit types).")] = None,  # fmt: skip
    reference: Annotated[str, typer.Option("--reference", help="pure: the old method for real (full pure "
                                           "quantizations); rows: its values from its own row picks, quantized in "
                                           "memory (the same bytes, without the 14 quantized copies).")] = "pure",  # fmt: skip
    threads: ThreadsOpt = 2,
    json: JsonOpt = False,
) -> None:
    """The weight-error table two ways, side by side in one run: sampled rows quantized in memory by
    llama.cpp (new) vs one full pure quantization per type (old; written to a temporary folder, removed
    afterwards): seconds, disk, and how far the new values are from the old ones per (group, type)
    (target: within 2%; ≤ 60 s for the 1.5B on 2 cores)."""
    if reference not in ("pure", "rows"):
        raise InputError(f"--reference {reference!r}: use pure or rows")
    from mqpredict.bench.weights import run
    from mqpredict.cli.common import err, load_imatrix

    im = load_imatrix(imatrix)
    with progress_bar(not json) as progress:
        res = run(_base(base, progress), threads, im, progress, say=lambda s: err.print(s, highlight=False),
                  reference=reference)  # fmt: skip
    if json:
        emit_json(res.to_json())
        return
    t = Table(title=f"{res.model} · {res.n_params / 1e6:,.0f}M params · {res.n_types} types · {res.threads} threads",
              show_edge=False)  # fmt: skip
    for c in ("weight-error table", "seconds", "disk written", "vs old"):
        t.add_column(c, justify="left" if c == "weight-error table" else "right")
    if res.reference == "pure":
        t.add_row("old: full pure quantizations", f"{res.old_seconds:.1f}", f"{res.old_disk_bytes / 1e9:.2f} GB", "")
        t.add_row("new: sampled rows in memory", f"{res.new_seconds:.1f}", "0", f"{res.speedup:.1f}× faster")
    else:
        t.add_row("old values, from the old method's own rows in memory", f"{res.old_seconds:.1f}", "0", "")
        t.add_row("new: sampled rows in memory", f"{res.new_seconds:.1f}", "0", "")
    if res.new_imatrix_seconds is not None:
        t.add_row(f"new, imatrix-weighted ({res.new_imatrix_types} types)", f"{res.new_imatrix_seconds:.1f}", "0",
                  f"{res.old_seconds / res.new_imatrix_seconds:.1f}× faster")  # fmt: skip
    out.print(t)
    out.print(f"agreement per (group, type), {res.n_pairs} pairs: median {100 * res.median_rel_diff:.2f}%, max "
              f"{100 * res.max_rel_diff:.2f}% ({res.worst[0]['group']} {res.worst[0]['qtype']}); "
              f"{100 * res.share_within_2pct:.0f}% within 2%", highlight=False)  # fmt: skip


@app.command()
def search(
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per method (0 … N-1).")] = 5,
    budgets: Annotated[str, typer.Option("--budgets", help="Comma-separated budgets, in confirmations (and the same "
                                         "numbers of full runs' forward-pass tokens).")] = "10,20,50,100",
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated: mqpredict, random, greedy, evolutionary, "
                                         "probes, allocator (default: all).")] = "all",
    truth: Annotated[Path | None, typer.Option("--truth", help="Ground-truth folder (default: "
                                               "datasets/ground_truth/tiny256-s0).")] = None,
    json: JsonOpt = False,
) -> None:
    """Search methods simulated on an exhaustively measured space (no llama.cpp runs): the fraction of the
    true Pareto hypervolume found within 10/20/50/100 confirmations (and as many full runs' tokens, so early
    stopping is credited) and the runs until the first true nonlinear win; mean ± std over seeds."""
    from mqpredict.bench.search import DEFAULT_TRUTH, METHODS, Truth, markdown, run
    from mqpredict.cli.common import err

    try:
        bs = [int(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise InputError(f"--budgets {budgets!r} is not a comma-separated list of whole numbers") from None
    if not bs or min(bs) < 1:
        raise InputError("--budgets needs at least one positive budget")
    ms = list(METHODS) if methods.strip() == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    if seeds < 1:
        raise InputError("--seeds must be at least 1")
    t = Truth.load(truth or DEFAULT_TRUTH)
    res = run(t, ms, list(range(seeds)), bs, say=lambda s: err.print(s, highlight=False))
    if json:
        emit_json(res)
        return
    out.print(markdown(res), highlight=False, markup=False)
    out.print(f"\nwall time: {res['seconds']:.0f} s", highlight=False)


@app.command()
def scale(
    base: BaseArg = "smollm2",
    corpus: CorpusOpt = DEFAULTS["corpus"],
    ctx: CtxOpt = DEFAULTS["ctx"],
    tokens: Annotated[int, typer.Option("--tokens", help="Scored tokens of the search slice (as in campaign run).")] = 1024,
    budget: Annotated[int, typer.Option("--budget", help="Confirmations per campaign (the same in every run).")] = 8,
    batch: Annotated[int, typer.Option("--batch", help="Batch size of the campaign's settings.")] = 2,
    workers: Annotated[int, typer.Option("--workers", help="Worker nodes of the larger cluster (compared with 1).")] = 2,
    task_cpus: Annotated[int, typer.Option("--task-cpus", help="CPUs per worker node and task (llama.cpp threads).")] = 1,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per cluster size, alternating the order.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every campaign.")] = 0,
    json: JsonOpt = False,
) -> None:
    """Campaign wall time on a local Ray cluster of 1 vs --workers worker nodes (same base, corpus, budget and
    seed; an untimed warm-up first fills the shared caches), and the driver's overhead per task. Every node
    binds to 127.0.0.1 and is stopped at the end."""
    from mqpredict.bench.scale import run
    from mqpredict.cli.common import err, spec_from

    if workers < 2 or budget < 1 or repeats < 1:
        raise InputError("--workers must be at least 2, --budget and --repeats at least 1")
    spec = spec_from(ctx, tokens, 0)
    with progress_bar() as progress:
        path = _base(base, progress)
    res = run(path, corpus, spec, workers, budget, batch, seed, repeats, task_cpus, lambda s: err.print(s, highlight=False))
    if json:
        emit_json(res.to_json())
        return
    t = Table(title=f"{res.model} · campaign budget {res.budget} · {res.n_chunks}×{res.ctx} · {res.task_cpus} CPU(s) "
                    f"per task · warm-up {res.warmup_s:.0f} s", show_edge=False)  # fmt: skip
    for c in ("workers", "wall (s)", "tasks", "confirmations", "waiting (s)", "submit+land (ms/task)",
              "driver busy (s/task)"):  # fmt: skip
        t.add_column(c, justify="right")
    for r in res.runs:
        t.add_row(str(r.workers), f"{r.wall_s:.1f}", str(r.tasks), str(r.confirmations), f"{r.waited_s:.1f}",
                  f"{r.submit_land_ms_per_task:.1f}", f"{r.driver_busy_s_per_task:.2f}")  # fmt: skip
    out.print(t)
    out.print(f"wall time 1 → {workers} workers: {res.median_wall(1):.1f} s → {res.median_wall(workers):.1f} s "
              f"= {res.speedup(workers):.2f}× faster (medians, measured in this run)", highlight=False)  # fmt: skip


@app.command()
def store(
    records: Annotated[int, typer.Option("--records", help="Records in each store when the timing starts.")] = 10_000,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed rounds, alternating which format goes first.")] = 5,
    json: JsonOpt = False,
) -> None:
    """The records store at community size, SQLite and CSV side by side in one run: appending the
    --records-th record (by a process that has not read the store yet, and by one that has) and loading
    the whole store (first read, and again unchanged). Medians; nothing touches llama.cpp."""
    from mqpredict.bench.store import run

    if records < 2 or repeats < 1:
        raise InputError("--records must be at least 2 and --repeats at least 1")
    with progress_bar(not json) as progress:
        res = run(records, repeats, progress)
    if json:
        emit_json(res.to_json())
        return
    t = Table(title=f"records store with {res.n_records:,} records · median of {res.repeats} rounds", show_edge=False)
    for c in ("format", "append one (s)", "append one, store read before (s)", "load all (s)", "load again (s)",
              "table size (MB)"):  # fmt: skip
        t.add_column(c, justify="left" if c == "format" else "right")
    for f in res.formats:
        t.add_row(f.fmt, f"{f.append_s:.4f}", f"{f.append_warm_s:.4f}", f"{f.load_s:.3f}", f"{f.load_again_s:.4f}",
                  f"{f.table_bytes / 1e6:.1f}")  # fmt: skip
    out.print(t)
    out.print(f"CSV / SQLite: appending {res.append_ratio:.0f}× slower, loading {res.load_ratio:.1f}× slower "
              "(measured side by side in this run)", highlight=False)  # fmt: skip


@app.command()
def faults(
    kills: Annotated[int, typer.Option("--kills", help="SIGKILLs of the campaign, at points drawn across its phases.")] = 20,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the campaign and of the kill points.")] = 0,
    budget: Annotated[int, typer.Option("--budget", help="Confirmations of the campaign.")] = 4,
    work: Annotated[Path | None, typer.Option("--work", help="Keep every run's folders here (default: a temporary "
                                              "folder, removed when nothing was found).")] = None,  # fmt: skip
    json: JsonOpt = False,
) -> None:
    """A campaign on the tiny test model killed with kill -9 at --kills random moments (building, measuring,
    appending to the store, logging to MLflow, writing the report, proposing), resumed after each, and
    compared with the same campaign run without interruption: records lost, duplicated or different,
    per-token files, MLflow runs after `track sync`, the survivors table."""
    from mqpredict.bench.faults import Plan, run
    from mqpredict.cli.common import err

    if kills < 1 or budget < 1:
        raise InputError("--kills and --budget must be at least 1")
    with progress_bar(not json) as progress:
        res = run(Plan(kills=kills, seed=seed, budget=budget), work, lambda s: err.print(s, highlight=False), progress)
    if json:
        emit_json(res)
        return
    t = Table(title=f"{res['kills']} kill -9s of a campaign (budget {budget}, seed {seed}), resumed after each",
              show_edge=False)  # fmt: skip
    t.add_column("phase")
    t.add_column("kills", justify="right")
    t.add_column("points in the timeline", justify="right")
    for p, n in res["kills_by_phase"].items():
        t.add_row(p, str(n), str(res["timeline_by_phase"][p]))
    out.print(t)
    s = res["seconds"]
    out.print(f"records {res['records']} (reference {res['reference_records']}) · lost {res['lost']} · duplicated "
              f"{res['duplicated']} · extra {res['extra']} · differing {res['differing']} · per-token files "
              f"{res['per_token_checked']} checked, {res['per_token_bad']} bad · MLflow runs {res['mlflow_runs']} "
              f"({res['mlflow_duplicated']} duplicated, {res['mlflow_missing']} missing) · campaign runs "
              f"{res['mlflow_campaign_runs']} · survivors table identical: {'yes' if res['report_identical'] else 'NO'}",
              highlight=False)  # fmt: skip
    out.print(f"wall time: reference {s['reference']:.0f} s, killed and resumed {s['faulted']:.0f} s, total "
              f"{s['total']:.0f} s" + ("" if res["ok"] else f" · something was found: see {res.get('work')}"),
              highlight=False)  # fmt: skip
