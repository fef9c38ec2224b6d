"""``mqpredict data …`` (the records store) and ``mqpredict seed``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mqpredict.cli.common import (
    DEFAULTS, CorpusOpt, CtxOpt, EngineName, EngineOpt, ExperimentOpt, ImatrixOpt, JsonOpt, LlamaBinOpt, NoImatrixOpt,
    NoTrackOpt, QuantizedBaseOpt, ScoringOpt, ThreadsOpt, TokensOpt, ToolsKLDOpt, TrackingUriOpt, base_notes, emit_json,
    err, imatrix_or_default, make_engine, make_tracker, out, progress_bar, scoring_for, spec_from,
)  # fmt: skip
from mqpredict.cli.model_cmds import BaseArg, _base
from mqpredict.errors import InputError

app = typer.Typer(help="The records store: ingest configs and measurements, export, list, validate.",
                  no_args_is_help=True)  # fmt: skip

StoreOpt = Annotated[
    Path | None,
    typer.Option("--store", help="Records store folder (default: $MQPREDICT_STORE, else ./records)."),
]
FormatOpt = Annotated[str | None, typer.Option("--format", help="Format of a new store: sqlite (default), csv (diffs in "
                                               "git, rewritten on every append) or parquet.")]


def _store(path: Path | None, fmt: str | None = None, create: bool = True):
    from mqpredict.records.store import Store, default_store

    return Store(path or default_store(), fmt, create=create)


@app.command("from-gguf")
def from_gguf(
    files: Annotated[list[Path], typer.Argument(help="GGUF files (headers only are read).")],
    check: Annotated[
        Path | None,
        typer.Option("--check", help="Rebuild each config on this base and compare tensor for tensor (types and "
                     "bytes; header differences listed apart). Bytes match only on the file's own base."),  # fmt: skip
    ] = None,
    allow_quantized_base: QuantizedBaseOpt = False,
    json: JsonOpt = False,
) -> None:
    """Turn GGUFs' per-tensor types into configs (+ group type fractions), reading only their headers.

    The config is the canonical key `--config` accepts; it rebuilds the same per-tensor types on the same
    model, and can be measured on another model (`mqpredict seed BASE --from-gguf FILE`).
    """
    from mqpredict.records.ingest import from_gguf as derive

    derived = [derive(f) for f in files]
    docs = [d.to_json() for d in derived]
    if check is not None:
        from mqpredict.measure.corpus import EvalSpec
        from mqpredict.records.rebuild import rebuild_check

        with make_engine(_base(str(check)), None, EvalSpec(), EngineName.inprocess, None, 0, allow_quantized_base,
                         None) as eng:  # fmt: skip
            for d, doc in zip(derived, docs):
                doc["check"] = rebuild_check(d, eng).to_json()
    if json:
        emit_json(docs)
        return
    for d in docs:
        out.print(f"[bold]{d['file']}[/] ({d['architecture']}, {d['n_params'] / 1e6:.1f}M, {d['bpw']:.2f} bpw)",
                  highlight=False)  # fmt: skip
        out.print(f"  config: {d['config']}", highlight=False, soft_wrap=True)
        for g, mix in d["fractions"].items():
            out.print(f"  {g:14} " + ", ".join(f"{t} {v:.0%}" for t, v in mix.items()), highlight=False)
        if "check" in d:
            c = d["check"]
            types = "match" if c["types_match"] else "DIFFER"
            nbytes = "match" if c["bytes_match"] else f"differ in {c['n_bytes_differ']} tensors"
            hdr = ", ".join(c["header_differ"]) or "none"
            out.print(f"  rebuilt on {check}: types {types}, bytes {nbytes}; header keys that differ: {hdr}",
                      highlight=False)  # fmt: skip
        if d["dynamic_groups"]:
            out.print("  dynamic groups (unlisted tensor names): "
                      + "; ".join(f"{g}: {', '.join(n[:3])}" for g, n in d["dynamic_groups"].items()), highlight=False)  # fmt: skip


@app.command("import")
def import_(
    table: Annotated[Path, typer.Argument(help="A records CSV (from `data export`), a community table, or the "
                                              "text output of llama-perplexity --kl-divergence.")],  # fmt: skip
    store: StoreOpt = None,
    base: Annotated[Path | None, typer.Option("--base", help="The base a community table / llama-perplexity run "
                                                            "was measured on.")] = None,  # fmt: skip
    gguf: Annotated[Path | None, typer.Option("--gguf", help="llama-perplexity output: the quantized GGUF it ran on.")] = None,
    corpus: Annotated[Path | None, typer.Option("--corpus", help="llama-perplexity output: the text it ran on.")] = None,
    author: Annotated[str | None, typer.Option("--author", help="Who measured it (provenance).")] = None,
    fmt: FormatOpt = None,
    json: JsonOpt = False,
) -> None:
    """Import measurements. Every row is validated first; any malformed row rejects the file (row numbers
    and reasons) and nothing is written. Nothing in the file is executed."""
    from mqpredict.records.exchange import import_csv, import_llama_perplexity

    st = _store(store, fmt)
    head = table.read_text(encoding="utf-8", errors="replace")[:4096] if table.is_file() else ""
    if not table.is_file():
        raise InputError(f"{table}: no such file")
    if "kl_divergence: computing over" in head or "llama_perplexity" in head or table.suffix in (".txt", ".log"):
        if not (base and gguf and corpus):
            raise InputError(f"{table} looks like llama-perplexity output", "give --base, --gguf and --corpus")
        recs, fmt = [import_llama_perplexity(table, st, base, gguf, corpus, author)], "llama-perplexity"
    else:
        recs, fmt = import_csv(table, st, base)
    doc = {"file": str(table), "format": fmt, "records": len(recs), "store": str(st.root)}
    if json:
        emit_json(doc)
    else:
        err.print(f"imported {len(recs)} record(s) from {table} ({fmt}) into {st.root}", highlight=False)


@app.command()
def export(
    output: Annotated[Path, typer.Option("--output", "-o", help="CSV to write (the format `data import` reads).")],
    store: StoreOpt = None,
    json: JsonOpt = False,
) -> None:
    """Write every record as CSV: exactly what `data import` reads back (a round trip loses nothing)."""
    from mqpredict.records.exchange import export_csv

    n = export_csv(_store(store, create=False), output)
    if json:
        emit_json({"file": str(output), "records": n})
    else:
        err.print(f"wrote {n} record(s) to {output}")


@app.command("list")
def list_(store: StoreOpt = None, json: JsonOpt = False) -> None:
    """Record counts per model, source and status."""
    rows = _store(store, create=False).counts()
    if json:
        emit_json(rows)
        return
    t = Table(show_edge=False)
    for c in ("model", "family", "source", "status", "count"):
        t.add_column(c, justify="right" if c == "count" else "left")
    for r in rows:
        t.add_row(r["model"], r["family"], r["source"], r["status"], str(r["count"]))
    out.print(t)


@app.command()
def validate(store: StoreOpt = None, json: JsonOpt = False) -> None:
    """Check every row of the store (types, values, keys, per-token files); non-zero exit on problems."""
    st = _store(store, create=False)
    problems = st.validate()
    if json:
        emit_json({"store": str(st.root), "problems": problems})
    elif problems:
        for p in problems:
            err.print(f"{st.table}: {p}", highlight=False)
    else:
        err.print(f"{st.root}: {len(st.records())} records, no problems")
    if problems:
        raise typer.Exit(1)


@app.command()
def migrate(
    folder: Annotated[Path | None, typer.Argument(help="The store to migrate (default: --store, $MQPREDICT_STORE, "
                                                     "else ./records).")] = None,  # fmt: skip
    store: StoreOpt = None,
    json: JsonOpt = False,
) -> None:
    """Make a CSV or Parquet store an SQLite store, in place and once (appends then cost the same whatever
    the store holds). Every row is validated first; the old table is kept beside it as *.migrated.
    CSV stores keep working without it (the shipped dataset stays CSV: it diffs in git)."""
    from mqpredict.records.migrate import migrate as run
    from mqpredict.records.store import default_store

    m = run(folder or store or default_store())
    if json:
        emit_json(m.to_json())
    else:
        err.print(m.message, highlight=False, soft_wrap=True)


def seed(
    base: BaseArg,
    corpus: CorpusOpt = DEFAULTS["corpus"],
    store: StoreOpt = None,
    recipes: Annotated[Path | None, typer.Option("--recipes", help="A folder of recipes (e.g. datasets/recipes).")] = None,
    from_gguf: Annotated[
        list[Path] | None, typer.Option("--from-gguf", help="Measure the config of this GGUF (header only; repeatable).")
    ] = None,
    presets: Annotated[bool, typer.Option("--presets/--no-presets", help="Measure the standard presets (with an "
                                          "imatrix also the 11 made for one, IQ3_M … IQ1_S).")] = True,  # fmt: skip
    only: Annotated[list[str] | None, typer.Option("--only", metavar="PRESET", help="Measure only this preset "
                                                   "(repeatable, e.g. --only Q8_0 --only Q4_K_M): a cheap line on a big "
                                                   "model.")] = None,  # fmt: skip
    imatrix: ImatrixOpt = None,
    no_imatrix: NoImatrixOpt = False,
    ctx: CtxOpt = DEFAULTS["ctx"],
    tokens: TokensOpt = DEFAULTS["tokens"],
    scoring: ScoringOpt = None,
    engine: EngineOpt = EngineName.inprocess,
    llama_bin: LlamaBinOpt = None,
    tools_kld: ToolsKLDOpt = "statistics",
    threads: ThreadsOpt = 0,
    fmt: FormatOpt = None,
    allow_quantized_base: QuantizedBaseOpt = False,
    tracking_uri: TrackingUriOpt = None,
    experiment: ExperimentOpt = None,
    no_track: NoTrackOpt = False,
    json: JsonOpt = False,
) -> None:
    """Measure the configs people already use on a base and keep them as records.

    Every standard preset (Q8_0 … Q2_K, 16 of them; with an importance matrix also IQ3_M … IQ1_S), plus
    recipes and configs read from GGUF headers, adapted to this model. Builds are quantized with an
    imatrix computed on the shipped calibration text unless --imatrix FILE or --no-imatrix says otherwise. Configs that make the same file as one already measured are skipped; each
    record is stored as soon as it is measured, so a re-run (or a run after Ctrl-C / kill -9) continues
    where it stopped. Prints the model's records with the presets' line.
    """
    from mqpredict.quant.model import ModelInfo
    from mqpredict.workflows import seed as seeding
    from mqpredict.records.ingest import from_gguf as derive
    from mqpredict.records.ingest import load_recipes

    cands: list = []
    notes: list[str] = []
    if recipes:
        found, skipped = load_recipes(recipes)
        cands += seeding.recipe_candidates(found)
        notes += [f"recipe skipped: {s}" for s in skipped]
    cands += seeding.gguf_candidates([derive(f) for f in from_gguf or []])
    if not cands and not presets:
        raise InputError("nothing to seed", "keep --presets, or give --recipes / --from-gguf")
    if only and not presets:
        raise InputError("--only picks among the presets and --no-presets measures none", "drop one of the two")
    if only:  # the names are checked before anything is loaded
        from mqpredict.quant.presets import require_preset

        for o in only:
            require_preset(o)
    st = _store(store, fmt)
    spec = spec_from(ctx, tokens, 0, scoring_for(scoring, engine))
    with progress_bar(not json) as progress:
        path = _base(base, progress)
        if presets:  # checked before the imatrix is computed: a refusal costs nothing
            moe = bool(ModelInfo.load(path).n_expert)  # a mixture of experts also gets MXFP4_MOE
            picked = seeding.pick_presets(not no_imatrix, moe, only or ())
            cands = seeding.preset_candidates(tuple(picked)) + cands
        im = imatrix_or_default(path, imatrix, no_imatrix, threads, progress)
        eng = make_engine(path, corpus, spec, engine, llama_bin, threads, allow_quantized_base, progress, tools_kld, im)
        tracker = make_tracker(no_track, tracking_uri, experiment)
        with eng:
            rep = seeding.seed(eng, st, cands, progress, None if json else lambda s: err.print(s, highlight=False),
                               tracker=tracker)  # fmt: skip
            model_id = None
            if rep.measured or rep.same_file or rep.failed:
                from mqpredict.records.identity import identify

                model_id = identify(eng.model).model_id
    rep.notes = notes + rep.notes
    rows = _model_rows(st, model_id, spec, eng) if model_id else []
    if json:
        emit_json({"store": str(st.root), **rep.to_json(), "records": rows})
        return
    from mqpredict.cli.measure_cmd import print_table

    print_table(rows, f"{path.name} · {spec.n_chunks}×{spec.ctx} {spec.scoring.value} · records in {st.root}", line=True)
    out.print(base_notes(ModelInfo.load(path)), highlight=False)
    for n in rep.notes:
        err.print(f"note: {n}", highlight=False)
    for c, why in rep.skipped:
        err.print(f"skipped {c}: {why}", highlight=False)
    err.print(f"measured {len(rep.measured)}, failed {len(rep.failed)}, same file as another {len(rep.same_file)}, "
              f"skipped {len(rep.skipped)}", highlight=False)  # fmt: skip


def _model_rows(st, model_id: str, spec, eng) -> list[dict]:
    """This model's ok records in this context (corpus, slice, scoring, imatrix), as table rows (smallest first)."""
    from mqpredict.records.context import Context

    context = Context.of(eng, model_id, spec)
    rows = []
    for r in st.records():
        v = r.values
        if not context.matches(v) or v["status"] != "ok":
            continue
        label = Path(v["provenance_file"]).name if v["source"] in ("recipe", "community") and v["provenance_file"] else None
        rows.append({**v, "seconds_eval": None, "label": f"{v['source']}:{label}" if label else None})
    return sorted(rows, key=lambda r: r["size_bytes"])
