"""Records → a training set: features, targets and who each row belongs to.

Records are grouped by measurement context (model, corpus, ctx, batch layout, token slice, scoring mode,
importance matrix, build — :class:`mqpredict.records.context.Context` plus the build): records quantized
with and without an imatrix never share a reference or a line. Each record's features come from the
weight-error table of its (model, imatrix). Each context needs its **reference** (the Q8_0 preset) and
every other record's targets are measured against it, which cancels most of the corpus/ctx/model-scale
offset:

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
from mqpredict.surrogate.weight_error import ErrorTable, table_key

CONTEXT = ["model_id", "corpus", "ctx", "n_batch", "chunk_offset", "n_chunks", "scoring", "imatrix_id", "build"]
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
    """The tables in ``folder`` by :attr:`ErrorTable.key` (the model id, ``-imID`` appended with an imatrix)."""
    tables = {}
    for p in sorted(Path(folder).glob("*.json")):
        t = ErrorTable.load(p)
        tables[t.key] = t
    return tables


def _normalised(records: pd.DataFrame) -> pd.DataFrame:
    """Records with the context columns every row has (no imatrix: ""; no scoring mode: windows)."""
    df = records.copy()
    im = df["imatrix_id"] if "imatrix_id" in df else pd.Series("", index=df.index)
    df["imatrix_id"] = im.astype("string").fillna("").astype(str)
    sc = df["scoring"] if "scoring" in df else pd.Series("windows", index=df.index)
    df["scoring"] = sc.astype("string").fillna("windows").replace("", "windows").astype(str)
    return df


def build(records: pd.DataFrame, tables: dict[str, ErrorTable], exclude_families: tuple[str, ...] = ()) -> TrainingSet:
    """Training rows from ok records of (model, imatrix) pairs with a weight-error table and a reference in
    context; the records left out are counted by reason (``dropped``)."""
    dropped: Counter[str] = Counter()

    def keep(df: pd.DataFrame, mask: pd.Series, reason: str) -> pd.DataFrame:
        dropped[reason] += int((~mask).sum())
        return df[mask]

    df = keep(records, records["status"] == "ok", "not_ok")
    df = keep(df, df["kld_mean"].notna(), "no_kld")
    df = _normalised(keep(df, ~df["family"].isin(exclude_families), "excluded_family"))
    keys = pd.Series([table_key(m, i or None) for m, i in zip(df["model_id"], df["imatrix_id"])], index=df.index,
                     dtype=object)  # fmt: skip
    df = keep(df, keys.isin(tables), "no_table")
    feats, ys, meta, refs, ref_feats = [], [], [], [], []
    dropped["incomplete_context"] += int(df[CONTEXT].isna().any(axis=1).sum())  # groupby leaves them out
    for cvals, ctx in df.groupby(CONTEXT, sort=True):
        ref = ctx[ctx["config"] == REFERENCE]
        if ref.empty:
            dropped["no_reference"] += len(ctx)
            continue
        ref = ref.iloc[0]
        context = "|".join(str(v) for v in cvals)
        imatrix_id = ref["imatrix_id"] or None
        table = tables[table_key(ref["model_id"], imatrix_id)]
        desc = descriptors(ref)
        ref_fr = ref["fractions"]
        ref_row = F.row(ref_fr, table, desc, ref["bpw"], ref_fr)
        ref_err = table.config_error(ref_fr)
        refs.append({"model_id": ref["model_id"], "family": ref["family"], "synthetic": bool(ref["synthetic"]),
                     "imatrix_id": imatrix_id, "context": context,
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
                         "imatrix_id": imatrix_id, "context": context,
                         "alloc_dlerr": math.log10(max(table.config_error(r["fractions"]), 1e-30) / max(ref_err, 1e-30)),
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
