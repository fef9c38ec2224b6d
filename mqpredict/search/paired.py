"""Paired comparisons: every config is scored on the same tokens, so compare per-token KLD, not error bars.

A config's margin to the line at its bpw is ``ln mean(x) − [(1 − t) ln mean(a) + t ln mean(b)]``, where
``a`` and ``b`` are the per-token KLD vectors of the two hull presets around it and ``t`` its position
between them. By the delta method its standard error is that of the mean of the per-token influence

    u_i = x_i / mean(x) − (1 − t) a_i / mean(a) − t b_i / mean(b)

— the token-to-token noise the configs share cancels, which is why paired errors are several times
smaller than each run's own error bar. The same holds against one other config (``t = 0``).

Tokens of one window are not independent (a half-window shift moves a config's KLD by several of its
per-token error bars), so the error is always a **block** error: the standard error of the windows'
means of ``u`` (windows are independent: one window per batch), with ``n_windows − 1`` degrees of
freedom, and decisions use **Student's t** quantiles at a one-sided level ``alpha``. With one window
there is no error estimate: nothing is significant. Without window boundaries (a vector of unknown
layout) the tokens are taken as the blocks (llama-perplexity's convention), flagged by ``blocks ==
n_tokens``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

from mqpredict.pareto import Line


@dataclass(frozen=True)
class Paired:
    """``ln KLD(x) − ln KLD(reference)`` on the same tokens, with its paired (block) standard error."""

    diff: float
    se: float
    n_tokens: int
    blocks: int = 0  # independent blocks the error was computed over (windows); df = blocks − 1

    @property
    def df(self) -> int:
        return max(self.blocks - 1, 0)

    def quantile(self, alpha: float) -> float:
        """The one-sided ``1 − alpha`` t quantile for this many blocks (inf without an error estimate)."""
        return float(student_t.ppf(1 - alpha, self.df)) if self.df >= 1 and math.isfinite(self.se) else math.inf

    def p_below(self) -> float:
        """One-sided p-value of "not below the reference" (small: significantly below)."""
        if self.df < 1 or not math.isfinite(self.se):
            return 1.0
        if self.se <= 0:
            return 0.0 if self.diff < 0 else 1.0
        return float(student_t.cdf(self.diff / self.se, self.df))

    def below(self, alpha: float) -> bool:
        """Significantly below the reference at one-sided level ``alpha``."""
        return self.diff + self.quantile(alpha) * self.se < 0

    def above(self, alpha: float) -> bool:
        """Significantly above at one-sided level ``alpha``: it cannot be below the reference."""
        return self.diff - self.quantile(alpha) * self.se > 0


def holm(tests: list[tuple[str, Paired]], alpha: float) -> list[str]:
    """The names of the tests Holm's step-down procedure declares significantly below (family-wise ``alpha``)."""
    ranked = sorted(tests, key=lambda kv: kv[1].p_below())
    out = []
    for i, (name, p) in enumerate(ranked):
        if p.p_below() > alpha / (len(ranked) - i):
            break
        out.append(name)
    return out


def _se(u: np.ndarray, per_window: int | None) -> tuple[float, int]:
    """Block standard error of the mean of ``u`` and the number of blocks."""
    n = len(u)
    if per_window and n % per_window == 0:
        w = u.reshape(-1, per_window).mean(axis=1)
        nw = len(w)
        return (float(w.std(ddof=1) / math.sqrt(nw)) if nw > 1 else float("inf")), nw
    return (float(u.std(ddof=1) / math.sqrt(n)) if n > 1 else float("inf")), n


def paired(x: np.ndarray, refs: list[tuple[float, np.ndarray]], per_window: int | None = None) -> Paired:
    """``ln mean(x) − Σ w_k ln mean(r_k)`` and its paired error; ``refs`` are (weight, vector) on the same tokens."""
    n = min([len(x), *(len(r) for _, r in refs)])
    if per_window:
        n -= n % per_window  # whole windows only
    x = np.asarray(x[:n], dtype=np.float64)
    mx = max(float(x.mean()), 1e-12)
    u = x / mx
    diff = math.log(mx)
    for w, r in refs:
        r = np.asarray(r[:n], dtype=np.float64)
        mr = max(float(r.mean()), 1e-12)
        u = u - w * r / mr
        diff -= w * math.log(mr)
    se, blocks = _se(u, per_window)
    return Paired(diff, se, n, blocks)


def line_weights(line: Line, bpw: float) -> list[tuple[float, str]] | None:
    """The names of the hull presets the line interpolates at ``bpw`` and their weights (None outside)."""
    ws = line.weights(bpw)
    return None if ws is None else [(w, p.name) for w, p in ws]


def margin_to_line(x: np.ndarray, bpw: float, line: Line, vectors: dict[str, np.ndarray],
                   per_window: int | None = None) -> Paired | None:  # fmt: skip
    """The paired margin of a config to the line (``vectors``: per-token KLD of the hull presets by name)."""
    ws = line_weights(line, bpw)
    if ws is None:
        return None
    return paired(x, [(w, vectors[name]) for w, name in ws if w > 0], per_window)


def against(x: np.ndarray, other: np.ndarray, per_window: int | None = None) -> Paired:
    """``ln KLD(x) − ln KLD(other)`` on the same tokens."""
    return paired(x, [(1.0, other)], per_window)
