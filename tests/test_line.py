"""The line: Pareto-optimal presets, lower hull in (bpw, ln KLD), no extrapolation."""

from __future__ import annotations

import math

import pytest

from mqpredict.pareto import Line, Point


def test_hull_keeps_pareto_optimal_convex_points():
    pts = [
        Point(4.0, 0.40, "a"),
        Point(4.5, 0.30, "dominated-by-nothing-but-above-hull"),
        Point(5.0, 0.10, "b"),
        Point(5.5, 0.20, "dominated"),  # more bits, more KLD than b
        Point(8.5, 0.005, "c"),
    ]
    line = Line.from_presets(pts)
    assert [p.name for p in line.hull] == ["a", "b", "c"]
    mid = line.ln_kld_at(4.5)
    assert mid == pytest.approx((math.log(0.40) + math.log(0.10)) / 2)


def test_never_extrapolated_and_margin_sign():
    line = Line.from_presets([Point(4.0, 0.4), Point(8.0, 0.01)])
    assert line.ln_kld_at(3.9) is None and line.ln_kld_at(8.1) is None
    assert line.margin(Point(6.0, 0.02)) < 0 < line.margin(Point(6.0, 0.2))
    assert line.margin(Point(9.0, 0.001)) is None


def test_single_preset_and_empty():
    assert Line.from_presets([Point(8.5, 0.005)]).ln_kld_at(8.5) == pytest.approx(math.log(0.005))
    assert Line.from_presets([]).ln_kld_at(5.0) is None


def test_position_in_words():
    from mqpredict.pareto import position

    presets = [Point(5.1, 0.56, "Q2_K"), Point(5.4, 0.24, "IQ4_NL"), Point(6.1, 0.094, "Q5_0"), Point(8.5, 0.005, "Q8_0")]
    line = Line.from_presets(presets)
    assert position(Point(5.7, 0.111, "h"), line, presets).endswith("% vs line")
    assert position(Point(5.7, 0.111, "h"), line, presets).startswith("-")
    assert position(Point(4.9, 0.28, "small"), line, presets) == "dominates Q2_K"
    assert position(Point(9.0, 0.01, "big"), line, presets) == "dominated by Q8_0"
