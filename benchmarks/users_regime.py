"""The users' regime on one model: what an importance matrix buys each preset, and what the zero-run
allocator buys over the imatrix presets at each preset's exact size.

    .venv/bin/python benchmarks/users_regime.py smollm2 --threads 1
    .venv/bin/python benchmarks/users_regime.py qwen2.5-coder-1.5b --tokens 1024 --only Q6_K --only Q4_K_M ...

For every preset (the 16 standard ones, or ``--only``): the preset quantized without an imatrix, the same
preset quantized with the model's imatrix on the shipped calibration text (computed once, cached), and
``mqpredict allocate``'s config at that imatrix file's exact size (imatrix-weighted errors, the default
types and the imatrix-only ones), all measured in process on the same streamed tokens of the bundled
corpus (``--no-plain``: the imatrix presets and the allocator only, so the imatrix-only presets can join).
Every measurement is a record in ``--store`` (``seed``'s rules: re-running measures only what is
missing, a preset that makes the same file as another is measured once), so a run on a big model can be
stopped and continued. Prints one row per preset and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from mqpredict.base.embedded import resolve_base
from mqpredict.llama.imatrix import ImatrixSettings, compute_imatrix
from mqpredict.llama.inprocess import InProcessEngine
from mqpredict.measure.corpus import EvalSpec, Scoring
from mqpredict.quant.model import ModelInfo
from mqpredict.records.identity import identify
from mqpredict.records.schema import Source
from mqpredict.records.store import Store
from mqpredict.search.allocator import Target, allocate, default_types
from mqpredict.surrogate.weight_error import table_for
from mqpredict.util.paths import DEFAULT_CALIBRATION, DEFAULT_CORPUS
from mqpredict.workflows.seed import Candidate, pick_presets, preset_candidates, seed


def say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def measured(eng: InProcessEngine, store: Store, cands: list[Candidate]) -> list[dict | None]:
    """Seed ``cands`` (what the store lacks) and return each one's record (None: it failed or was skipped)."""
    report = seed(eng, store, cands, say=say, keep_vectors=False)
    recs = {r.key: r for r in store.records()}
    out = []
    for i in range(len(cands)):
        r = recs.get(report.keys.get(i, ""))
        out.append(dict(r.values) if r is not None and r["status"] == "ok" else None)
    return out


def pct(a: float | None, b: float | None) -> float | None:
    """Relative change of ``a`` against ``b``, in %."""
    return None if a is None or b is None else 100.0 * (a / b - 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base", help="an embedded base (smollm2, gemma3-270m, qwen2.5-0.5b, qwen2.5-coder-1.5b) or a GGUF")
    ap.add_argument("--store", default="records-users-regime", help="records store (created if missing)")
    ap.add_argument("--only", action="append", metavar="PRESET", help="only this preset (repeatable)")
    ap.add_argument("--tokens", type=int, default=2048, help="scored tokens, streamed (ctx 512)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-allocator", action="store_true", help="presets only")
    ap.add_argument("--no-plain", action="store_true", help="no presets without an imatrix (imatrix presets and allocator)")
    ap.add_argument("--json", type=Path, help="write the table here")
    a = ap.parse_args()

    t0 = time.time()
    path = resolve_base(a.base)
    model = ModelInfo.load(path)
    ident = identify(model)
    presets = pick_presets(a.no_plain, bool(model.n_expert), a.only or ())
    spec = EvalSpec.from_tokens(a.tokens, 512, scoring=Scoring.stream)
    store = Store(a.store)
    im, _ = compute_imatrix(path, DEFAULT_CALIBRATION, None, ImatrixSettings(), threads=a.threads)
    say(f"{path.name}: {len(presets)} presets, imatrix {im.id}, {spec.n_chunks} chunks of {spec.ctx} streamed")
    plain: list[dict | None] = [None] * len(presets)
    if not a.no_plain:
        with InProcessEngine(path, DEFAULT_CORPUS, spec, threads=a.threads) as eng:
            plain = measured(eng, store, preset_candidates(presets))
    with InProcessEngine(path, DEFAULT_CORPUS, spec, imatrix=im, threads=a.threads) as eng:
        withim = measured(eng, store, preset_candidates(presets))
        alloc: list[dict | None] = [None] * len(presets)
        if not a.no_allocator:
            table = table_for(model, ident.model_id, im, a.threads)
            cands, where = [], []
            for i, r in enumerate(withim):
                if r is None:
                    continue
                got = allocate(model, table, Target(size_bytes=int(r["size_bytes"])), default_types(im), im)
                cands.append(Candidate(got.config, Source.allocator, label=f"allocator@{presets[i].value}"))
                where.append(i)
            for i, r in zip(where, measured(eng, store, cands), strict=True):
                alloc[i] = r
    rows = []
    for p, r0, r1, ra in zip(presets, plain, withim, alloc, strict=True):
        g = lambda r, k: None if r is None else float(r[k])
        rows.append({"preset": p.value, "bpw": g(r1, "bpw") or g(r0, "bpw"), "size_bytes": g(r1, "size_bytes"),
                     "kld_plain": g(r0, "kld_mean"), "kld_imatrix": g(r1, "kld_mean"),
                     "imatrix_change_pct": pct(g(r1, "kld_mean"), g(r0, "kld_mean")),
                     "allocator_bpw": g(ra, "bpw"), "allocator_size_bytes": g(ra, "size_bytes"),
                     "kld_allocator": g(ra, "kld_mean"), "allocator_config": None if ra is None else ra["config"],
                     "allocator_change_pct": pct(g(ra, "kld_mean"), g(r1, "kld_mean"))})  # fmt: skip
    print(f"{path.name} · imatrix {im.id} · {spec.n_chunks}×{spec.ctx} streamed ({spec.n_tokens} scored tokens)")
    print(f"{'preset':8} {'bpw':>6} {'KLD plain':>10} {'KLD imatrix':>11} {'imatrix':>8} {'alloc bpw':>9} "
          f"{'KLD alloc':>10} {'alloc':>8}")  # fmt: skip
    f = lambda x, s: "—" if x is None else format(x, s)
    pc = lambda x: "—" if x is None else f"{x:+7.1f}%"
    for r in rows:
        print(f"{r['preset']:8} {f(r['bpw'], '6.3f')} {f(r['kld_plain'], '10.5f')} {f(r['kld_imatrix'], '11.5f')} "
              f"{pc(r['imatrix_change_pct'])} {f(r['allocator_bpw'], '9.3f')} {f(r['kld_allocator'], '10.5f')} "
              f"{pc(r['allocator_change_pct'])}")  # fmt: skip
    summary = {}
    for k in ("imatrix_change_pct", "allocator_change_pct"):
        v = [r[k] for r in rows if r[k] is not None and math.isfinite(r[k])]
        summary[k] = {"median": statistics.median(v) if v else None, "n": len(v),
                      "better": sum(x < 0 for x in v)}  # fmt: skip
    print(f"imatrix vs plain: median {f(summary['imatrix_change_pct']['median'], '+.1f')}% KLD, lower on "
          f"{summary['imatrix_change_pct']['better']} of {summary['imatrix_change_pct']['n']} presets")  # fmt: skip
    if not a.no_allocator:
        print(f"allocator vs imatrix preset at the same size: median {f(summary['allocator_change_pct']['median'], '+.1f')}% "
              f"KLD, lower on {summary['allocator_change_pct']['better']} of {summary['allocator_change_pct']['n']}")  # fmt: skip
    doc = {"base": path.name, "model_id": ident.model_id, "imatrix_id": im.id, "ctx": spec.ctx,
           "n_chunks": spec.n_chunks, "scoring": spec.scoring.value, "tokens": spec.n_tokens, "rows": rows,
           "summary": summary, "seconds": time.time() - t0}  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
