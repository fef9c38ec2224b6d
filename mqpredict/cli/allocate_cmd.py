"""``mqpredict allocate``: the zero-run allocator — the config of least weight error at a size, no KLD run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mqpredict.cli.common import ImatrixOpt, JsonOpt, ThreadsOpt, emit_json, err, fmt_mb, load_imatrix, out, progress_bar
from mqpredict.cli.model_cmds import BaseArg, _base, write_recipe
from mqpredict.errors import InputError


def allocate(
    base: BaseArg,
    imatrix: ImatrixOpt = None,
    target_size: Annotated[str | None, typer.Option("--target-size", help="File size to fill, never exceeded "
                                                    "(e.g. 1.1GB; header and padding included).")] = None,  # fmt: skip
    target_bpw: Annotated[float | None, typer.Option("--target-bpw", help="… or bits per weight, never exceeded.")] = None,
    types: Annotated[str | None, typer.Option("--types", help="Comma-separated candidate types (default: Q8_0 … Q2_K, "
                                              "and the IQ1/IQ2/IQ3_XXS types with --imatrix).")] = None,  # fmt: skip
    by: Annotated[str, typer.Option("--by", help="tensor: every tensor its own type (PR #15550); group: one type "
                                    "per tensor group.")] = "tensor",  # fmt: skip
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Write the llama-quantize --tensor-type-file here "
                                                "(its lines are printed either way).")] = None,  # fmt: skip
    gguf_out: Annotated[str, typer.Option("--gguf-out", help="Output path to put in the printed command.")] = "OUT.gguf",
    threads: ThreadsOpt = 0,
    json: JsonOpt = False,
) -> None:
    """The config of least weight error that fits a target, from the weights alone (llama.cpp PR #15550's method).

    Per tensor and candidate type, the quantization error measured on the model's own weights (sampled rows
    quantized in memory by llama.cpp's quantizer; imatrix-weighted with --imatrix, plain MSE without) is
    summed over tensors and minimised under the exact file size by a bisected Lagrange multiplier, then the
    budget left is filled greedily. Prints the config, its exact size and bpw, and the llama-quantize recipe;
    `size`/`build` reproduce that size exactly. No KLD is measured: compare it with `measure`.
    """
    import os

    from rich.markup import escape

    from mqpredict.quant.model import ModelInfo
    from mqpredict.quant.types import parse_type
    from mqpredict.records.identity import identify
    from mqpredict.report.budget import parse_size
    from mqpredict.search.allocator import Target, allocate as run, default_types
    from mqpredict.surrogate.weight_error import table_for, table_types

    if by not in ("tensor", "group"):
        raise InputError(f"--by {by!r}: use tensor or group")
    target = Target(parse_size(target_size) if target_size else None, target_bpw)
    im = load_imatrix(imatrix)
    cands = default_types(im)
    if types:
        cands = tuple(parse_type(t, where="in --types") for t in types.split(",") if t.strip())
        held = table_types(im)
        extra = [q.name for q in cands if q not in held]
        if extra:
            raise InputError(f"--types {', '.join(extra)}: the weight-error table holds no errors for "
                             f"{'them' if len(extra) > 1 else 'it'}", "choose from " + ", ".join(q.name for q in held))  # fmt: skip
    with progress_bar(not json) as progress:
        m = ModelInfo.load(_base(base, progress))
        if im is not None:
            im.check_model(m)
        else:
            err.print("no --imatrix: the errors are plain MSE (every weight counts the same); an importance matrix "
                      "weighs them by the activations, as llama-quantize --imatrix does", highlight=False)  # fmt: skip
        table = table_for(m, identify(m).model_id, im, threads or os.cpu_count() or 1, progress, types=cands)
        a = run(m, table, target, cands, im, by=by)
    doc = {**a.to_json(), "types": [q.name for q in cands], "by": by, "imatrix": str(im.path) if im else None,
           "weight_table_seconds": table.seconds}  # fmt: skip
    path = recipe or Path("tensor-types.txt")
    if recipe is not None:
        rec = write_recipe(m, a.config, recipe, gguf_out, im)
    else:
        from mqpredict.quant.resolve import quantize_command, tensor_type_lines

        rec = {"lines": tensor_type_lines(m, a.config), "cwd": str(im.path.resolve().parent) if im else None,
               "command": quantize_command(m, a.config, gguf_out, str(path), imatrix=im), "tensor_type_file": None}  # fmt: skip
    doc.update({"tensor_types": rec["lines"], "command": rec["command"], "tensor_type_file": rec["tensor_type_file"],
                "cwd": rec["cwd"]})  # fmt: skip
    if json:
        emit_json(doc)
        return
    out.print(f"[bold]{escape(m.path.name)}[/] · target {target} · {fmt_mb(a.size_bytes)} MB ({a.size_bytes:,} bytes) · "
              f"{a.bpw:.4f} bpw · {'imatrix-weighted' if a.weighted else 'plain-MSE'} error {a.expected_error:.4g}",
              highlight=False)  # fmt: skip
    out.print(f"config: {a.config.key}", highlight=False, soft_wrap=True, markup=False)
    out.print(f"{path}{'' if recipe else ' (not written: pass --recipe FILE)'}:", highlight=False, markup=False)
    for line in rec["lines"]:
        out.print(f"  {line}", highlight=False, soft_wrap=True, markup=False)
    where = f"  # in {rec['cwd']}" if rec["cwd"] else ""
    out.print(" ".join(rec["command"]) + where, highlight=False, soft_wrap=True, markup=False)


def register(app: typer.Typer) -> None:
    app.command()(allocate)
