"""Leave-one-family-out evaluation of the surrogate against three baselines.

Every family (a model with its truncations/restores; one synthetic shape) is held out in turn; a
surrogate trained — and interval-calibrated — without it predicts each of its models, relative to that
model's measured Q8_0 reference. Metrics per held-out model (models weigh the same in the summaries):

* ``spearman`` — rank correlation of predicted and measured KLD over all its configs;
* ``spearman_band`` — the same within four bpw bands (mean): ordering at a given size;
* ``spearman_margin`` — of the margin below the presets' line (configs inside the line's range);
* ``precision_at_k`` — of the k configs predicted furthest below the line, the share that are measured
  wins (below the line by more than twice their standard error); k = min(10, n/5);
* ``regret`` — at the bpw of the model's Q4_K_M and Q6_K presets: ln KLD of the predicted best config
  within that size minus ln KLD of the truly best one (0 is perfect);
* ``mae_log10`` — mean |log10 predicted − log10 measured KLD|;
* ``coverage`` — share of measured values inside the 80 % interval (surrogate only).

**Every method is scored on the same rows.** A held-out model's scored rows are its measured configs
except its isolation probes (the probes baseline is built from them) and its Q8_0 reference (every
method predicts relative to it); a model enters the means only with at least :data:`MIN_ROWS` scored
rows. The probes baseline predicts only configs whose every group was probed at its type, so it is
compared on a second subset, ``rows = "probe-predictable"``: every method on exactly the rows it can
predict (models with at least :data:`MIN_ROWS` of them); ``rows = "all"`` holds the other methods on
every scored row.

Baselines: ``bpw`` (a linear fit of the delta on bpw alone), ``probes`` (KLD(Q8_0) + Σ_g the measured
isolation-probe increments on that model; only where every group's type was probed), ``allocator``
(the zero-run allocator's objective, :meth:`~mqpredict.surrogate.weight_error.ErrorTable.config_error`: relative
weight error × the parameters a token uses, summed over tensors, imatrix-weighted for imatrix records — what
``mqpredict allocate`` minimises at a size — as a log ratio to the reference's, linearly mapped for MAE).

A "held-out model" is one measurement context (:mod:`mqpredict.surrogate.data`): the same model with and
without an imatrix is two, each with its own reference and line, never mixed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from mqpredict.pareto import Line, Point
from mqpredict.surrogate import features as F
from mqpredict.surrogate.data import TrainingSet, model_weights
from mqpredict.surrogate.model import Surrogate

METRICS = ("spearman", "spearman_band", "spearman_margin", "precision_at_k", "regret", "mae_log10", "coverage")
MIN_ROWS = 10  # scored rows a held-out model needs to enter a mean
REFERENCE = "preset=Q8_0"
METHODS = ("surrogate", "bpw", "probes", "allocator")


def _spearman(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 4 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def _line(rows: pd.DataFrame) -> Line:
    presets = rows[rows["config"].str.fullmatch(r"preset=[A-Z0-9_]+")]
    return Line.from_presets(Point(r.bpw, r.kld, r.config) for r in presets.itertuples())


def model_metrics(rows: pd.DataFrame, pred_ln: np.ndarray, lo_ln: np.ndarray | None = None,
                  hi_ln: np.ndarray | None = None) -> dict[str, float]:  # fmt: skip
    """Metrics of one held-out model: ``rows`` its measured configs, ``pred_ln`` predicted ln KLD."""
    true_ln = np.log(rows["kld"].to_numpy())
    bpw = rows["bpw"].to_numpy()
    ok = np.isfinite(pred_ln)
    out = {"n": int(ok.sum())}
    out["spearman"] = _spearman(pred_ln, true_ln)
    bands = []
    if ok.sum() >= 8:
        edges = np.quantile(bpw[ok], [0, 0.25, 0.5, 0.75, 1])
        for a, b in zip(edges, edges[1:]):
            m = ok & (bpw >= a) & (bpw <= b)
            if m.sum() >= 5:
                bands.append(_spearman(pred_ln[m], true_ln[m]))
    out["spearman_band"] = float(np.nanmean(bands)) if bands and not np.all(np.isnan(bands)) else float("nan")
    line = _line(rows)
    at = np.array([line.ln_kld_at(b) if line.ln_kld_at(b) is not None else np.nan for b in bpw])
    inside = ok & np.isfinite(at)
    out["spearman_margin"] = _spearman(pred_ln[inside] - at[inside], true_ln[inside] - at[inside])
    rel_err = (rows["kld_err"] / rows["kld"]).to_numpy()
    wins = inside & (true_ln - at < -2 * rel_err)
    k = int(min(10, max(1, inside.sum() // 5)))
    if inside.sum() >= 5 and wins.any():
        order = np.argsort(np.where(inside, pred_ln - at, np.inf))[:k]
        out["precision_at_k"] = float(wins[order].mean())
    else:
        out["precision_at_k"] = float("nan")
    regrets = []
    for preset in ("preset=Q4_K_M", "preset=Q6_K"):
        hit = rows["config"] == preset
        if not hit.any():
            continue
        budget = ok & (bpw <= bpw[hit.to_numpy()][0] + 1e-9)
        if budget.sum() >= 2:
            chosen = np.argmin(np.where(budget, pred_ln, np.inf))
            regrets.append(true_ln[chosen] - true_ln[budget].min())
    out["regret"] = float(np.mean(regrets)) if regrets else float("nan")
    out["mae_log10"] = float(np.mean(np.abs(pred_ln[ok] - true_ln[ok])) / math.log(10)) if ok.any() else float("nan")
    if lo_ln is not None:
        out["coverage"] = float(np.mean((true_ln[ok] >= lo_ln[ok]) & (true_ln[ok] <= hi_ln[ok])))
    else:
        out["coverage"] = float("nan")
    return out


def probe_prediction(rows: pd.DataFrame) -> np.ndarray:
    """KLD(Q8_0) + Σ_g (KLD(probe g at its type) − KLD(Q8_0)) from this model's probe records."""
    ref = rows["ref_kld"].iloc[0]
    probes: dict[tuple[str, str], float] = {}
    for r in rows[rows["source"] == "probe"].itertuples():
        changed = [(g, t) for g, mix in r.fractions.items() for t, v in mix.items() if t not in ("Q8_0", "F16") and v > 0.999]
        if len(changed) == 1:
            probes[changed[0]] = r.kld - ref
    out = []
    for fr in rows["fractions"]:
        total, ok = ref, True
        for g, mix in fr.items():
            if len(mix) != 1:
                ok = False
                break
            t = next(iter(mix))
            if t in ("Q8_0", "F16"):
                continue
            if (g, t) not in probes:
                ok = False
                break
            total += probes[g, t]
        out.append(math.log(max(total, 1e-6)) if ok else np.nan)
    return np.array(out)


def evaluate(data: TrainingSet, make: Callable[[], Surrogate], progress=None, min_rows: int = MIN_ROWS) -> pd.DataFrame:
    """One row per (held-out model, method) with the metrics above; plus zero-shot rows."""
    out = []
    fams = data.families
    for i, fam in enumerate(fams):
        if progress:
            progress("cross-validation", i, len(fams))
        tr = (data.rows["family"] != fam).to_numpy()
        rtr = (data.refs["family"] != fam).to_numpy()
        if not tr.any():
            continue
        train = TrainingSet(data.X[tr], data.Y[tr], data.rows[tr].reset_index(drop=True),
                            data.refs[rtr].reset_index(drop=True), data.X_ref[rtr])  # fmt: skip
        s = make().fit(train)
        w = model_weights(train.rows["model_id"])
        bpw_i = F.FEATURES.index("bpw")
        lin_bpw = np.polyfit(train.X[:, bpw_i], train.Y[:, 0], 1, w=w)
        lin_alloc = np.polyfit(train.rows["alloc_dlerr"].to_numpy(), train.Y[:, 0], 1, w=w)
        te = np.flatnonzero(~tr)
        for ctx in data.rows.loc[te, "context"].unique():
            idx = te[(data.rows.loc[te, "context"] == ctx).to_numpy()]
            every = data.rows.loc[idx].reset_index(drop=True)  # the probes baseline reads the probe rows
            probes = probe_prediction(every)
            keep = ((every["source"] != "probe") & (every["config"] != REFERENCE)).to_numpy()
            rows, X, probes = every[keep].reset_index(drop=True), data.X[idx][keep], probes[keep]
            if len(rows) < min_rows:
                continue
            ln_ref = math.log(rows["ref_kld"].iloc[0])
            p = s.predict(X)["kld"]
            info = {"model_id": rows["model_id"].iloc[0], "model_name": rows["model_name"].iloc[0], "family": fam,
                    "synthetic": bool(rows["synthetic"].iloc[0]), "imatrix": bool(pd.notna(rows["imatrix_id"].iloc[0]))}  # fmt: skip
            preds = {
                "surrogate": (ln_ref + p.mean, ln_ref + p.lo, ln_ref + p.hi),
                "bpw": (ln_ref + np.polyval(lin_bpw, X[:, bpw_i]), None, None),
                "allocator": (ln_ref + np.polyval(lin_alloc, rows["alloc_dlerr"].to_numpy()), None, None),
            }
            for method, (m, lo, hi) in preds.items():
                out.append({**info, "method": method, "mode": "reference", "rows": "all", **model_metrics(rows, m, lo, hi)})
            sub = np.isfinite(probes)
            if sub.sum() >= min_rows:  # the same rows for every method: the ones the probes can predict
                for method, (m, lo, hi) in {**preds, "probes": (probes, None, None)}.items():
                    cut = (lambda a: None if a is None else a[sub])  # noqa: E731
                    out.append({**info, "method": method, "mode": "reference", "rows": "probe-predictable",
                                **model_metrics(rows[sub].reset_index(drop=True), m[sub], cut(lo), cut(hi))})  # fmt: skip
            ref_x = data.X_ref[(data.refs["context"] == ctx).to_numpy()]
            if len(ref_x) and not math.isnan(s.halfwidth_zero_):
                zero = s.predict_reference(ref_x[:1])[0] + p.mean
                out.append({**info, "method": "surrogate", "mode": "zero-shot", "rows": "all",
                            **model_metrics(rows, zero, zero - s.halfwidth_zero_, zero + s.halfwidth_zero_)})  # fmt: skip
    if progress:
        progress("cross-validation", len(fams), len(fams))
    return pd.DataFrame(out)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean of each metric per (real/synthetic, rows, mode, method): each held-out model weighs the same;
    ``n_models`` says how many entered the mean."""
    t = table.assign(kind=np.where(table["synthetic"], "synthetic", "real"))
    keys = ["kind", "rows", "mode", "method"]
    out = t.groupby(keys)[list(METRICS)].mean().reset_index()
    return out.merge(t.groupby(keys).size().rename("n_models").reset_index(), on=keys)
