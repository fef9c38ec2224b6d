"""The campaign report: survivors table (Markdown + CSV), Pareto plot (PNG), per-survivor recipe and
build manifest — everything someone needs to build a survivor and verify it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from mqpredict.quant.config import Config
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.resolve import quantize_command, tensor_type_lines
from mqpredict.report.budget import Budget, smallest_vram
from mqpredict.report.survivors import Entry
from mqpredict.pareto import Line
from mqpredict.search.paired import Paired
from mqpredict.util.atomic import atomic_open, atomic_write_text
from mqpredict.util.figures import save_figure

STATS = ("kld_mean", "kld_mean_err", "kld_median", "kld_p99", "kld_max", "same_top_p", "ppl", "ppl_base")


@dataclass(frozen=True)
class Row:
    entry: Entry
    record: dict  # the record's values
    margin: Paired | None  # search slice, to the line
    heldout: Paired | None  # held-out slice, to its line
    fits_gb: int | None  # smallest common VRAM (GB) at the report's ctx
    chosen: bool = False  # the best survivor within the user's budget
    speed: object | None = None  # mqpredict.llama.speed.Speed when measured (report --speed)


def _f(x, fmt=".4f") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _margin(p: Paired | None) -> str:
    return "" if p is None else f"{100 * math.expm1(p.diff):+.1f}% ± {100 * p.se:.1f}%"


def table_rows(rows: list[Row]) -> list[dict]:
    out = []
    for r in rows:
        v = r.record
        out.append({
            "name": r.entry.name, "config": v["config"], "effective_config": v["effective_config"],
            "source": v["source"], "size_bytes": v["size_bytes"], "size_mb": round(v["size_bytes"] / 1e6, 2),
            "bpw": v["bpw"], **{k: v.get(k) for k in STATS},
            "margin_ln": None if r.margin is None else r.margin.diff, "margin_se": None if r.margin is None else r.margin.se,
            "heldout_margin_ln": None if r.heldout is None else r.heldout.diff,
            "heldout_margin_se": None if r.heldout is None else r.heldout.se,
            "nonlinear_win": r.entry.win, "fits_vram_gb": r.fits_gb, "chosen": r.chosen, "record_key": v["key"],
            **({f"speed_{k}": x for k, x in r.speed.to_json().items()} if r.speed is not None else {}),
        })  # fmt: skip
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["name"])
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


#: who found a survivor, from its record's source: the learned search's own hybrids apart from the free answers
FOUND_BY = {"proposed": "search", "allocator": "allocator", "preset": "preset", "probe": "probe"}


def found_by(source: str) -> str:
    return FOUND_BY.get(str(source), str(source))


def write_markdown(path: Path, title: str, rows: list[Row], notes: list[str], ctx: int) -> None:
    speed = any(r.speed is not None for r in rows)
    sp_head, sp_rule = (" pp tok/s | tg tok/s |", "---:|---:|") if speed else ("", "")
    lines = [f"# {title}", "", *notes, "",
             f"| name | size MB | bpw | KLD mean ± err | p99 | same top | vs line (search) | vs line (held-out) | win | from |{sp_head} VRAM @ {ctx} ctx | per-group types |",
             f"|---|---:|---:|---:|---:|---:|---:|---:|:-:|---|{sp_rule}---:|---|"]  # fmt: skip
    for r in rows:
        v = r.record
        sp = (f" {r.speed.pp_ts:.1f} ± {r.speed.pp_spread / 2:.1f} | {r.speed.tg_ts:.1f} ± {r.speed.tg_spread / 2:.1f} |"
              if r.speed is not None else (" | |" if speed else ""))  # fmt: skip
        lines.append(
            f"| {'**' + r.entry.name + '**' if r.chosen else r.entry.name} | {v['size_bytes'] / 1e6:.2f} | {v['bpw']:.3f} | "
            f"{_f(v['kld_mean'])} ± {_f(v['kld_mean_err'])} | {_f(v['kld_p99'])} | {_f(v['same_top_p'], '.3f')} | "
            f"{_margin(r.margin)} | {_margin(r.heldout)} | {'yes' if r.entry.win else ''} | {found_by(v['source'])} |{sp} "
            f"{'' if r.fits_gb is None else str(r.fits_gb) + ' GB'} | `{v['effective_config']}` |"
        )  # fmt: skip
    lines += ["", "Margins are paired (same tokens as the presets of the line): ln KLD below the line, as a % of KLD, "
              "± one paired (window-block) standard error. A win is significantly below the line on the search tokens "
              "(one-sided t test at the campaign's alpha) and again on the held-out tokens (Holm-corrected over "
              "the wins re-confirmed).", ""]  # fmt: skip
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_recipe(folder: Path, model: ModelInfo, row: Row, tensor_types: dict[str, str], manifest_extra: dict,
                 imatrix=None) -> Path:  # fmt: skip
    """``<name>.tensor-types.txt`` + ``<name>.manifest.json`` (base hash, config, per-tensor types, llama.cpp
    build, corpus, imatrix, every statistic, the exact rebuild commands)."""
    v = row.record
    cfg = Config.parse(v["config"])
    folder.mkdir(parents=True, exist_ok=True)
    if imatrix is not None:  # beside the recipes, under the name llama-quantize writes into the GGUF
        copy = folder / imatrix.file_label
        if not copy.exists() or copy.stat().st_size != imatrix.path.stat().st_size:
            with open(imatrix.path, "rb") as fin, atomic_open(copy) as fout:
                shutil.copyfileobj(fin, fout)
    tt = folder / f"{row.entry.name}.tensor-types.txt"
    atomic_write_text(tt, "\n".join(tensor_type_lines(model, cfg)) + "\n")
    out_name = f"{model.path.stem}-{row.entry.name}.gguf"
    manifest = {
        "name": row.entry.name, "config": v["config"], "effective_config": v["effective_config"],
        "base": {"path": str(model.path), "model_id": v["model_id"], "name": v["model_name"],
                 "architecture": v["architecture"], "base_origin": v["base_origin"]},
        "size_bytes": v["size_bytes"], "bpw": v["bpw"], "tensor_types": tensor_types,
        "fractions": v.get("fractions"),
        "llama_cpp": {"version": v["llama_version"], "commit": v["llama_commit"], "build": v["build"], "engine": v["engine"]},
        "corpus": v["corpus"], "ctx": v["ctx"], "n_chunks": v["n_chunks"], "chunk_offset": v["chunk_offset"],
        "scoring": v.get("scoring") or "windows",
        "imatrix": None if imatrix is None else {"id": imatrix.id, "file": imatrix.file_label,
                                                 "calibration": imatrix.corpus_id},
        "statistics": {k: v.get(k) for k in STATS + ("kld_p90", "kld_p95", "ln_ppl_ratio")},
        "margin_to_line": None if row.margin is None else {"ln": row.margin.diff, "se": row.margin.se},
        "heldout_margin_to_line": None if row.heldout is None else {"ln": row.heldout.diff, "se": row.heldout.se},
        "nonlinear_win": row.entry.win, "record_key": v["key"],
        "rebuild": {
            # run in this folder: the tensor-type file and the imatrix are here
            "llama_quantize": " ".join(quantize_command(model, cfg, out_name, tt.name, imatrix=imatrix)),
            "mqpredict": f"mqpredict build {model.path} --config '{v['config']}' -o {out_name}"
                         + (f" --imatrix {imatrix.file_label}" if imatrix is not None else ""),
            "verify": f"mqpredict measure {model.path} --gguf {out_name} --corpus CORPUS --ctx {v['ctx']} "
                      f"--tokens {v['n_tokens']} --chunk-offset {v['chunk_offset']} --scoring {v.get('scoring') or 'windows'}",
        },
        **manifest_extra,
    }  # fmt: skip
    path = folder / f"{row.entry.name}.manifest.json"
    atomic_write_text(path, json.dumps(manifest, indent=2, default=str) + "\n")
    return path


def plot(path: Path, title: str, points: list[dict], line: Line, survivors: list[Row]) -> None:
    """Presets, hybrids, the line and the survivors (labelled) in (bpw, KLD), KLD on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    pre = [p for p in points if p["source"] == "preset"]
    hyb = [p for p in points if p["source"] != "preset"]
    ax.scatter([p["bpw"] for p in hyb], [p["kld_mean"] for p in hyb], s=14, c="#8fa8c8", label="hybrids measured")
    ax.scatter([p["bpw"] for p in pre], [p["kld_mean"] for p in pre], s=36, marker="s", c="#333333", label="presets")
    for p in pre:
        ax.annotate(p["config"].removeprefix("preset="), (p["bpw"], p["kld_mean"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points", color="#555555")  # fmt: skip
    if line.hull:
        ax.plot([p.bpw for p in line.hull], [p.kld for p in line.hull], "-", c="#333333", lw=1, label="the line (presets)")
    wins = [r for r in survivors if r.entry.win]
    rest = [r for r in survivors if not r.entry.win]
    ax.scatter([r.entry.bpw for r in rest], [r.entry.kld_mean for r in rest], s=90, facecolors="none",
               edgecolors="#d08000", linewidths=1.5, label="survivors")  # fmt: skip
    ax.scatter([r.entry.bpw for r in wins], [r.entry.kld_mean for r in wins], s=160, marker="*", c="#d02020",
               label="nonlinear wins (re-confirmed)")  # fmt: skip
    for r in survivors:
        if r.entry.source == "preset":
            continue  # already labelled
        ax.annotate(r.entry.name, (r.entry.bpw, r.entry.kld_mean), fontsize=8, xytext=(4, -10),
                    textcoords="offset points", color="#a04000")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (exact file size)")
    ax.set_ylabel("mean KLD vs the full-precision base")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


OBJECTIVES = ("kld", "speed", "balanced")


def chosen_index(rows: list[Row], budget: Budget, desc: dict, objective: str = "kld") -> int | None:
    """The best survivor within the budget: lowest KLD (``kld``), fastest generation (``speed``), or lowest
    ``ln KLD − ln tg tok/s`` (``balanced``: 10% faster is worth 10% more KLD). Speed needs ``--speed``."""
    fit = [i for i, r in enumerate(rows) if budget.fits(r.record["size_bytes"], r.record["bpw"], desc)]
    if not fit:
        return None
    if objective == "speed":
        return max(fit, key=lambda i: rows[i].speed.tg_ts)
    if objective == "balanced":
        return min(fit, key=lambda i: math.log(rows[i].record["kld_mean"]) - math.log(rows[i].speed.tg_ts))
    return min(fit, key=lambda i: rows[i].record["kld_mean"])


def vram_column(size_bytes: int, desc: dict, ctx: int) -> int | None:
    return smallest_vram(size_bytes, desc, ctx)
