"""Tokens per second of a GGUF on this machine, measured by llama.cpp's own ``llama-bench``.

Some types trade speed for size (IQ types decode slower on CPU than Q4_0/Q8_0), so a report can show
prompt-processing (pp) and generation (tg) speed next to KLD. ``llama-bench`` runs each test
``repeats`` times with the given threads; we keep every sample and report the median and the spread
(max − min) — on a shared or throttled machine the spread says how far to trust a difference.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from mqpredict.errors import LlamaError
from mqpredict.llama import runtime
from mqpredict.llama.tools import find_tool, run_tool


@dataclass(frozen=True)
class Speed:
    pp_ts: float  # prompt processing, tokens/s (median over repeats)
    pp_spread: float
    tg_ts: float  # generation, tokens/s (median)
    tg_spread: float
    threads: int
    repeats: int
    n_prompt: int
    n_gen: int

    def to_json(self) -> dict:
        return {"pp_ts": self.pp_ts, "pp_spread": self.pp_spread, "tg_ts": self.tg_ts, "tg_spread": self.tg_spread,
                "threads": self.threads, "repeats": self.repeats, "n_prompt": self.n_prompt, "n_gen": self.n_gen}  # fmt: skip


def parse_bench_json(text: str, path: str) -> tuple[list[float], list[float]]:
    """The pp and tg samples (tokens/s) of ``llama-bench -o json`` output; loud when one is missing."""
    start = text.find("[")
    try:
        rows = json.JSONDecoder().raw_decode(text[start:])[0] if start >= 0 else []  # stderr may follow
    except ValueError:
        rows = []
    pp = [r for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0]
    tg = [r for r in rows if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0]
    if not pp or not tg or not pp[0].get("samples_ts") or not tg[0].get("samples_ts"):
        raise LlamaError(f"llama-bench printed no pp/tg samples for {path}", "run it by hand with -o json to see why")
    return [float(x) for x in pp[0]["samples_ts"]], [float(x) for x in tg[0]["samples_ts"]]


def measure_speed(gguf: str | os.PathLike, threads: int = 0, repeats: int = 5, n_prompt: int = 128, n_gen: int = 32,
                  llama_bin: str | os.PathLike | None = None) -> Speed:  # fmt: skip
    threads = threads or runtime.default_threads()
    cmd = [str(find_tool("llama-bench", llama_bin)), "-m", str(gguf), "-p", str(n_prompt), "-n", str(n_gen),
           "-r", str(repeats), "-t", str(threads), "-o", "json"]  # fmt: skip
    pp, tg = parse_bench_json(run_tool(cmd, f"llama-bench on {Path(gguf).name}"), str(gguf))
    return Speed(statistics.median(pp), max(pp) - min(pp), statistics.median(tg), max(tg) - min(tg), threads,
                 repeats, n_prompt, n_gen)  # fmt: skip
