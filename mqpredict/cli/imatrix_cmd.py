"""``mqpredict imatrix``: an importance matrix computed with llama.cpp (cached)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mqpredict.cli.common import JsonOpt, ThreadsOpt, emit_json, err, progress_bar
from mqpredict.cli.model_cmds import BaseArg, _base
from mqpredict.util.paths import DEFAULT_CALIBRATION


def imatrix(
    base: BaseArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the imatrix (GGUF imatrix format).")],
    corpus: Annotated[Path, typer.Option("--corpus", help="Calibration text (default: the shipped "
                                         "datasets/calibration/calibration.txt, disjoint from the evaluation corpus).")] = DEFAULT_CALIBRATION,  # fmt: skip
    chunks: Annotated[int, typer.Option("--chunks", help="Windows of the calibration text to run (each --ctx tokens).")] = 32,
    ctx: Annotated[int, typer.Option("--ctx", help="Context window of each calibration pass.")] = 512,
    threads: ThreadsOpt = 0,
    json: JsonOpt = False,
) -> None:
    """Compute an importance matrix of BASE with llama-imatrix on a calibration text.

    The file is llama-imatrix's GGUF format, stamped with what it was calibrated on (the text's id,
    sha256 and a small sketch of it), so mqpredict can refuse to measure on that same text later — which
    would flatter every build made with it. Use it with --imatrix on size, build, recipe, measure, seed,
    predict, propose, campaign …, or with `llama-quantize --imatrix`. Cached by (base, text, settings).
    """
    from mqpredict.llama.imatrix import ImatrixSettings, compute_imatrix, describe

    settings = ImatrixSettings(chunks, ctx)
    with progress_bar(not json) as progress:
        im, cached = compute_imatrix(_base(base, progress), corpus, output, settings, threads, progress)
    doc = {**describe(im), "cached": cached}
    if json:
        emit_json(doc)
    else:
        err.print(f"wrote {im.path} · {len(im.entries)} tensors · {im.chunk_count} windows of {ctx} tokens of "
                  f"{im.corpus_id}{' (from the cache)' if cached else ''} · id {im.id}", highlight=False)  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command()(imatrix)
