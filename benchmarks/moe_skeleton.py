"""Exact sizes at the scale of a real mixture of experts: Qwen3-30B-A3B's published shapes as a sparse
skeleton (no weights), sized by mqpredict and by llama-quantize's own dry run (the real binary), side by side:

    python benchmarks/moe_skeleton.py [--json]

For each preset and a few expert hybrids: mqpredict's file size and tensor bytes (explicit configs from
the header alone, presets through llama.cpp's dry run in process), the "quant size" the llama-quantize
binary prints for the same command (MiB, two decimals), and whether the per-tensor types agree.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from mqpredict.base.skeleton import write_skeleton
from mqpredict.llama.quantize import dry_run_types, parse_dry_run
from mqpredict.llama.tools import find_tool
from mqpredict.quant.config import Config
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.resolve import quantize_command, resolve, tensor_type_lines
from mqpredict.quant.size import size_of

CONFIGS = [
    "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K", "IQ4_XS", "MXFP4_MOE",
    "default=Q8_0,moe_experts_up_gate=Q3_K,moe_experts_down=Q4_K",
    "default=Q6_K,moe_experts_up_gate=IQ4_XS,moe_experts_down=Q5_K,embeddings=Q4_K",
    "Q4_K_M,moe_experts_up_gate=Q3_K",
]  # fmt: skip


def llama_quantize_dry_run(model: ModelInfo, config: Config, folder: Path) -> tuple[dict, float, float]:
    tt = folder / "types.txt"
    tt.write_text("\n".join(tensor_type_lines(model, config)) + "\n")
    cmd = [str(find_tool("llama-quantize")), "--dry-run", *quantize_command(model, config, "/dev/null", str(tt))[1:]]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = p.stdout + p.stderr
    return parse_dry_run(out.splitlines()), float(re.search(r"quant size\s*=\s*([\d.]+) MiB", out).group(1)), \
        time.perf_counter() - t0  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        path = write_skeleton(Path(d) / "qwen3-30b-a3b.gguf", "qwen3-30b-a3b")
        t_write = time.perf_counter() - t0
        m = ModelInfo.load(path)
        disk = os.stat(path).st_blocks * 512
        for text in CONFIGS:
            c = Config.parse(text)
            t0 = time.perf_counter()
            rep = size_of(m, resolve(m, c, dry_run_types))
            ours = time.perf_counter() - t0
            types, mib, theirs = llama_quantize_dry_run(m, c, Path(d))
            rows.append({"config": c.key, "size_bytes": rep.size_bytes, "bpw": rep.bpw, "tensor_mib": rep.tensor_bytes / 2**20,
                         "llama_quantize_mib": mib, "types_equal": types == resolve(m, c, dry_run_types),
                         "seconds": ours, "seconds_llama_quantize": theirs})  # fmt: skip
    doc = {"model": m.name, "n_params": m.n_params, "n_params_active": m.n_params_active,
           "apparent_bytes": m.header.file_size, "disk_bytes": disk, "seconds_write": t_write, "rows": rows}  # fmt: skip
    if a.json:
        print(json.dumps(doc, indent=1))
        return
    print(f"{m.name}: {m.n_params / 1e9:.2f} B params ({m.n_params_active / 1e9:.2f} B active), skeleton "
          f"{m.header.file_size / 1e9:.1f} GB apparent / {disk / 1e3:.0f} kB on disk, written in {t_write:.2f} s")
    print(f"{'config':62} {'size (bytes)':>15} {'bpw':>6} {'tensors MiB':>12} {'llama-quantize':>14} {'types':>6}")
    for r in rows:
        print(f"{r['config'][:62]:62} {r['size_bytes']:>15,} {r['bpw']:>6.3f} {r['tensor_mib']:>12.2f} "
              f"{r['llama_quantize_mib']:>14.2f} {'same' if r['types_equal'] else 'DIFF':>6}")


if __name__ == "__main__":
    main()
