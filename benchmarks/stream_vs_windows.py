"""How stream scoring compares with llama-perplexity's windows on real models: the 16 seed presets measured
both ways on the same files, the ratio of mean KLD and the rank agreement (Spearman) of the presets.

    .venv/bin/python benchmarks/stream_vs_windows.py                       # SmolLM2, 16 chunks of 512
    .venv/bin/python benchmarks/stream_vs_windows.py gemma3-270m qwen2.5-0.5b --chunks 8
    .venv/bin/python benchmarks/stream_vs_windows.py --sink                # why the first token stays cached
    .venv/bin/python benchmarks/stream_vs_windows.py qwen2.5-coder-1.5b --chunks 4 --imatrix   # the users' regime

Each preset is built once and evaluated in both modes (same chunk count: windows score ctx/2 - 1 tokens per
chunk, a stream ctx/2). Presets that make the same file (K-quants fall back on these models' widths) are
one point: Spearman is over the distinct files, with average ranks for ties. Prints a markdown table
(or --json) for docs/measurement.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from mqpredict.base.embedded import prepare_embedded
from mqpredict.llama.inprocess import InProcessEngine
from mqpredict.measure.corpus import EvalSpec, Scoring
from mqpredict.quant.config import Config
from mqpredict.workflows.seed import SEED_PRESETS
from mqpredict.util.paths import DEFAULT_CORPUS


def ranks(x: list[float]) -> np.ndarray:
    """Average ranks (ties share the mean of their positions)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        r[order[i : j + 1]] = (i + j) / 2
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def compare(name: str, chunks: int, ctx: int, threads: int, say, imatrix: bool = False) -> dict:
    base = prepare_embedded(name)
    windows = EvalSpec(ctx=ctx, n_chunks=chunks)
    stream = EvalSpec(ctx=ctx, n_chunks=chunks, scoring=Scoring.stream)
    rows, seen = [], {}
    im = None
    if imatrix:  # the base's default imatrix, as seeds and campaigns quantize with (cached)
        from mqpredict.llama.imatrix import ImatrixSettings, compute_imatrix
        from mqpredict.util.paths import DEFAULT_CALIBRATION

        im, _ = compute_imatrix(base, DEFAULT_CALIBRATION, None, ImatrixSettings(), threads, None)
    with InProcessEngine(base, DEFAULT_CORPUS, windows, threads=threads, imatrix=im) as eng:
        eng.base_logprobs(windows)
        eng.base_logprobs(stream)
        for p in SEED_PRESETS:
            cfg = Config.from_preset(p)
            built = eng.build(cfg)
            if built.types_key in seen:
                say(f"{name} {p.value}: the same file as {seen[built.types_key]}")
                rows.append({**next(r for r in rows if r["preset"] == seen[built.types_key]), "preset": p.value,
                             "same_as": seen[built.types_key]})  # fmt: skip
                continue
            seen[built.types_key] = p.value
            w = eng.evaluate(built.path, windows)
            s = eng.evaluate(built.path, stream)
            eng.release(built.path)
            built.path.unlink()
            rows.append({"preset": p.value, "bpw": built.size.bpw, "kld_windows": w.stats.kld_mean,
                         "kld_windows_err": w.stats.kld_mean_err, "kld_stream": s.stats.kld_mean,
                         "kld_stream_err": s.stats.kld_mean_err, "ratio": s.stats.kld_mean / w.stats.kld_mean,
                         "seconds_windows": w.seconds, "seconds_stream": s.seconds,
                         "ppl_base_windows": w.stats.ppl_base, "ppl_base_stream": s.stats.ppl_base, "same_as": None})  # fmt: skip
            say(f"{name} {p.value}: windows {w.stats.kld_mean:.5f} ({w.seconds:.1f} s), stream {s.stats.kld_mean:.5f} "
                f"({s.seconds:.1f} s)")  # fmt: skip
    distinct = [r for r in rows if r["same_as"] is None]
    ratios = [r["ratio"] for r in distinct]
    return {
        "model": name,
        "imatrix": im.id if im is not None else None,
        "chunks": chunks,
        "ctx": ctx,
        "tokens_windows": windows.n_tokens,
        "tokens_stream": stream.n_tokens,
        "presets": len(rows),
        "distinct_files": len(distinct),
        "ratio_of_means": float(np.mean([r["kld_stream"] for r in distinct]) / np.mean([r["kld_windows"] for r in distinct])),
        "ratio_geomean": float(math.exp(np.mean(np.log(ratios)))),
        "ratio_min": float(min(ratios)),
        "ratio_max": float(max(ratios)),
        "spearman_distinct": spearman([r["kld_windows"] for r in distinct], [r["kld_stream"] for r in distinct]),
        "ppl_base_windows": distinct[0]["ppl_base_windows"],
        "ppl_base_stream": distinct[0]["ppl_base_stream"],
        "rows": rows,
    }


def sink(name: str, chunks: int, ctx: int, threads: int) -> dict:
    """The base's perplexity on the stream's scored tokens with the first cell kept (the attention sink, as
    stream scoring does) and without it (the cache a plain sliding window keeps), and on the windows."""
    from mqpredict.llama.inprocess import LoadedModel
    from mqpredict.llama.stream import StreamEvaluator, walk

    base = prepare_embedded(name)
    stream = EvalSpec(ctx=ctx, n_chunks=chunks, scoring=Scoring.stream)
    windows = EvalSpec(ctx=ctx, n_chunks=chunks)
    out = {"model": name, "chunks": chunks, "ctx": ctx}
    with InProcessEngine(base, DEFAULT_CORPUS, stream, threads=threads) as eng:
        tokens = eng.base_logprobs(stream).tokens
        wl = eng.base_logprobs(windows)
        out["ppl_windows"] = float(np.exp(np.mean(np.concatenate([wl.get(c).nll_base for c in range(chunks)]))))
        model = LoadedModel(base)
        try:
            for keep in (1, 0):
                nll = []
                with StreamEvaluator(model, ctx, eng.threads, keep=keep) as ev:
                    for c, lg in walk(ev, tokens, stream, None, "sink"):
                        t = tokens[stream.stream_targets(c)]
                        mx = lg.max(axis=1)
                        lse = mx + np.log(np.exp(lg - mx[:, None]).sum(axis=1, dtype=np.float64))
                        nll.append(lse - lg[np.arange(len(t)), t])
                out[f"ppl_stream_keep{keep}"] = float(np.exp(np.mean(np.concatenate(nll))))
        finally:
            model.close()
    return out


def markdown(res: dict) -> str:
    im = f" · imatrix {res['imatrix']}" if res.get("imatrix") else ""
    out = [f"**{res['model']}**{im} · {res['chunks']} chunks of {res['ctx']} ({res['tokens_windows']} tokens windows, "
           f"{res['tokens_stream']} stream) · base PPL {res['ppl_base_windows']:.2f} windows / "
           f"{res['ppl_base_stream']:.2f} stream", "",
           "| preset | bpw | KLD windows | KLD stream | stream / windows |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in res["rows"]:
        same = f" (= {r['same_as']})" if r["same_as"] else ""
        out.append(f"| {r['preset']}{same} | {r['bpw']:.3f} | {r['kld_windows']:.5f} ± {r['kld_windows_err']:.5f} | "
                   f"{r['kld_stream']:.5f} ± {r['kld_stream_err']:.5f} | {r['ratio']:.3f} |")  # fmt: skip
    out += ["", f"{res['distinct_files']} distinct files of {res['presets']} presets: mean KLD stream / windows "
            f"{res['ratio_of_means']:.3f} (per file {res['ratio_min']:.3f}–{res['ratio_max']:.3f}, geometric mean "
            f"{res['ratio_geomean']:.3f}); Spearman rank agreement {res['spearman_distinct']:.3f}."]  # fmt: skip
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", default=["smollm2"], help="embedded bases (smollm2, gemma3-270m, qwen2.5-0.5b, qwen2.5-coder-1.5b)")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--imatrix", action="store_true", help="quantize with the base's default imatrix (the shipped "
                    "calibration text, cached), as seeds and campaigns do")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sink", action="store_true", help="only the base's perplexity with and without the first cell")
    a = ap.parse_args()
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if a.sink:
        for m in a.models:
            r = sink(m, a.chunks, a.ctx, a.threads)
            print(json.dumps(r) if a.json else f"{m}: base PPL windows {r['ppl_windows']:.2f} · stream with the first "
                  f"token kept {r['ppl_stream_keep1']:.2f} · stream without it {r['ppl_stream_keep0']:.2f}")  # fmt: skip
        return
    results = [compare(m, a.chunks, a.ctx, a.threads, say, a.imatrix) for m in a.models]
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n\n".join(markdown(r) for r in results))


if __name__ == "__main__":
    main()
