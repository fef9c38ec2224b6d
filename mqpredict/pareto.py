"""Size against quality in (bpw, ln KLD): the line, the frontier and the hypervolume — one neutral module.

Everything that compares configs by size and KLD (the surrogate's CV, the search, reports, benchmarks)
imports these from here; this module imports nothing of mqpredict.

The **line** is what the standard presets of one model achieve: it is the monotone lower hull of the Pareto-optimal measured presets in (bpw, ln KLD),
interpolated linearly and never extrapolated: below the smallest or above the largest hull preset a
config has no line value (compare it only with the presets that dominate it). A config's **margin** is
``ln KLD(config) − line(bpw)``: negative means below the line, and ``exp(margin) − 1`` is the relative
KLD change against the line at the same size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Point:
    bpw: float
    kld: float
    name: str = ""

    @property
    def ln_kld(self) -> float:
        return math.log(max(self.kld, 1e-12))


@dataclass(frozen=True)
class Line:
    hull: tuple[Point, ...]  # increasing bpw, decreasing KLD

    @classmethod
    def from_presets(cls, points: Iterable[Point]) -> Line:
        pts = sorted(points, key=lambda p: (p.bpw, p.kld))
        pareto: list[Point] = []
        for p in pts:  # keep a point only if it beats every smaller-or-equal one
            if not pareto or p.kld < pareto[-1].kld:
                if pareto and p.bpw == pareto[-1].bpw:
                    pareto[-1] = p
                else:
                    pareto.append(p)
        hull: list[Point] = []
        for p in pareto:  # lower convex hull (monotone chain) in (bpw, ln KLD)
            while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
                hull.pop()
            hull.append(p)
        return cls(tuple(hull))

    def weights(self, bpw: float) -> list[tuple[float, Point]] | None:
        """The hull points the line interpolates at ``bpw`` with their weights (None outside the line)."""
        h = self.hull
        if not h or bpw < h[0].bpw or bpw > h[-1].bpw:
            return None
        for a, b in zip(h, h[1:]):
            if a.bpw <= bpw <= b.bpw:
                t = (bpw - a.bpw) / (b.bpw - a.bpw)
                return [(1 - t, a), (t, b)]
        return [(1.0, h[0])]  # a single-point hull at exactly this bpw

    def ln_kld_at(self, bpw: float) -> float | None:
        """The line's ln KLD at ``bpw``, or None outside the hull's bpw range (never extrapolated)."""
        ws = self.weights(bpw)
        return None if ws is None else sum(w * p.ln_kld for w, p in ws)

    def margin(self, p: Point) -> float | None:
        """ln KLD(p) − line(bpw): negative below the line; None where the line is not defined."""
        at = self.ln_kld_at(p.bpw)
        return None if at is None else p.ln_kld - at


def position(p: Point, line: Line, presets: Iterable[Point]) -> str:
    """How ``p`` stands against the presets, in words: its margin to the line where the line is
    defined, else which presets dominate it or which it dominates (smaller and lower KLD)."""
    presets = [q for q in presets if q.name != p.name]
    m = line.margin(p)
    if m is not None:
        return f"{100 * math.expm1(m):+.0f}% vs line"
    over = [q.name for q in presets if q.bpw <= p.bpw and q.kld <= p.kld]
    if over:
        return "dominated by " + ", ".join(over[:2])
    under = [q.name for q in presets if q.bpw >= p.bpw and q.kld >= p.kld]
    if under:
        return "dominates " + ", ".join(under[:3])
    return "outside the line"


def _cross(o: Point, a: Point, b: Point) -> float:
    return (a.bpw - o.bpw) * (b.ln_kld - o.ln_kld) - (a.ln_kld - o.ln_kld) * (b.bpw - o.bpw)


def frontier(points: list[Point]) -> Line:
    """The lower hull of every measured point (the line of presets and hybrids together)."""
    return Line.from_presets(points)


def frontier_at(front: Line, bpw: np.ndarray) -> np.ndarray:
    """The frontier's ln KLD at each bpw (NaN outside its range)."""
    h = front.hull
    if not h:
        return np.full(len(bpw), np.nan)
    xs = np.array([p.bpw for p in h])
    ys = np.array([p.ln_kld for p in h])
    out = np.interp(bpw, xs, ys) if len(h) > 1 else np.where(bpw == xs[0], ys[0], np.nan)
    return np.where((bpw < xs[0]) | (bpw > xs[-1]), np.nan, out)


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` (bpw, ln KLD; both minimised) up to the reference point ``ref``."""
    pts = sorted((b, k) for b, k in points if b <= ref[0] and k <= ref[1])
    area, best = 0.0, ref[1]
    for i, (b, k) in enumerate(pts):
        best = min(best, k)
        nxt = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
        area += (nxt - b) * (ref[1] - best)
    return area
