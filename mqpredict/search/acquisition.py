"""Which candidates to measure next: expected improvement below the frontier, in batches diverse in size.

The **frontier** (:func:`mqpredict.pareto.frontier`) is the lower convex hull, in (bpw, ln KLD), of everything measured on the model so far
(presets and hybrids), interpolated like the line and never extrapolated. A candidate with predicted
ln KLD ~ Normal(μ, σ) — σ from the surrogate's calibrated 80% interval, ``σ = half-width / 1.2816`` —
improves the frontier at its bpw by ``max(0, f(bpw) − ln KLD)``, whose expectation is

    EI = (f − μ) Φ(z) + σ φ(z),   z = (f − μ) / σ.

Because the frontier starts as the presets' line, a positive EI is an expected win below the line (or
below a hybrid already found). Candidates outside the frontier's bpw range get no EI.

Batches: the frontier's bpw range is cut into as many equal bands as the batch has slots, and each
band contributes its best candidate (then the remaining best by EI), so one batch explores the whole
frontier instead of piling up at one size.
"""

from __future__ import annotations

import math

import numpy as np



def expected_improvement(mu: np.ndarray, sigma: np.ndarray, f: np.ndarray) -> np.ndarray:
    """EI of ln KLD below ``f`` (0 where ``f`` is NaN)."""
    from scipy.stats import norm

    sigma = np.maximum(sigma, 1e-9)
    z = (f - mu) / sigma
    ei = (f - mu) * norm.cdf(z) + sigma * norm.pdf(z)
    return np.where(np.isnan(f), 0.0, np.maximum(ei, 0.0))


def diverse_batch(bpw: np.ndarray, score: np.ndarray, n: int, lo: float, hi: float) -> list[int]:
    """``n`` indices with the best score, one per equal bpw band of [lo, hi] first (bands without a
    positive score are skipped), then the best of the rest."""
    if n <= 0:
        return []
    picked: list[int] = []
    order = np.argsort(-score, kind="stable")
    edges = np.linspace(lo, hi, n + 1) if hi > lo else np.array([lo, hi])
    for a, b in zip(edges, edges[1:]):
        inside = order[(bpw[order] >= a) & (bpw[order] <= b) & (score[order] > 0)]
        for i in inside:
            if i not in picked:
                picked.append(int(i))
                break
    for i in order:
        if len(picked) >= n or score[i] <= 0:
            break
        if int(i) not in picked:
            picked.append(int(i))
    return picked[:n]


def sigma_from_halfwidth(halfwidth: float, coverage: float = 0.8) -> float:
    """The normal σ whose central ``coverage`` interval has this half-width."""
    from scipy.stats import norm

    return halfwidth / float(norm.ppf(0.5 + coverage / 2)) if halfwidth > 0 else math.inf
