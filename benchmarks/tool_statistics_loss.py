"""How often does `llama-perplexity --kl-divergence` exit 0 without printing its statistics?

llama.cpp's common logger writes from an asynchronous worker thread and is deliberately never torn
down (common/log.cpp), so lines queued just before exit can be lost. The ToolsEngine detects this and
re-runs (ToolsEngine.retries). This script counts it on the tiny test model:

    python benchmarks/tool_statistics_loss.py [--runs 200]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from mqpredict.base.testmodel import write_test_model
from mqpredict.llama.tools import ToolsEngine
from mqpredict.measure.corpus import EvalSpec
from mqpredict.quant.config import Config
from mqpredict.util.paths import DEFAULT_CORPUS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tiny = write_test_model(Path(d) / "tiny.gguf")
        spec = EvalSpec(ctx=128, n_chunks=4)
        with ToolsEngine(tiny, DEFAULT_CORPUS, spec, threads=2) as eng:
            base = eng.base_logprobs(spec)
            q = eng.build(Config.parse("Q8_0"), Path(d) / "q8.gguf").path
            cmd = [str(eng.perplexity_bin), "-m", str(q), "--kl-divergence-base", str(base), "--kl-divergence",
                   "-c", "128", "-b", "2048", "-t", "2"]  # fmt: skip
            lost = sum("Mean    KLD" not in subprocess.run(cmd, capture_output=True, text=True).stdout
                       for _ in range(a.runs))  # fmt: skip
    print(f"llama-perplexity runs that exited 0 without statistics: {lost}/{a.runs} ({100 * lost / a.runs:.1f}%)")


if __name__ == "__main__":
    main()
