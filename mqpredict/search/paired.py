"""Paired comparisons: every config is scored on the same tokens, so compare per-token KLD, not error bars.

A config's margin to the line at its bpw is ``ln mean(x) − [(1 − t) ln mean(a) + t ln mean(b)]``, where
``a`` and ``b`` are the per-token KLD vectors of the two hull presets around it and ``t`` its position
between them. By the delta method its standard error is that of the mean of the per-token influence

    u_i = x_i / mean(x) − (1 − t) a_i / mean(a) − t b_i / mean(b)

— the token-to-token noise the configs share cancels, which is why paired errors are several times
smaller than each run's own error bar. The same holds against one other config (``t = 0``). Tokens of
one window are not independent; the error is computed over windows' means of ``u`` when there are at
least :data:`MIN_WINDOWS` windows, else over tokens (as llama-perplexity does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mqpredict.pareto import Line

#: below this many windows, per-token errors (llama-perplexity's convention) instead of per-window ones
MIN_WINDOWS = 8


@dataclass(frozen=True)
class Paired:
    """``ln KLD(x) − ln KLD(reference)`` on the same tokens, with its paired standard error."""

    diff: float
    se: float
    n_tokens: int

    def below(self, z: float) -> bool:
        """Significantly below the reference (by more than ``z`` paired errors)."""
        return self.diff + z * self.se < 0

    def above(self, z: float) -> bool:
        """Significantly above: it cannot be below the reference."""
        return self.diff - z * self.se > 0


def _se(u: np.ndarray, per_window: int | None) -> float:
    n = len(u)
    if per_window and n % per_window == 0 and n // per_window >= MIN_WINDOWS:
        w = u.reshape(-1, per_window).mean(axis=1)
        return float(w.std(ddof=1) / math.sqrt(len(w)))
    return float(u.std(ddof=1) / math.sqrt(n)) if n > 1 else float("inf")


def paired(x: np.ndarray, refs: list[tuple[float, np.ndarray]], per_window: int | None = None) -> Paired:
    """``ln mean(x) − Σ w_k ln mean(r_k)`` and its paired error; ``refs`` are (weight, vector) on the same tokens."""
    n = min([len(x), *(len(r) for _, r in refs)])
    x = np.asarray(x[:n], dtype=np.float64)
    mx = max(float(x.mean()), 1e-12)
    u = x / mx
    diff = math.log(mx)
    for w, r in refs:
        r = np.asarray(r[:n], dtype=np.float64)
        mr = max(float(r.mean()), 1e-12)
        u = u - w * r / mr
        diff -= w * math.log(mr)
    return Paired(diff, _se(u, per_window), n)


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
