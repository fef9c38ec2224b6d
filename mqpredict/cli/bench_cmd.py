"""``mqpredict bench …``: benchmarks that print ratios measured side by side in one run."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mqpredict.cli.common import DEFAULTS, CorpusOpt, CtxOpt, JsonOpt, ThreadsOpt, TokensOpt, emit_json, out, progress_bar
from mqpredict.cli.model_cmds import BaseArg, _base

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
    """Seconds per config: InProcessEngine vs llama-perplexity --kl-divergence (same files, interleaved),
    and seconds per hybrid build: stitching vs llama-quantize --tensor-type-file. Prints the ratios."""
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
    t.add_row(f"build {BUILD_CONFIG}", f"{res.build_stitch_s:.3f}", f"{res.build_tool_s:.3f}",
              f"{res.build_ratio:.3f}×", "≤ 0.1×")  # fmt: skip
    out.print(t)
    out.print(
        f"mean KLD agreement between the two: within {100 * res.kld_agreement:.4f}% · one-off set-up: base log-probs "
        f"{res.setup_base_logprobs_s:.1f} s (both engines), pure-quantization cache {res.setup_pure_cache_s:.1f} s",
        highlight=False,
    )
