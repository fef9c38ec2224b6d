"""Which candidates to measure next: expected hypervolume improvement, in batches that do not repeat.

The front is the Pareto staircase, in (bpw, ln KLD), of the configs measured in full so far (with the
presets when the policy counts them: :class:`~mqpredict.search.policy.PolicySettings`). ``f(x)`` is the
front's best ln KLD at any size ≤ x (the reference level ``r_y`` left of the front's first point), and
the hypervolume is the area between the staircase and the reference point ``(r_x, r_y)``. A candidate
of (exact) size ``b`` and predicted ln KLD ``Y ~ Normal(μ, σ)`` — σ from its own calibrated interval —
adds the area ``HVI(Y) = ∫_b^{r_x} max(0, f(x) − Y) dx``: it improves the front at its own size *and*
at every larger size the front does not already reach, so the acquisition values the whole front, not
only the margin at one size. On each step of the staircase ``f`` is a constant ``c_k`` of width
``w_k``, so the expectation is exact, in closed form (2-D):

    EHVI = Σ_k w_k · [(c_k − μ) Φ(z_k) + σ φ(z_k)],   z_k = (c_k − μ) / σ.

Batches (:func:`batch`): a greedy "Kriging believer" — take the best candidate, pretend it was measured
at its predicted mean (add it to the front), recompute everyone's EHVI, take the next best — so a batch
spreads over the front instead of piling four near-copies where one would already be enough.
"""

from __future__ import annotations

import math

import numpy as np


def expected_improvement(mu: np.ndarray, sigma: np.ndarray, f: np.ndarray) -> np.ndarray:
    """E[max(0, f − Y)] for Y ~ Normal(μ, σ) (0 where ``f`` is NaN)."""
    from scipy.stats import norm

    sigma = np.maximum(sigma, 1e-9)
    z = (f - mu) / sigma
    ei = (f - mu) * norm.cdf(z) + sigma * norm.pdf(z)
    return np.where(np.isnan(f), 0.0, np.maximum(ei, 0.0))


def staircase(points: list[tuple[float, float]], ref: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The front's steps: left edges ``xs`` (the first is −inf) and levels, capped at the reference level."""
    pts = sorted((b, y) for b, y in points if b < ref[0])
    xs, levels, best = [-math.inf], [ref[1]], ref[1]
    for b, y in pts:
        if y < best:
            best = y
            if b == xs[-1]:
                levels[-1] = y
            else:
                xs.append(b)
                levels.append(y)
    return np.array(xs), np.array(levels)


def ehvi(bpw: np.ndarray, mu: np.ndarray, sigma: np.ndarray, points: list[tuple[float, float]],
         ref: tuple[float, float]) -> np.ndarray:  # fmt: skip
    """Expected hypervolume improvement of each candidate over ``points`` (module docstring)."""
    xs, levels = staircase(points, ref)
    right = np.append(xs[1:], ref[0])
    out = np.zeros(len(bpw))
    for x0, x1, c in zip(xs, right, levels):
        width = np.clip(x1 - np.maximum(bpw, x0), 0.0, None)
        live = width > 0
        if live.any():
            out[live] += width[live] * expected_improvement(mu[live], sigma[live], np.full(live.sum(), c))
    return out


def batch(bpw: np.ndarray, mu: np.ndarray, sigma: np.ndarray, points: list[tuple[float, float]],
          ref: tuple[float, float], n: int) -> tuple[list[int], np.ndarray]:  # fmt: skip
    """``n`` candidates by EHVI with Kriging-believer fantasies, and the first round's EHVI of every candidate."""
    pts = list(points)
    first = ehvi(bpw, mu, sigma, pts, ref)
    score = first.copy()
    picked: list[int] = []
    while len(picked) < n:
        if picked:
            score = ehvi(bpw, mu, sigma, pts, ref)
            score[picked] = -1.0
        i = int(np.argmax(score))
        if score[i] <= 0:
            break
        picked.append(i)
        pts.append((float(bpw[i]), float(mu[i])))
    return picked, first
