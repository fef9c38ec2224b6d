"""Commands about one model and its configs: inspect, size, build, recipe, testmodel."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mqpredict.cli.common import (
    ConfigsOpt,
    EngineName,
    EngineOpt,
    ImatrixOpt,
    JsonOpt,
    LlamaBinOpt,
    QuantizedBaseOpt,
    ThreadsOpt,
    emit_json,
    err,
    fmt_mb,
    load_imatrix,
    out,
    progress_bar,
)
from mqpredict.errors import InputError

BaseArg = Annotated[str, typer.Argument(help="A GGUF file, or the name of an embedded base (smollm2).")]


def _base(arg: str, progress=None) -> Path:
    from mqpredict.base.embedded import resolve_base

    return resolve_base(arg, progress)


def _configs(texts: list[str] | None):
    from mqpredict.quant.config import Config

    if not texts:
        raise InputError("no --config given", "e.g. --config Q4_K_M or --config default=Q4_K,ffn_down=Q6_K")
    return [Config.parse(t) for t in texts]


def _resolver(config, imatrix=None):
    """llama.cpp's dry run for presets (told about the imatrix: some presets choose differently with
    one); explicit configs are resolved from the header alone."""
    if not config.is_preset:
        return None
    from mqpredict.llama.quantize import dry_run_types

    return lambda model, cfg: dry_run_types(model, cfg, imatrix=imatrix)


def inspect(model: Annotated[Path, typer.Argument(help="A GGUF file.")], json: JsonOpt = False) -> None:
    """Architecture, tensor groups found, parameters and type(s) per group, bits per weight.

    For a mixture of experts, each group's "active" is the fraction of its parameters one token uses
    (experts used / experts for the routed experts, 1 elsewhere)."""
    from mqpredict.quant.model import ModelInfo
    from mqpredict.quant.types import bpw

    m = ModelInfo.load(model)
    active = m.group_active()
    groups = []
    for g, ts in m.groups.items():
        n = sum(t.n_elements for t in ts)
        mix = m.group_type_mix()[g]
        rows = sorted({t.shape[0] for t in ts})
        groups.append(
            {
                "group": g,
                "n_tensors": len(ts),
                "n_params": n,
                "share": n / m.n_params,
                "active": active[g],
                "types": {t.name: c for t, c in sorted(mix.items(), key=lambda x: -x[1])},
                "bpw": sum(bpw(t) * c for t, c in mix.items()) / n,
                "row_lengths": rows,
                "k_quants": all(r % 256 == 0 for r in rows),
                "example": ts[0].name,
            }
        )
    fixed = m.fixed
    doc = {
        "file": str(m.path),
        "size_bytes": m.header.file_size,
        **m.descriptors(),
        "bpw": m.bpw,
        "groups": groups,
        "fixed": {"n_tensors": len(fixed), "n_params": sum(t.n_elements for t in fixed), "names": [t.name for t in fixed]},
        "quantized": bool(m.quantized_tensors),
    }
    if json:
        emit_json(doc)
        return
    d = m.descriptors()
    out.print(
        f"[bold]{m.path.name}[/]  {d['architecture']} · {d['n_params'] / 1e6:,.1f}M params · {d['n_layers']} layers · "
        f"n_embd {d['n_embd']} · n_ff {d['n_ff']} · vocab {d['n_vocab']} · "
        f"{'tied' if d['tied_embeddings'] else 'untied'} embeddings · {fmt_mb(m.header.file_size)} MB · {m.bpw:.2f} bpw"
        f" · base origin: {d['base_origin']}",
        highlight=False,
    )
    moe = bool(m.n_expert)
    if moe:
        out.print(
            f"mixture of experts: {m.n_expert} routed experts per layer, {m.n_expert_used} used per token · "
            f"{m.n_params_active / 1e6:,.2f}M of {m.n_params / 1e6:,.2f}M params active per token "
            f"({m.n_params_active / m.n_params:.1%})",
            highlight=False,
        )
    t = Table(show_edge=False)
    cols = ("group", "tensors", "params", "share", *(("active",) if moe else ()), "types (by params)", "bpw", "K-quants")
    for c in cols:
        t.add_column(c, justify="right" if c in ("tensors", "params", "share", "active", "bpw") else "left")
    for g in groups:
        types = ", ".join(f"{k} {v / g['n_params']:.0%}" if len(g["types"]) > 1 else k for k, v in g["types"].items())
        kq = "yes" if g["k_quants"] else "falls back"
        act = (f"{g['active']:.0%}",) if moe else ()
        t.add_row(g["group"], str(g["n_tensors"]), f"{g['n_params']:,}", f"{g['share']:.1%}", *act, types,
                  f"{g['bpw']:.2f}", kq)  # fmt: skip
    out.print(t)
    out.print(
        f"fixed (never quantized by llama.cpp): {len(fixed)} tensors, {doc['fixed']['n_params']:,} params "
        f"(e.g. {', '.join(x.name for x in fixed[:3])})",
        highlight=False,
    )
    no_k = [g["group"] for g in groups if not g["k_quants"]]
    if no_k:
        out.print(
            f"[yellow]note:[/] row lengths not divisible by 256 in {', '.join(no_k)}: K-quants fall back there "
            f"(Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, Q2_K/Q3_K→Q4_0, IQ4_XS→IQ4_NL)",
            highlight=False,
        )
    if m.quantized_tensors:
        out.print("[yellow]note:[/] this file is quantized; as a base it would make its own grid look free")


def size(
    base: BaseArg,
    config: ConfigsOpt = None,
    imatrix: ImatrixOpt = None,
    json: JsonOpt = False,
) -> None:
    """Exact file size and bpw of configs, computed before anything is built.

    Explicit configs need only the base's header (about a second even for a 100 GB file); presets ask
    llama.cpp for its per-tensor choices with a dry run. With one --config, --json gives an object with
    size_bytes, bpw and tensors (name, group, type, bytes); with several, a list of them in order.
    """
    from mqpredict.quant.model import ModelInfo
    from mqpredict.quant.resolve import resolve
    from mqpredict.quant.size import size_of

    m = ModelInfo.load(_base(base))
    im = load_imatrix(imatrix)
    if im is not None:
        im.check_model(m)
    rows = []
    for c in _configs(config):
        rep = size_of(m, resolve(m, c, _resolver(c, im), im), im)
        rows.append({"config": c.key, **rep.to_json()})
    if json:
        emit_json(rows[0] if len(rows) == 1 else rows)
        return
    t = Table(show_edge=False)
    for col in ("config", "size (MB)", "bytes", "bpw"):
        t.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        t.add_row(r["config"], fmt_mb(r["size_bytes"]), f"{r['size_bytes']:,}", f"{r['bpw']:.3f}")
    out.print(t)


def build(
    base: BaseArg,
    config: Annotated[str, typer.Option("--config", "-c", help="The config to build (see `size --help`).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the GGUF.")],
    imatrix: ImatrixOpt = None,
    engine: EngineOpt = EngineName.inprocess,
    llama_bin: LlamaBinOpt = None,
    threads: ThreadsOpt = 0,
    allow_quantized_base: QuantizedBaseOpt = False,
    json: JsonOpt = False,
) -> None:
    """Build the hybrid GGUF of a config (loadable by llama.cpp); prints its effective types' summary."""
    from mqpredict.cli.common import make_engine
    from mqpredict.measure.corpus import EvalSpec

    cfg = _configs([config])[0]
    with progress_bar(not json) as progress:
        eng = make_engine(_base(base, progress), None, EvalSpec(), engine, llama_bin, threads,
                          allow_quantized_base, progress, imatrix=load_imatrix(imatrix))  # fmt: skip
        with eng:
            built = eng.build(cfg, output)
    doc = {"config": cfg.key, "path": str(built.path), "types_key": built.types_key, **built.size.to_json(),
           "seconds": built.seconds}  # fmt: skip
    if json:
        emit_json(doc)
    else:
        err.print(
            f"wrote {built.path} · {fmt_mb(built.size.size_bytes)} MB · {built.size.bpw:.3f} bpw · {built.seconds:.2f} s",
            highlight=False,
        )


def recipe(
    base: BaseArg,
    config: Annotated[str, typer.Option("--config", "-c", help="The config to export.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The --tensor-type-file to write.")] = Path(
        "tensor-types.txt"
    ),
    gguf_out: Annotated[str, typer.Option("--gguf-out", help="Output path to put in the printed command.")] = "OUT.gguf",
    imatrix: ImatrixOpt = None,
    json: JsonOpt = False,
) -> None:
    """Export a config as a llama-quantize --tensor-type-file plus the exact command line that builds it.

    With --imatrix the command quantizes with it; it names the imatrix by its file name, as mqpredict
    writes it into the GGUF, so run it in the imatrix's folder for a byte-identical file."""
    from mqpredict.quant.model import ModelInfo

    cfg = _configs([config])[0]
    m = ModelInfo.load(_base(base))
    im = load_imatrix(imatrix)
    if im is not None:
        im.check_model(m)
    doc = write_recipe(m, cfg, output, gguf_out, im)
    if json:
        emit_json(doc)
    else:
        err.print(f"wrote {doc['tensor_type_file']} ({len(doc['lines'])} patterns)"
                  + (f"; run the command in {doc['cwd']}" if doc["cwd"] else ""))  # fmt: skip
        print(" ".join(doc["command"]))


def write_recipe(m, cfg, output: Path, gguf_out: str, im=None) -> dict:
    """Write the --tensor-type-file of ``cfg`` and return it with the exact llama-quantize command (``cwd``:
    where to run it — the imatrix's folder, every other path absolute — or None)."""
    from mqpredict.quant.model import ModelInfo
    from mqpredict.quant.resolve import quantize_command, tensor_type_lines
    from mqpredict.util.atomic import atomic_write_text

    lines = tensor_type_lines(m, cfg)
    atomic_write_text(output, "\n".join(lines) + ("\n" if lines else ""))
    cwd = str(im.path.resolve().parent) if im is not None else None
    if im is not None:  # the command runs in the imatrix's folder: every other path absolute
        m, gguf_out, output = ModelInfo.load(m.path.resolve()), str(Path(gguf_out).resolve()), output.resolve()
    cmd = quantize_command(m, cfg, gguf_out, str(output), imatrix=im)
    return {"config": cfg.key, "tensor_type_file": str(output), "lines": lines, "command": cmd, "cwd": cwd}


def testmodel(
    output: Annotated[Path, typer.Argument(help="Where to write the tiny GGUF.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    n_embd: Annotated[int, typer.Option("--n-embd", help="Hidden size (256 is K-quant friendly; 576 is SmolLM2's).")] = 256,
    n_ff: Annotated[int | None, typer.Option("--n-ff", help="Feed-forward size (with --experts: of each expert). "
                                             "Default: 768, with experts 256.")] = None,  # fmt: skip
    layers: Annotated[int, typer.Option("--layers", help="Transformer blocks.")] = 4,
    n_vocab: Annotated[int, typer.Option("--n-vocab", help="Vocabulary size (bytes + characters + pieces).")] = 512,
    tied: Annotated[bool, typer.Option("--tied", help="Tie the output projection to the embeddings.")] = False,
    experts: Annotated[int, typer.Option("--experts", help="Routed experts per layer: a mixture-of-experts model "
                                         "(qwen3moe) instead of a dense llama one.")] = 0,  # fmt: skip
    experts_used: Annotated[int, typer.Option("--experts-used", help="Experts each token is routed to.")] = 2,
    shared_expert: Annotated[bool, typer.Option("--shared-expert", help="Add an always-on shared expert to every "
                                                "layer (granitemoe).")] = False,  # fmt: skip
    shared_expert_gate: Annotated[bool, typer.Option("--shared-expert-gate", help="Put the shared expert behind a "
                                                     "sigmoid gate of its own (qwen2moe).")] = False,  # fmt: skip
) -> None:
    """Write a deterministic tiny GGUF (F32, working tokenizer) for tests and experiments: a llama model, or
    with --experts a mixture of experts llama.cpp runs as one (router, 3-D expert tensors, optional shared expert)."""
    from mqpredict.base.testmodel import TinyShape, write_test_model

    if not experts and (shared_expert or shared_expert_gate):
        raise InputError("--shared-expert needs --experts", "e.g. --experts 4 --experts-used 2 --shared-expert")
    moe = {"n_expert": experts, "n_expert_used": experts_used, "shared_expert": shared_expert or shared_expert_gate,
           "shared_expert_gate": shared_expert_gate} if experts else {}  # fmt: skip
    shape = TinyShape(n_embd, n_ff or (256 if experts else 768), layers, n_vocab, tied=tied, **moe)
    p = write_test_model(output, seed, shape)
    err.print(f"wrote {p} ({fmt_mb(p.stat().st_size)} MB, {shape.arch})")


def register(app: typer.Typer) -> None:
    for f in (inspect, size, build, recipe, testmodel):
        app.command()(f)
