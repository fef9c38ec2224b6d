"""``mqpredict base …``: prepare full-precision bases from packaged quantized models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mqpredict.base.prepare import Restore
from mqpredict.cli.common import JsonOpt, emit_json, err, out, progress_bar
from mqpredict.errors import InputError

app = typer.Typer(help="Prepare bases: restore an F32 model from a packaged quantized GGUF; skeletons of real models' "
                  "shapes.", no_args_is_help=True)  # fmt: skip


@app.command()
def prepare(
    source: Annotated[str, typer.Argument(help="An embedded base name (smollm2) or a quantized GGUF file.")],
    restore: Annotated[
        Restore,
        typer.Option(help="dither: seeded in-bin noise (default; a plausible original); plain: dequantize only "
                     "(keeps the old grid, which makes that type look free)."),  # fmt: skip
    ] = Restore.DITHER,
    seed: Annotated[int, typer.Option(help="Seed of the dithering noise.")] = 0,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output file (files only; embedded "
                                                "bases go to the cache).")] = None,  # fmt: skip
    force: Annotated[bool, typer.Option(help="Rebuild even if the base is already prepared.")] = False,
    json: JsonOpt = False,
) -> None:
    """Turn a quantized GGUF into an F32 base and record its origin in the base's metadata."""
    from mqpredict.base.embedded import EMBEDDED, prepare_embedded
    from mqpredict.base.prepare import prepare_base
    from mqpredict.quant.model import ModelInfo

    with progress_bar(not json) as progress:
        if source in EMBEDDED:
            path = prepare_embedded(source, restore, seed, force, progress)
        else:
            src = Path(source)
            if output is None:
                raise InputError(f"no --output for the base made from {src}", "e.g. -o base-f32.gguf")
            if output.exists() and not force:
                raise InputError(f"{output} exists", "pass --force to replace it")
            path = prepare_base(src, output, restore, seed, progress=progress)
    m = ModelInfo.load(path)
    doc = {"path": str(path), "origin": m.base_origin, "size_bytes": m.header.file_size, **m.descriptors()}
    if json:
        emit_json(doc)
    else:
        err.print(f"base ready: {path} · origin {m.base_origin} · {m.n_params / 1e6:.1f}M params", highlight=False)


@app.command()
def skeleton(
    name: Annotated[str, typer.Argument(help="Whose published shapes: qwen3-30b-a3b.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the sparse GGUF.")],
    json: JsonOpt = False,
) -> None:
    """Write a sparse skeleton GGUF of a real model: its published shapes, no weights (the data section is a
    hole). `inspect` and `size` work on it (presets by llama.cpp's own dry run); building or measuring it
    is refused."""
    from mqpredict.base.skeleton import write_skeleton
    from mqpredict.quant.model import ModelInfo

    m = ModelInfo.load(write_skeleton(output, name))
    used = os.stat(m.path).st_blocks * 512
    doc = {"path": str(m.path), "apparent_size_bytes": m.header.file_size, "disk_bytes": used, **m.descriptors()}
    if json:
        emit_json(doc)
    else:
        err.print(f"wrote {m.path}: {m.name} · {m.n_params / 1e9:.2f} B params ({m.n_params_active / 1e9:.2f} B active) · "
                  f"{m.header.file_size / 1e9:.1f} GB apparent, {used / 1e3:,.0f} kB on disk", highlight=False)  # fmt: skip


@app.command("list")
def list_bases(json: JsonOpt = False) -> None:
    """The embedded bases, their licence, upstream and whether they are prepared."""
    from mqpredict.base.embedded import EMBEDDED, base_path

    rows = [
        {"name": e.name, "package": e.package, "licence": e.licence, "upstream": e.upstream,
         "prepared": base_path(e.name).exists(), "path": str(base_path(e.name)), "note": e.note}
        for e in EMBEDDED.values()
    ]  # fmt: skip
    if json:
        emit_json(rows)
        return
    t = Table(show_edge=False)
    for c in ("name", "package", "licence", "prepared", "upstream"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], r["package"], r["licence"], "yes" if r["prepared"] else "no", r["upstream"])
    out.print(t)
