"""A campaign's wins against the zero-run allocator at the same size: does the learned search beat the free
answer where it claims a win?

    .venv/bin/python benchmarks/allocator_at_wins.py CAMPAIGN_DIR --store STORE [--all] [--threads 1] [--json F]

For every re-confirmed nonlinear win in ``CAMPAIGN_DIR/survivors.csv`` that the policy proposed (``--all``:
the warm-start ones too), ``mqpredict allocate --target-size`` at the win's exact file size (the campaign's
base and imatrix, the command's default types), measured on the campaign's search slice and on its held-out slice (the next as many
stream chunks, as the campaign re-confirms) — records in ``--store`` (the campaign's own store: the win's
held-out record is read from it). Prints win vs allocator per slice; a negative ln ratio means the win is
below the allocator.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

from mqpredict.llama.inprocess import InProcessEngine
from mqpredict.measure.corpus import EvalSpec, Scoring
from mqpredict.quant.config import Config
from mqpredict.quant.imatrix import Imatrix
from mqpredict.quant.model import ModelInfo
from mqpredict.records.identity import identify
from mqpredict.records.schema import Source
from mqpredict.records.store import Store
from mqpredict.search.allocator import Target, allocate, default_types
from mqpredict.surrogate.weight_error import table_for
from mqpredict.workflows.seed import Candidate, seed


def say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("campaign", type=Path, help="a campaign folder (campaign.json, survivors.csv)")
    ap.add_argument("--store", type=Path, required=True, help="the campaign's records store")
    ap.add_argument("--all", action="store_true", help="every re-confirmed win, the warm-start ones too")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    meta = json.loads((a.campaign / "campaign.json").read_text())
    wins = [r for r in csv.DictReader(open(a.campaign / "survivors.csv", newline=""))
            if r["nonlinear_win"] == "True" and (a.all or r["source"] == "proposed")]  # fmt: skip
    if not wins:
        print("no re-confirmed win to compare")
        return
    model = ModelInfo.load(meta["base"])
    im = Imatrix.load(meta["imatrix"]) if meta.get("imatrix") else None
    types = default_types(im)  # what `mqpredict allocate` chooses from
    table = table_for(model, identify(model).model_id, im, a.threads)
    search = EvalSpec(ctx=meta["ctx"], n_chunks=meta["n_chunks"], chunk_offset=meta["chunk_offset"],
                      scoring=Scoring(meta["scoring"]))  # fmt: skip
    held = search.part(search.end, search.n_chunks)
    store = Store(a.store)
    cands = []
    for w in wins:
        got = allocate(model, table, Target(size_bytes=int(w["size_bytes"])), types, im)
        say(f"{w['name']}: allocator {got.size_bytes:,} bytes (the win: {int(w['size_bytes']):,})")
        cands.append(Candidate(got.config, Source.allocator, label=f"allocator@{w['name']}"))
    wins_c = [Candidate(Config.parse(w["config"]), Source.proposed, label=w["name"]) for w in wins]
    out: dict[str, list[dict]] = {}
    with InProcessEngine(model.path, Path(meta["corpus_path"]), search, imatrix=im, threads=a.threads) as eng:
        for name, spec in (("search", search), ("held-out", held)):
            rep = seed(eng, store, cands + wins_c, say=say, keep_vectors=False, spec=spec)
            recs = {r.key: r for r in store.records()}
            out[name] = [dict(recs[rep.keys[i]].values) for i in range(len(cands) + len(wins_c))]
    rows = []
    print(f"{'win':16} {'bpw':>6} {'slice':>8} {'KLD win':>9} {'KLD alloc':>10} {'ln win/alloc':>12}")
    for i, w in enumerate(wins):
        for name in ("search", "held-out"):
            al, wn = out[name][i], out[name][len(cands) + i]
            d = math.log(float(wn["kld_mean"]) / float(al["kld_mean"]))
            rows.append({"win": w["name"], "source": w["source"], "bpw": float(w["bpw"]), "slice": name,
                         "kld_win": float(wn["kld_mean"]), "kld_allocator": float(al["kld_mean"]),
                         "allocator_bpw": float(al["bpw"]), "ln_ratio": d, "allocator_config": al["config"]})  # fmt: skip
            print(f"{w['name']:16} {float(w['bpw']):6.3f} {name:>8} {float(wn['kld_mean']):9.4f} "
                  f"{float(al['kld_mean']):10.4f} {d:+12.3f}")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
