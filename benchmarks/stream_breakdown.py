"""Where a stream step's time goes, against a window's — what ``bench measure``'s ``stream_floor`` leaves out.

    .venv/bin/python benchmarks/stream_breakdown.py                  # SmolLM2, Q8_0, 2 threads, 9 repeats
    .venv/bin/python benchmarks/stream_breakdown.py qwen2.5-coder-1.5b --repeats 3
    .venv/bin/python benchmarks/stream_breakdown.py --flash-attn off # the same with flash attention off

One context (:class:`~mqpredict.llama.stream.StreamEvaluator`, the stream's own), one candidate file; each
repeat times, interleaved:

* ``window``  — the first chunk: ``ctx`` tokens from an empty cache, logits for the last ``ctx/2`` (exactly
  a llama-perplexity window: same batch, same logits asked);
* ``step``    — a later chunk as the stream runs it: drop ``ctx/2`` cells, shift, decode ``ctx/2`` tokens
  that attend to the ``ctx/2`` cached ones, logits for all of them;
* ``step_noshift`` — the same tokens decoded after ``ctx/2`` cached cells that were never shifted (the
  shift's cost is ``step − step_noshift``);
* ``fresh`` / ``fresh_nologits`` — ``ctx/2`` tokens from an empty cache with and without logits (the output
  head's cost is their difference; ``step − fresh`` is attention over the cache);
* ``score`` — scoring one step's logits against the base's stored log-probs
  (:func:`~mqpredict.measure.kld.score_parallel`, as measurements do).

Per scored token a stream costs ``(step + score)/(ctx/2)`` and a window ``(window + score)/(ctx/2 − 1)``:
their ratio is what ``bench measure``'s ``stream_ratio`` approaches for many chunks (it is against the tool,
whose own overheads come on top of ``window``). Prints a table (or ``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from mqpredict.base.embedded import prepare_embedded
from mqpredict.bench.measure import head_to_body
from mqpredict.llama.inprocess import InProcessEngine, LoadedModel
from mqpredict.llama.stream import StreamEvaluator
from mqpredict.measure.corpus import EvalSpec, Scoring
from mqpredict.measure.kld import score_parallel
from mqpredict.quant.config import Config
from mqpredict.util.paths import DEFAULT_CORPUS

PARTS = ("window", "step", "step_noshift", "fresh", "fresh_nologits", "score")


def breakdown(name: str, config: str, ctx: int, threads: int, repeats: int, flash_attn: bool | None) -> dict:
    base = prepare_embedded(name)
    spec = EvalSpec(ctx=ctx, n_chunks=2, scoring=Scoring.stream)
    h = ctx // 2
    times: dict[str, list[float]] = {k: [] for k in PARTS}
    with InProcessEngine(base, DEFAULT_CORPUS, spec, threads=threads) as eng:
        bl = eng.base_logprobs(spec)
        tok = bl.tokens
        built = eng.build(Config.parse(config))
        model = LoadedModel(built.path)
        try:
            with StreamEvaluator(model, ctx, eng.threads, flash_attn=flash_attn) as ev, ThreadPoolExecutor(eng.threads) as pool:

                def timed(part: str, f):
                    t0 = time.perf_counter()
                    out = f()
                    times[part].append(time.perf_counter() - t0)
                    return out

                for _ in range(repeats):
                    timed("window", lambda: ev.first(tok[:ctx], True))
                    logits = timed("step", lambda: ev.advance(tok[ctx : ctx + h], True))
                    timed("score", lambda: score_parallel(logits, bl.get(1), tok[spec.stream_targets(1)], pool))
                    ev.lib.llama_memory_clear(ev.mem, True)
                    ev._decode(tok[h:ctx], 0, None)  # the chunk's context, at positions that need no shift
                    timed("step_noshift", lambda: ev._decode(tok[ctx : ctx + h], h, 0))
                    ev.lib.llama_memory_clear(ev.mem, True)
                    timed("fresh", lambda: ev._decode(tok[ctx : ctx + h], 0, 0))
                    ev.lib.llama_memory_clear(ev.mem, True)
                    timed("fresh_nologits", lambda: ev._decode(tok[ctx : ctx + h], 0, None))
        finally:
            model.close()
        r = head_to_body(eng.model)
    m = {k: statistics.median(v) for k, v in times.items()}
    per_token_stream = (m["step"] + m["score"]) / h
    per_token_window = (m["window"] + m["score"]) / (h - 1)
    return {
        "model": name,
        "config": config,
        "ctx": ctx,
        "threads": eng.threads,
        "repeats": repeats,
        "flash_attn": {None: "auto", True: "on", False: "off"}[flash_attn],
        "seconds": m,
        "head": m["fresh"] - m["fresh_nologits"],
        "attention_over_cache": m["step_noshift"] - m["fresh"],
        "shift": m["step"] - m["step_noshift"],
        "head_to_body": r,
        "ratio_step_to_window": per_token_stream / per_token_window,
        "ratio_without_scoring": (m["step"] / h) / (m["window"] / (h - 1)),
        "floor_endless": (1 + r) / (2 + r) * h / (h - 1),
    }


def table(res: dict) -> str:
    m = res["seconds"]
    lines = [f"{res['model']} · {res['config']} · ctx {res['ctx']} · {res['threads']} threads · flash attention "
             f"{res['flash_attn']} · median of {res['repeats']}",  # fmt: skip
             "", "| part | seconds |", "|---|---:|"]
    lines += [f"| {k} | {m[k]:.3f} |" for k in PARTS]
    lines += ["", f"output head (logits of {res['ctx'] // 2} tokens) {res['head']:.3f} s · attention over the cache "
              f"{res['attention_over_cache']:.3f} s · shift {res['shift']:.3f} s",
              f"per scored token, step / window: {res['ratio_step_to_window']:.3f} with scoring, "
              f"{res['ratio_without_scoring']:.3f} without (the MAC floor of an endless stream: "
              f"{res['floor_endless']:.3f}, r = {res['head_to_body']:.3f})"]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2", help="an embedded base (smollm2, qwen2.5-coder-1.5b, …)")
    ap.add_argument("--config", default="Q8_0")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="the stream's default is llama.cpp's (auto)")  # fmt: skip
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    fa = {"auto": None, "on": True, "off": False}[a.flash_attn]
    res = breakdown(a.model, a.config, a.ctx, a.threads, a.repeats, fa)
    print(json.dumps(res, indent=2) if a.json else table(res))


if __name__ == "__main__":
    main()
