"""What every command shares: options, output (stdout for results, stderr for the rest), engines."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mqpredict.errors import InputError
from mqpredict.llama.factory import EngineName, make_engine  # noqa: F401  (re-exported: the CLI builds engines by name)
from mqpredict.measure.corpus import DEFAULT_CTX, DEFAULT_TOKENS, EvalSpec, Scoring
from mqpredict.util.paths import DEFAULT_CORPUS

# results (tables); JSON goes through emit_json. Piped output gets a wide console, not rich's 80 columns.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)  # progress, notes, warnings, errors


class State:
    debug = False


# ------------------------------------------------------------------------------------ options
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (logs go to stderr).")]
ConfigsOpt = Annotated[
    list[str],
    typer.Option(
        "--config",
        "-c",
        help="A config: a llama.cpp preset (Q4_K_M), 'default=TYPE,group=TYPE,…', 'tensor:REGEX=TYPE' items, "
        "or a .toml file. Repeat for several.",
    ),
]
CorpusOpt = Annotated[
    Path, typer.Option("--corpus", help="UTF-8 evaluation text (default: the bundled public-domain corpus).")
]
CtxOpt = Annotated[int, typer.Option("--ctx", help="Context window; the second half of each window is scored.")]
TokensOpt = Annotated[
    int, typer.Option("--tokens", help="Scored-token budget; rounded up to whole windows of ctx/2 scored tokens.")
]
OffsetOpt = Annotated[
    int, typer.Option("--chunk-offset", help="First window to score (later windows stay free for held-out runs).")
]
ScoringOpt = Annotated[
    Scoring | None,
    typer.Option("--scoring", help="stream: one pass through the KV cache, every token after the first half window "
                 "scored once (about half the forward passes; the default); windows: llama-perplexity's independent "
                 "windows, its exact numbers (the only mode of --engine tools, and its default).",
                 case_sensitive=False),
]  # fmt: skip
EngineOpt = Annotated[
    EngineName,
    typer.Option("--engine", help="inprocess: llama-cpp-python, stitched builds; tools: llama-quantize/llama-perplexity."),
]
LlamaBinOpt = Annotated[
    Path | None,
    typer.Option("--llama-bin", help="Folder with your own llama-quantize and llama-perplexity (tools engine)."),
]
ToolsKLDOpt = Annotated[
    str,
    typer.Option(
        "--tools-kld",
        help="tools engine: 'statistics' parses llama-perplexity --kl-divergence (falls back to 'logits' if the "
        "tool loses its output); 'logits' scores llama-perplexity's saved log-probs and keeps per-token vectors.",
    ),
]
ThreadsOpt = Annotated[int, typer.Option("--threads", "-t", help="CPU threads for llama.cpp (0: all cores).")]
QuantizedBaseOpt = Annotated[
    bool,
    typer.Option(
        "--allow-quantized-base",
        help="Accept an already-quantized base. Its grid makes its own type look free: prefer `mqpredict base prepare`.",
    ),
]

ImatrixOpt = Annotated[
    Path | None,
    typer.Option("--imatrix", help="Importance matrix to quantize with (GGUF or legacy .dat), as llama-quantize "
                 "--imatrix; `mqpredict imatrix BASE -o FILE` computes one. Needed for IQ1_*/IQ2_*/IQ3_XXS."),
]  # fmt: skip


NoImatrixOpt = Annotated[
    bool,
    typer.Option("--no-imatrix", help="Quantize without an importance matrix. By default one is computed on the "
                 "shipped calibration text (datasets/calibration, disjoint from the evaluation corpus; cached)."),
]  # fmt: skip


def load_imatrix(path: Path | None):
    """The --imatrix file, read and checked (None without one)."""
    if path is None:
        return None
    from mqpredict.quant.imatrix import Imatrix

    return Imatrix.load(path)


def imatrix_or_default(base: Path, path: Path | None, no_imatrix: bool, threads: int, progress):
    """What seeds and campaigns quantize with: --imatrix, none with --no-imatrix, else the (cached) imatrix
    of ``base`` on the shipped calibration text."""
    if path is not None and no_imatrix:
        raise InputError("--imatrix and --no-imatrix contradict each other", "give one of them")
    if no_imatrix:
        return None
    if path is not None:
        return load_imatrix(path)
    from mqpredict.llama.imatrix import ImatrixSettings, compute_imatrix
    from mqpredict.util.paths import DEFAULT_CALIBRATION

    im, cached = compute_imatrix(base, DEFAULT_CALIBRATION, None, ImatrixSettings(), threads, progress)
    err.print(f"imatrix {im.id} ({'cached' if cached else 'computed'} on {im.corpus_id}, {im.chunk_count} windows): "
              f"{im.path} — --no-imatrix to quantize without one", highlight=False)  # fmt: skip
    return im


TrackingUriOpt = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow tracking URI (a team server); default $MLFLOW_TRACKING_URI, else "
                 "the project's experiments/mlflow.db."),  # fmt: skip
]
ExperimentOpt = Annotated[
    str | None, typer.Option("--experiment", help="MLflow experiment (default: one per base model).")
]
NoTrackOpt = Annotated[bool, typer.Option("--no-track", help="Do not log to MLflow.")]


def make_tracker(no_track: bool, uri: str | None, experiment: str | None):
    from mqpredict.tracking import make_tracker as mk

    def warn(msg, *_, **__):
        err.print(f"[yellow]warning:[/] {msg}", highlight=False)

    t = mk(not no_track, uri, experiment)
    if t.enabled:
        t.warn = warn
    return t


DEFAULTS = {"corpus": DEFAULT_CORPUS, "ctx": DEFAULT_CTX, "tokens": DEFAULT_TOKENS}


def scoring_for(scoring: Scoring | None, engine: EngineName = EngineName.inprocess) -> Scoring:
    """--scoring as given, else the default: stream, or windows for the tools engine (which cannot stream)."""
    if scoring is not None:
        return Scoring(scoring)
    return Scoring.windows if engine == EngineName.tools else Scoring.stream


def spec_from(ctx: int, tokens: int, offset: int, scoring: Scoring = Scoring.windows) -> EvalSpec:
    return EvalSpec.from_tokens(tokens, ctx, offset, scoring)


# ------------------------------------------------------------------------------------ output
def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def emit_json(obj) -> None:
    """The one JSON document of a --json command (NaN/inf become null)."""
    print(json.dumps(_clean(obj), indent=2))


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator:
    """A (what, done, total) callback drawing rich progress bars on stderr."""
    if not enabled or not err.is_terminal or os.environ.get("MQPREDICT_NO_PROGRESS"):
        yield lambda what, done, total: None
        return
    prog = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    tasks: dict[str, int] = {}

    def update(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = prog.add_task(what, total=total)
        prog.update(tasks[what], completed=done, total=total)
        if done >= total:
            prog.remove_task(tasks.pop(what))

    with prog:
        yield update


def base_notes(model) -> str:
    """What every report says about its base: where it came from, and where K-quants fall back."""
    fit, back = model.k_quant_groups()
    origin = model.base_origin
    text = f"base {model.path.name}: origin {origin}" + (
        " (restored by seeded in-bin dithering)" if origin.startswith("dither") else ""
    )
    if back:
        text += (
            f"; n_embd {model.n_embd}: K-quants fall back in {', '.join(back)}"
            + (f" — only {', '.join(fit)} can hold them" if fit else "")
        )
    return text


def fmt_mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"
