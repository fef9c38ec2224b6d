"""What a campaign would cost on a 70B model: one machine vs N GPU workers — an EXTRAPOLATION.

Measured here, on the embedded SmolLM2-135M base: the in-process KLD evaluation's tokens/s (ctx 512,
the campaign's 8-window slice, median of 3) and llama-quantize's build throughput (base bytes/s, Q4_K_M,
median of 3), both with this machine's threads.

Extrapolated (printed as such): a 70B dense model needs ~params-ratio times the compute per token, so
tokens/s ÷ that ratio on this machine; a GPU worker is ``--gpu-speedup`` times this machine at prompt
processing (an ASSUMPTION, not measured here: there is no GPU on this machine). Campaign size comes from
the README's main-command run on SmolLM2 (16 seeds, 20 confirmations of which 8 stopped after a quarter
— 57,344 forward tokens —, the line's presets on the held-out slice).

    .venv/bin/python benchmarks/cost_70b.py [--gpu-speedup 300] [--workers 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

PARAMS_70B = 70.6e9  # Llama-3.x-70B
BASE_70B_BYTES = 141e9  # its F16 base
SLICE_TOKENS = 8 * 512  # forward tokens of one full run on the campaign's search slice
# the README's main-command campaign on SmolLM2 (measured): seeds and held-out presets are full runs,
# the 20 confirmations ran 57,344 forward tokens in all (stopped-early ones count a quarter)
SEED_RUNS, HELDOUT_PRESET_RUNS, CONFIRM_TOKENS, BUILDS = 16, 5, 57_344, 16 + 5 + 20
BASE_LOGPROB_RUNS = 2  # the F16 base on the search and the held-out slice, once (a shared $MQPREDICT_CACHE)


def measure(threads: int) -> dict:
    from mqpredict.base.embedded import resolve_base
    from mqpredict.llama.inprocess import InProcessEngine
    from mqpredict.llama.tools import ToolsEngine, run_tool
    from mqpredict.measure.corpus import EvalSpec
    from mqpredict.quant.config import Config
    from mqpredict.quant.resolve import quantize_command
    from mqpredict.util.paths import DEFAULT_CORPUS

    base = resolve_base("smollm2")
    spec = EvalSpec(ctx=512, n_chunks=8)
    with InProcessEngine(base, DEFAULT_CORPUS, spec, threads=threads) as e, \
            ToolsEngine(base, DEFAULT_CORPUS, spec, threads=threads) as tools:  # fmt: skip
        e.base_logprobs(spec)
        path = e.build(Config.parse("Q4_K_M")).path
        evals = []
        for _ in range(3):
            t0 = time.perf_counter()
            e.evaluate(path, spec)
            evals.append(time.perf_counter() - t0)
        builds = []
        for i in range(3):
            out = e.workdir / f"q{i}.gguf"
            cmd = quantize_command(e.model, Config.parse("Q4_K_M"), str(out), None, threads)
            cmd[0] = str(tools.quantize_bin)
            t0 = time.perf_counter()
            run_tool(cmd, "llama-quantize")
            builds.append(time.perf_counter() - t0)
            out.unlink()
        n_params = e.model.n_params
        return {"model": base.name, "threads": e.threads, "n_params": n_params, "base_bytes": base.stat().st_size,
                "eval_s": statistics.median(evals), "tokens_per_s": spec.n_chunks * spec.ctx / statistics.median(evals),
                "build_s": statistics.median(builds), "build_bytes_per_s": base.stat().st_size / statistics.median(builds)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--gpu-speedup", type=float, default=300.0, help="ASSUMED GPU worker speed vs this machine")
    ap.add_argument("--workers", type=int, default=8, help="GPU workers in the cluster")
    a = ap.parse_args()
    m = measure(a.threads)
    ratio = PARAMS_70B / m["n_params"]
    tps_70b = m["tokens_per_s"] / ratio
    run_s = SLICE_TOKENS / tps_70b  # one full run, this machine
    build_s = BASE_70B_BYTES / m["build_bytes_per_s"]  # one llama-quantize of the 70B (CPU, this machine)
    full_runs = BASE_LOGPROB_RUNS + SEED_RUNS + HELDOUT_PRESET_RUNS + CONFIRM_TOKENS / SLICE_TOKENS
    one = full_runs * run_s + BUILDS * build_s
    gpu_run = run_s / a.gpu_speedup
    # with N workers, builds (CPU on each worker) and runs both spread over the workers
    cluster = (full_runs * gpu_run + BUILDS * build_s) / a.workers
    print(f"MEASURED on this machine ({m['threads']} threads), {m['model']} ({m['n_params'] / 1e6:.1f} M params):")
    print(f"  KLD evaluation  {m['tokens_per_s']:.0f} tokens/s  ({SLICE_TOKENS} tokens in {m['eval_s']:.2f} s, median of 3)")
    print(f"  llama-quantize  {m['build_bytes_per_s'] / 1e6:.0f} MB/s of base  ({m['build_s']:.2f} s for Q4_K_M, median of 3)")
    print(f"EXTRAPOLATED to a 70B dense model ({PARAMS_70B / 1e9:.1f} B params, {ratio:.0f}× the compute per token):")
    print(f"  one full KLD run ({SLICE_TOKENS} tokens) on this machine: {run_s / 3600:.1f} h;  one build: {build_s / 60:.0f} min")
    print(f"  campaign = {full_runs:.1f} full-run equivalents ({BASE_LOGPROB_RUNS} base, {SEED_RUNS} seeds, "
          f"{HELDOUT_PRESET_RUNS} held-out presets, {CONFIRM_TOKENS / SLICE_TOKENS:.1f} in confirmations) + {BUILDS} builds")
    print(f"  one machine with this one's compute (and the ~200 GB RAM a 70B needs): {one / 3600:.0f} h "
          f"({one / 86400:.1f} days)")
    print(f"  {a.workers} GPU workers, each ASSUMED {a.gpu_speedup:.0f}× this machine at prompt processing "
          f"(one run {gpu_run / 60:.1f} min), builds on each worker's CPU at this machine's rate: "
          f"{cluster / 3600:.1f} h — of which builds {BUILDS * build_s / a.workers / 3600:.1f} h")


if __name__ == "__main__":
    main()
