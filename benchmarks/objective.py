"""How well the zero-run allocator's objective orders real configs: Spearman of the objective against measured
KLD over every real model's shipped records, per context (model, imatrix, corpus, scoring, tokens).

    .venv/bin/python benchmarks/objective.py [--records datasets/records/records.csv] [--min-rows 8] [--json F]

Two objectives from the same shipped tables (``datasets/weight_errors/``, tables with per-tensor data):
``weights`` — what ``mqpredict allocate`` minimises, Σ relative error × the parameters a token uses
(:meth:`ErrorTable.config_error`) — and ``energy`` — Σ relative error × the tensor's energy ``Σ a_j w²``, each
tensor's output error, the objective before (an untied token_embd's energy is here its rows as layer 0's
norm sees them, not the old one-row-per-token weight). A context enters with at least ``--min-rows`` records.
No model and no KLD run: tables and records only.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

from mqpredict.surrogate.data import load_tables
from mqpredict.surrogate.weight_error import ErrorTable

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = ["model_id", "imatrix_id", "corpus", "scoring", "n_tokens"]


def energy_error(table: ErrorTable, fractions: dict[str, dict[str, float]]) -> float:
    """Σ_g energy_g Σ_type fraction × err_g(type): the summed output error of the tensors."""
    energy = {g: 0.0 for g in table.errors}
    for t, g in table.tensor_groups.items():
        energy[g] += table.energy[t]
    return sum(energy[g] * f * (table.mse(g, q) or 0.0) for g, mix in fractions.items() if g in energy
               for q, f in mix.items())  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=Path, default=ROOT / "datasets" / "records" / "records.csv")
    ap.add_argument("--tables", type=Path, default=ROOT / "datasets" / "weight_errors")
    ap.add_argument("--min-rows", type=int, default=8)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    tables = {k: t for k, t in load_tables(a.tables).items() if t.tensors and t.weights}
    df = pd.read_csv(a.records, keep_default_na=False, na_values={"kld_mean": [""]})
    df = df[(df["status"] == "ok") & (df["synthetic"].astype(str) == "False") & df["kld_mean"].notna()]
    rows = []
    for ctx, g in df.groupby(CONTEXT, sort=True):
        key = ctx[0] + (f"-im{ctx[1]}" if ctx[1] else "")
        if key not in tables or len(g) < a.min_rows:
            continue
        t = tables[key]
        fr = [json.loads(f) for f in g["fractions"]]
        kld = g["kld_mean"].astype(float).to_numpy()
        rows.append({"model": g["model_name"].iloc[0], "imatrix": bool(ctx[1]), "scoring": ctx[3],
                     "tokens": int(ctx[4]), "n": len(g),
                     "weights": float(spearmanr(kld, [t.config_error(f) for f in fr])[0]),
                     "energy": float(spearmanr(kld, [energy_error(t, f) for f in fr])[0])})  # fmt: skip
    print(f"{'model':34} {'imatrix':>7} {'scoring':>8} {'tokens':>6} {'n':>4} {'weights':>8} {'energy':>8}")
    for r in rows:
        print(f"{r['model'][:34]:34} {str(r['imatrix']):>7} {r['scoring']:>8} {r['tokens']:>6} {r['n']:>4} "
              f"{r['weights']:8.3f} {r['energy']:8.3f}")  # fmt: skip
    for k in ("weights", "energy"):
        v = [r[k] for r in rows if not math.isnan(r[k])]
        print(f"{k}: mean Spearman {sum(v) / len(v):.3f}, lowest {min(v):.3f} over {len(v)} contexts")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
