"""A campaign's report, from the records store: survivors, table, plot, recipes and manifests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mqpredict.quant.config import Config
from mqpredict.records.schema import Source
from mqpredict.report import write as W
from mqpredict.report.budget import Budget
from mqpredict.report.survivors import Entry, Rules, select
from mqpredict.workflows.campaign import Campaign
from mqpredict.search.paired import against, margin_to_line
from mqpredict.util import faults


@dataclass(frozen=True)
class Report:
    table_md: Path
    table_csv: Path
    plot: Path
    rows: list[dict]
    chosen: dict | None
    wins: int


def _name(r: dict, i: int) -> str:
    if r["source"] == Source.preset.value:
        return r["config"].removeprefix("preset=")
    return f"mq{i:02d}-{r['bpw']:.2f}bpw"


def write_report(c: Campaign, rules: Rules = Rules(), budget: Budget = Budget(), vram_ctx: int = 8192,
                 speed: bool = False, objective: str = "kld", threads: int = 0, progress=None) -> Report:  # fmt: skip
    """Survivors table, plot, recipes and manifests in the campaign folder; ``speed`` builds every survivor
    and measures its tokens/s with llama-bench (``objective`` may then weigh it)."""
    from mqpredict.errors import InputError
    from mqpredict.llama.quantize import dry_run_types

    if objective not in W.OBJECTIVES:
        raise InputError(f"--objective {objective!r} is not one of: {', '.join(W.OBJECTIVES)}")
    if objective != "kld" and not speed:
        raise InputError(f"--objective {objective} needs the survivors' speed", "add --speed")

    st, out = c.state, c.out
    line, _, ok = c._measured()
    hline, hpresets = c._line(st.heldout)
    hvec = c._vectors_by_key(hpresets) if len(hpresets) else {}
    held = c._records(st.heldout)
    wins = c.wins()
    recs = {r["key"]: r.to_dict() for _, r in ok.iterrows()}
    hybrids = sorted((k for k, r in recs.items() if r["source"] != Source.preset.value), key=lambda k: recs[k]["bpw"])
    names = {k: _name(recs[k], i + 1) for i, k in enumerate(hybrids)}
    names.update({k: _name(r, 0) for k, r in recs.items() if r["source"] == Source.preset.value})
    entries = [Entry(k, names[k], r["config"], r["source"], int(r["size_bytes"]), float(r["bpw"]), float(r["kld_mean"]),
                     r["types_key"] in wins) for k, r in recs.items()]  # fmt: skip
    by_key = {r["key"]: r for _, r in ok.iterrows()}

    def vec(e: Entry):
        return c._vector(by_key[e.key])

    per_window = st.search.scored_per_chunk
    survivors = select(entries, rules, lambda a, b: against(vec(a), vec(b), per_window))
    desc = c.engine.model.descriptors()
    rows = []
    for e in survivors:
        r = recs[e.key]
        m = margin_to_line(vec(e), e.bpw, line, c._vectors_by_key(ok), per_window)
        hm = None
        h = held[(held["types_key"] == r["types_key"])] if len(held) else held
        if len(h) and hline.hull:
            hr = h.iloc[0]
            hm = margin_to_line(c._vector(hr), float(hr["bpw"]), hline, hvec, st.heldout.scored_per_chunk)
        rows.append(W.Row(e, r, m, hm, W.vram_column(e.size_bytes, desc, vram_ctx)))
    if speed:
        rows = _with_speed(c, rows, threads, progress)
    pick = W.chosen_index(rows, budget, desc, objective) if budget.given or objective != "kld" else None
    if pick is not None:
        rows[pick] = W.Row(**{**rows[pick].__dict__, "chosen": True})
    table = W.table_rows(rows)
    W.write_csv(out / "survivors.csv", table)
    faults.point("report", "survivors.csv")
    notes = [f"Base `{c.engine.model.path.name}` · corpus `{st.corpus}` · {st.n_chunks}×{st.ctx} search chunks "
             f"({st.scoring} scoring, offset {st.chunk_offset}) + {st.n_chunks} held-out · campaign `{st.id}`.",
             f"{len(ok)} configs fully measured on the search slice ({sum(1 for r in recs.values() if r['source'] == 'preset')} "
             f"presets); {len(wins)} re-confirmed nonlinear win(s).",
             f"Rules: Pareto front; a bigger survivor must gain > {rules.min_gain:.3f} ln KLD, significant at "
             f"{rules.alpha:g} (paired t test over windows); near-duplicates closer than {rules.spacing_bpw} bpw collapse; wins are kept."]  # fmt: skip
    if speed:
        sp = next(r.speed for r in rows if r.speed is not None)
        notes.append(f"Speed: llama-bench on this machine, {sp.threads} threads, pp{sp.n_prompt} / tg{sp.n_gen}, median "
                     f"± half the spread of {sp.repeats} repeats.")  # fmt: skip
    if pick is not None or budget.given:
        notes.append(f"Best survivor within the budget ({objective}): " + (f"**{rows[pick].entry.name}**" if pick is not None else "none fits"))
    W.write_markdown(out / "survivors.md", f"Survivors · {c.engine.model.name}", rows, notes, vram_ctx)
    faults.point("report", "survivors.md")
    points = [{"bpw": r["bpw"], "kld_mean": r["kld_mean"], "source": r["source"], "config": r["config"]} for r in recs.values()]
    W.plot(out / "pareto.png", f"{c.engine.model.name} · {st.n_chunks}×{st.ctx} tokens of {st.corpus}", points, line, rows)
    faults.point("report", "pareto.png")
    manifest_extra = {"campaign": st.id, "engine_spec": {"ctx": st.ctx, "n_chunks": st.n_chunks}}
    for row in rows:
        cfg = Config.parse(row.record["config"])
        types = c.engine.resolve(cfg) if not cfg.is_preset else dry_run_types(c.engine.model, cfg)
        W.write_recipe(out / "recipes", c.engine.model, row, {k: t.name for k, t in types.items()}, manifest_extra,
                       c.engine.imatrix)  # fmt: skip
        faults.point("report", f"recipe-{row.entry.name}")
    for t in (out / "survivors.md", out / "survivors.csv", out / "pareto.png"):
        c.tracker.log_artifact(t)
    for t in sorted((out / "recipes").glob("*")):
        c.tracker.log_artifact(t, "recipes")
    keep = {r.record["mlflow_run_id"] for r in rows}
    for r in recs.values():  # tag every measured config's run: survivor yes/no
        rid = r.get("mlflow_run_id")
        if isinstance(rid, str) and rid:
            c.tracker.set_tags(rid, {"survivor": "yes" if rid in keep else "no"})
    chosen = table[pick] if pick is not None else None
    return Report(out / "survivors.md", out / "survivors.csv", out / "pareto.png", table, chosen, len(wins))


def _with_speed(c: Campaign, rows: list[W.Row], threads: int, progress) -> list[W.Row]:
    """Build each survivor (a temporary file) and measure its tokens/s."""
    import dataclasses
    import tempfile

    from mqpredict.llama.speed import measure_speed

    out = []
    with tempfile.TemporaryDirectory(prefix="mqpredict-speed-") as tmp:
        for i, r in enumerate(rows):
            if progress:
                progress("speed", i, len(rows))
            path = Path(tmp) / f"{r.entry.name}.gguf"
            c.engine.build(Config.parse(r.record["config"]), path)
            out.append(dataclasses.replace(r, speed=measure_speed(path, threads, llama_bin=getattr(c.engine, "llama_bin", None))))
            path.unlink()
    if progress:
        progress("speed", len(rows), len(rows))
    return out
