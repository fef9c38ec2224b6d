"""Real measurements: ``measure`` (configs or ready GGUFs against a base) and ``demo`` (the main job)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mqpredict.cli.common import (
    DEFAULTS,
    ConfigsOpt,
    CorpusOpt,
    CtxOpt,
    EngineName,
    EngineOpt,
    ImatrixOpt,
    JsonOpt,
    LlamaBinOpt,
    OffsetOpt,
    QuantizedBaseOpt,
    ScoringOpt,
    ExperimentOpt,
    NoTrackOpt,
    ThreadsOpt,
    TokensOpt,
    ToolsKLDOpt,
    TrackingUriOpt,
    base_notes,
    emit_json,
    err,
    fmt_mb,
    load_imatrix,
    make_engine,
    make_tracker,
    out,
    progress_bar,
    scoring_for,
    spec_from,
)
from mqpredict.cli.model_cmds import BaseArg, _base
from mqpredict.errors import InputError

#: the demo's hybrids: on SmolLM2 only ffn_down can hold a K-quant, so it keeps Q6_K over a lighter body
DEMO_HYBRIDS = ("default=Q5_0,ffn_down=Q6_K", "default=IQ4_NL,ffn_down=Q6_K")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)[:120]


def run_measurements(engine, configs, files, keep: Path | None, progress, tracker=None, kind: str = "measure") -> list[dict]:
    """Measure configs and ready GGUFs; each measurement becomes an MLflow run under one parent run."""
    from mqpredict.records.convert import from_measurement
    from mqpredict.records.identity import identify
    from mqpredict.records.schema import Source
    from mqpredict.tracking import Tracker

    tracker = tracker or Tracker()
    ident = identify(engine.model) if tracker.enabled else None
    rows = []
    total = len(configs) + len(files)
    params = {"corpus": engine.corpus.id, "ctx": engine.spec.ctx, "n_chunks": engine.spec.n_chunks,
              "scoring": engine.spec.scoring.value, "imatrix_id": engine.imatrix_id,
              "engine": engine.name, "llama_version": engine.version()}  # fmt: skip
    with tracker.parent(kind, ident.columns() if ident else {}, params):
        for i, item in enumerate([*configs, *files]):
            progress("configs", i, total)
            is_file = i >= len(configs)
            err.print(f"[{i + 1}/{total}] {item if is_file else item.key}", highlight=False)
            if is_file:
                m = engine.measure_file(item)
            else:
                m = engine.measure(item, keep=keep / f"{_safe(item.key)}.gguf" if keep else None)
            row = m.to_json()
            if ident is not None:
                source = Source.community if is_file else (Source.preset if item.is_preset and not item.groups
                                                           and not item.tensors else Source.hybrid)  # fmt: skip
                row["mlflow_run_id"] = tracker.log_record(from_measurement(engine, ident, m, engine.spec, source), i)
            rows.append(row)
    progress("configs", total, total)
    return rows


def is_plain_preset(config_key: str) -> bool:
    """``preset=Q4_K_M`` exactly: a llama.cpp preset as shipped (with overrides it is a hybrid)."""
    return re.fullmatch(r"preset=[A-Z0-9_]+", config_key) is not None


def short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def print_table(rows: list[dict], title: str | None = None, line: bool = False) -> None:
    """The measurements as a table; with ``line``, each row's position against the presets' line."""
    from mqpredict.pareto import Line, Point, position

    pts = {r["config"]: Point(r["bpw"], r["kld_mean"], r["config"].removeprefix("preset=")) for r in rows}
    presets = [pts[r["config"]] for r in rows if is_plain_preset(r["config"])]
    the_line = Line.from_presets(presets)
    hull = {p.name for p in the_line.hull}
    t = Table(title=title, show_edge=False)
    timed = any(r.get("seconds_eval") is not None for r in rows)
    cols = ("config", "size MB", "bpw", "KLD mean ± err", "median", "p99", "same top", "PPL") + (("s",) if timed else ())
    for c in cols + (("vs presets",) if line else ()):
        t.add_column(c, justify="left" if c in ("config", "vs presets") else "right", no_wrap=c == "config")
    for r in rows:
        p = pts[r["config"]]
        on = is_plain_preset(r["config"]) and p.name in hull
        extra = ("on the line" if on else position(p, the_line, presets),) if line else ()
        t.add_row(
            r.get("label") or short(r["config"]),
            fmt_mb(r["size_bytes"]),
            f"{r['bpw']:.3f}",
            f"{r['kld_mean']:.5f} ± {r['kld_mean_err']:.5f}",
            f"{r['kld_median']:.5f}",
            f"{r['kld_p99']:.4f}",
            f"{100 * r['same_top_p']:.2f}%",
            f"{r['ppl']:.3f}" if r.get("ppl") is not None else "",
            *((f"{r['seconds_eval']:.1f}",) if timed else ()),
            *extra,
        )
    out.print(t)


def measure(
    base: BaseArg,
    config: ConfigsOpt = None,
    gguf: Annotated[
        list[Path] | None, typer.Option("--gguf", help="A ready quantized GGUF of this base to measure (repeatable).")
    ] = None,
    presets: Annotated[bool, typer.Option("--presets", help="Add the standard llama.cpp presets (with --imatrix, "
                                          "also the presets made for one: IQ3_M … IQ1_S).")] = False,  # fmt: skip
    imatrix: ImatrixOpt = None,
    corpus: CorpusOpt = DEFAULTS["corpus"],
    ctx: CtxOpt = DEFAULTS["ctx"],
    tokens: TokensOpt = DEFAULTS["tokens"],
    chunk_offset: OffsetOpt = 0,
    scoring: ScoringOpt = None,
    engine: EngineOpt = EngineName.inprocess,
    llama_bin: LlamaBinOpt = None,
    tools_kld: ToolsKLDOpt = "statistics",
    threads: ThreadsOpt = 0,
    keep: Annotated[Path | None, typer.Option("--keep", help="Keep the built GGUFs in this folder.")] = None,
    allow_quantized_base: QuantizedBaseOpt = False,
    tracking_uri: TrackingUriOpt = None,
    experiment: ExperimentOpt = None,
    no_track: NoTrackOpt = False,
    json: JsonOpt = False,
) -> None:
    """Measure configs for real with llama.cpp: exact size + KLD statistics against the base, one row per config.

    Statistics follow llama-perplexity --kl-divergence (same formulas): mean KLD ± error, median,
    p90/p95/p99/p99.9, max, same-top (fraction), Δp, PPL of both models, ln(PPL ratio). --scoring windows
    scores llama-perplexity's very tokens; stream (default) one pass through the KV cache at about half the
    cost. Rows come back in the order the configs were given; per-token KLD vectors are kept (per_token_path).
    """
    from mqpredict.quant.config import Config
    from mqpredict.quant.presets import IMATRIX_PRESETS, STANDARD_PRESETS

    configs = [Config.parse(c) for c in config or []]
    if presets:
        extra = IMATRIX_PRESETS if imatrix is not None else ()
        configs = [Config.from_preset(p) for p in (*STANDARD_PRESETS, *extra)] + configs
    files = list(gguf or [])
    if not configs and not files:
        raise InputError("nothing to measure", "give --config CFG (repeatable), --presets or --gguf FILE")
    spec = spec_from(ctx, tokens, chunk_offset, scoring_for(scoring, engine))
    with progress_bar() as progress:
        path = _base(base, progress)
        eng = make_engine(path, corpus, spec, engine, llama_bin, threads, allow_quantized_base, progress, tools_kld,
                          load_imatrix(imatrix))  # fmt: skip
        with eng:
            rows = run_measurements(eng, configs, files, keep, progress, make_tracker(no_track, tracking_uri, experiment))
    if json:
        emit_json(rows)
    else:
        from mqpredict.quant.model import ModelInfo

        title = f"{path.name} · {spec.n_chunks}×{spec.ctx} {spec.scoring.value} ({spec.n_tokens} tokens scored) · {engine.value}"
        print_table(rows, title, line=sum(r["config"].startswith("preset=") for r in rows) >= 2)
        out.print(base_notes(ModelInfo.load(path)), highlight=False)


def demo(
    engine: EngineOpt = EngineName.inprocess,
    scoring: ScoringOpt = None,
    threads: ThreadsOpt = 0,
    tracking_uri: TrackingUriOpt = None,
    experiment: ExperimentOpt = None,
    no_track: NoTrackOpt = False,
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write measurements.json.")] = Path("out/demo"),
    json: JsonOpt = False,
) -> None:
    """The main job on the embedded default: SmolLM2-135M (restored base) + the bundled corpus.

    Prepares the base on first use, measures the standard llama.cpp presets and two hybrids, prints the
    table sorted by size and writes out/demo/measurements.json.
    """
    import json as js

    from mqpredict.base.embedded import EMBEDDED
    from mqpredict.quant.config import Config
    from mqpredict.quant.model import ModelInfo
    from mqpredict.quant.presets import STANDARD_PRESETS
    from mqpredict.util.atomic import atomic_write_text
    from mqpredict.util.paths import DEFAULT_CORPUS

    configs = [Config.from_preset(p) for p in STANDARD_PRESETS] + [Config.parse(h) for h in DEMO_HYBRIDS]
    spec = spec_from(DEFAULTS["ctx"], DEFAULTS["tokens"], 0, scoring_for(scoring, engine))
    with progress_bar() as progress:
        path = _base("smollm2", progress)
        eng = make_engine(path, DEFAULT_CORPUS, spec, engine, None, threads, False, progress)
        with eng:
            rows = run_measurements(eng, configs, [], None, progress, make_tracker(no_track, tracking_uri, experiment),
                                    kind="demo")  # fmt: skip
    rows.sort(key=lambda r: r["size_bytes"])
    atomic_write_text(out_dir / "measurements.json", js.dumps(rows, indent=2) + "\n")
    if json:
        emit_json(rows)
        return
    m = ModelInfo.load(path)
    print_table(rows, f"SmolLM2-135M · {spec.n_chunks}×{spec.ctx} {spec.scoring.value} ({spec.n_tokens} tokens scored) · "
                      f"{engine.value}", True)  # fmt: skip
    out.print(f"{base_notes(m)}. Source: {EMBEDDED['smollm2'].package} ({EMBEDDED['smollm2'].licence}).",
              highlight=False)  # fmt: skip
    out.print(f"wrote {out_dir / 'measurements.json'}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(measure)
    app.command()(demo)
