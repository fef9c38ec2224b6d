"""Records → a training set: features, targets and who each row belongs to.

Records are grouped by measurement context (model, corpus, ctx, batch layout, token slice, build);
each context needs its **reference** (the Q8_0 preset) and every other record's targets are measured
against it, which cancels most of the corpus/ctx/model-scale offset:

    y_kld  = ln KLD − ln KLD_ref          y_p99  = ln p99 KLD − ln p99_ref
    y_miss = ln(1 − same_top) − ln(1 − same_top_ref)        (same-top misses, floored at 1e-4)

The zero-shot path predicts ``ln KLD_ref`` itself from the model (one row per context).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mqpredict.surrogate import features as F
from mqpredict.surrogate.weight_error import ErrorTable

CONTEXT = ["model_id", "corpus", "ctx", "n_batch", "chunk_offset", "n_chunks", "build"]
TARGETS = ("kld", "p99", "miss")
REFERENCE = "preset=Q8_0"
_MISS_FLOOR = 1e-4
#: why a record is left out of a training set (``TrainingSet.dropped`` counts each)
DROP_REASONS = {
    "not_ok": "failed or stopped early (status not ok)",
    "no_kld": "no KLD (perplexity only)",
    "excluded_family": "of an excluded family",
    "no_table": "no weight-error table for its model",
    "incomplete_context": "an empty context column (corpus, ctx, slice or build)",
    "no_reference": "no Q8_0 reference measured in the same context",
    "missing_statistic": "a missing statistic (kld_p99 or same_top_p) or KLD ≤ 0",
}


@dataclass
class TrainingSet:
    X: np.ndarray  # (n, len(FEATURES))
    Y: np.ndarray  # (n, len(TARGETS)): deltas to the reference
    rows: pd.DataFrame  # per row: model_id, family, synthetic, config, bpw, size_bytes, kld, ref_kld, source …
    refs: pd.DataFrame  # per context: model_id, family, synthetic, ln_kld_ref and the zero-shot features
    X_ref: np.ndarray  # zero-shot features of each context's reference
    dropped: dict[str, int] = field(default_factory=dict)  # records left out, by reason (DROP_REASONS)

    @property
    def families(self) -> list[str]:
        return sorted(self.rows["family"].unique())


def _miss(same_top: float) -> float:
    return math.log(max(1.0 - same_top, _MISS_FLOOR))


def descriptors(r: pd.Series | dict) -> dict:
    return {k: r[k] for k in ("n_params", "n_layers", "n_embd", "n_ff", "n_head", "n_head_kv", "n_vocab",
                              "tied_embeddings", "base_origin")}  # fmt: skip


def load_tables(folder: str | Path) -> dict[str, ErrorTable]:
    tables = {}
    for p in sorted(Path(folder).glob("*.json")):
        t = ErrorTable.load(p)
        tables[t.model_id] = t
    return tables


def build(records: pd.DataFrame, tables: dict[str, ErrorTable], exclude_families: tuple[str, ...] = ()) -> TrainingSet:
    """Training rows from ok records of models with a weight-error table and a reference in context; the
    records left out are counted by reason (``dropped``)."""
    dropped: Counter[str] = Counter()

    def keep(df: pd.DataFrame, mask: pd.Series, reason: str) -> pd.DataFrame:
        dropped[reason] += int((~mask).sum())
        return df[mask]

    df = keep(records, records["status"] == "ok", "not_ok")
    df = keep(df, df["kld_mean"].notna(), "no_kld")
    df = keep(df, ~df["family"].isin(exclude_families), "excluded_family")
    df = keep(df, df["model_id"].isin(tables), "no_table")
    feats, ys, meta, refs, ref_feats = [], [], [], [], []
    dropped["incomplete_context"] += int(df[CONTEXT].isna().any(axis=1).sum())  # groupby leaves them out
    for _, ctx in df.groupby(CONTEXT, sort=True):
        ref = ctx[ctx["config"] == REFERENCE]
        if ref.empty:
            dropped["no_reference"] += len(ctx)
            continue
        ref = ref.iloc[0]
        table = tables[ref["model_id"]]
        desc = descriptors(ref)
        ref_fr = ref["fractions"]
        ref_row = F.row(ref_fr, table, desc, ref["bpw"], ref_fr)
        refs.append({"model_id": ref["model_id"], "family": ref["family"], "synthetic": bool(ref["synthetic"]),
                     "ln_kld_ref": math.log(ref["kld_mean"]), "kld_ref": ref["kld_mean"]})  # fmt: skip
        ref_feats.append(ref_row)
        for _, r in ctx.iterrows():
            if r["kld_mean"] <= 0 or pd.isna(r["kld_p99"]) or pd.isna(r["same_top_p"]):
                dropped["missing_statistic"] += 1
                continue
            feats.append(F.row(r["fractions"], table, desc, r["bpw"], ref_fr))
            ys.append([
                math.log(r["kld_mean"]) - math.log(ref["kld_mean"]),
                math.log(max(r["kld_p99"], 1e-12)) - math.log(max(ref["kld_p99"], 1e-12)),
                _miss(r["same_top_p"]) - _miss(ref["same_top_p"]),
            ])  # fmt: skip
            meta.append({"model_id": r["model_id"], "family": r["family"], "synthetic": bool(r["synthetic"]),
                         "model_name": r["model_name"], "config": r["config"], "source": r["source"],
                         "bpw": r["bpw"], "size_bytes": r["size_bytes"], "kld": r["kld_mean"],
                         "kld_err": r["kld_mean_err"], "ref_kld": ref["kld_mean"], "fractions": r["fractions"]})  # fmt: skip
    return TrainingSet(F.matrix(feats) if feats else np.zeros((0, len(F.FEATURES))), np.array(ys).reshape(-1, 3),
                       pd.DataFrame(meta), pd.DataFrame(refs),
                       F.matrix(ref_feats) if ref_feats else np.zeros((0, len(F.FEATURES))),
                       {k: n for k, n in dropped.items() if n})  # fmt: skip


def model_weights(model_ids: pd.Series) -> np.ndarray:
    """Each model weighs the same in total, however many records it has."""
    counts = model_ids.map(model_ids.value_counts())
    return (1.0 / counts).to_numpy() * len(model_ids.unique())
