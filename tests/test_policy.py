"""The search policy's pure parts: exact EHVI, Kriging-believer batches, recalibration from told results."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mqpredict.pareto import hypervolume
from mqpredict.search.acquisition import batch, ehvi, staircase

FRONT = [(4.0, -1.0), (5.0, -2.0), (6.5, -3.0)]  # (bpw, ln KLD) of the hybrids measured so far
REF = (8.0, 0.0)


def _hvi(b: float, y: np.ndarray) -> np.ndarray:
    """The hypervolume a point (b, y) adds to FRONT, computed from the definition for each y."""
    base = hypervolume(FRONT, REF)
    return np.array([hypervolume([*FRONT, (b, float(v))], REF) - base for v in y])


@pytest.mark.parametrize("b,mu,sigma", [(4.5, -1.8, 0.3), (3.0, -0.5, 0.5), (6.0, -3.2, 0.1), (7.9, -1.0, 1.0)])
def test_ehvi_is_the_expected_hypervolume_improvement(b, mu, sigma):
    y = np.random.default_rng(0).normal(mu, sigma, 40_000)
    mc = _hvi(b, y).mean()
    got = ehvi(np.array([b]), np.array([mu]), np.array([sigma]), FRONT, REF)[0]
    assert got == pytest.approx(mc, rel=0.02, abs=1e-4)


def test_ehvi_values_the_whole_front_not_one_size():
    """A candidate below the front at small size also improves every larger size the front does not reach."""
    sig = np.full(2, 1e-6)
    small, large = ehvi(np.array([4.5, 6.8]), np.array([-2.5, -3.1]), sig, FRONT, REF)
    assert small == pytest.approx(_hvi(4.5, np.array([-2.5]))[0], rel=1e-6)
    assert large == pytest.approx(_hvi(6.8, np.array([-3.1]))[0], rel=1e-6)
    dominated = ehvi(np.array([5.5]), np.array([-1.5]), np.array([1e-6]), FRONT, REF)[0]
    assert dominated == pytest.approx(0.0, abs=1e-9)


def test_staircase_keeps_the_pareto_steps():
    xs, levels = staircase([(5.0, -2.0), (4.0, -1.0), (4.5, -0.5), (6.5, -3.0), (9.0, -5.0)], REF)
    assert list(xs) == [-math.inf, 4.0, 5.0, 6.5] and list(levels) == [0.0, -1.0, -2.0, -3.0]


def test_a_batch_does_not_pile_up_where_one_point_is_enough():
    """Two near-copies and one elsewhere: the believer takes one copy, then the other region."""
    bpw = np.array([4.5, 4.5, 6.9])
    mu = np.array([-2.6, -2.6, -3.2])
    sigma = np.full(3, 0.02)
    picked, first = batch(bpw, mu, sigma, FRONT, REF, 2)
    assert first[0] == pytest.approx(first[1]) and first[0] > first[2]
    assert sorted(picked) == [0, 2] or sorted(picked) == [1, 2]


def test_the_policy_widens_its_intervals_by_what_it_measured():
    from mqpredict.search.policy import Policy, PolicySettings, Told

    pol = Policy.__new__(Policy)  # only the bookkeeping of ask/tell, no model
    pol.settings = PolicySettings()
    pol._asked, pol._told = {}, {}
    assert pol.inflation() == 1.0
    for i, err in enumerate([0.05, 0.5, 0.6, 0.7]):  # predicted ln KLD 0 ± 0.1, measured off by err
        pol._asked[f"k{i}"] = (0.0, 0.1)
        pol.tell([Told(f"k{i}", err, 0.01, complete=i % 2 == 0)])  # stopped-early ones count too
    before = pol.inflation()
    assert before > 4  # the 80% quantile of |error| / interval is well above 1
    pol.tell([Told("k3", 0.7, 10.0, complete=False)])  # the same miss, as a partial estimate with a huge error
    assert 1 < pol.inflation() < before  # counts, but says less


def test_the_policy_narrows_its_intervals_when_its_predictions_hold():
    """Wide transferred intervals (a new model) shrink to what this run's own errors support, not below a floor."""
    from mqpredict.search.policy import MIN_INFLATION, Policy, PolicySettings, Told

    pol = Policy.__new__(Policy)
    pol.settings = PolicySettings()
    pol._asked, pol._told = {}, {}
    for i, err in enumerate([0.05, -0.1, 0.08, 0.02, -0.04]):  # predicted ln KLD 0 ± 0.5, measured off by err
        pol._asked[f"k{i}"] = (0.0, 0.5)
        pol.tell([Told(f"k{i}", err, 0.01, complete=True)])
    assert MIN_INFLATION < pol.inflation() < 0.3
    pol._asked["k9"] = (0.0, 0.5)
    pol.tell([Told("k9", 0.0, 0.0, complete=True)])
    for k in list(pol._told):
        pol._told[k] = Told(k, 0.0, 0.0, True)  # perfect predictions: the floor, not zero
    assert pol.inflation() == MIN_INFLATION


def test_a_narrowed_run_stays_narrowed_when_its_narrowed_predictions_hold():
    """The factor is measured against the surrogate's own intervals: proposals asked with narrowed intervals
    (the proposal carries the factor) whose errors match the narrowing keep it, instead of scoring ~1 against
    their already-narrowed intervals and pulling the factor back to the surrogate's width."""
    from mqpredict.quant.config import Config
    from mqpredict.search.policy import Policy, PolicySettings, Told
    from mqpredict.search.proposer import Proposal

    pol = Policy.__new__(Policy)
    pol.settings = PolicySettings()
    pol._asked, pol._told = {}, {}
    errs = [0.05, -0.1, 0.08, 0.02, -0.04, 0.07, -0.06, 0.09, 0.03, -0.08]
    factor = 1.0
    for i, err in enumerate(errs):  # the surrogate says ±1.0, this run's errors are ~0.1
        hw = 1.0 * factor
        pol._remember(Proposal(Config.parse("default=Q8_0"), f"k{i}", 1, 8.5, 1.0, math.exp(-hw), math.exp(hw), 0.0,
                               inflation=factor))  # fmt: skip
        pol.tell([Told(f"k{i}", err, 0.001, complete=True)])
        factor = pol.inflation()
    assert factor < 0.2  # still narrowed after ten proposals asked with narrowed intervals
    pol.remember({"types_key": "k99", "kld_pred": 1.0, "kld_hi": math.exp(0.1), "inflation": 0.1})  # a resume
    assert pol._asked["k99"] == pytest.approx((0.0, 1.0))


def test_the_front_spans_the_space_not_the_presets_below_it():
    """EHVI's reference point is the space's worst end (its smallest file's predicted ln KLD), not the worst
    preset: a 2-bpw preset at ln KLD +1 would make the space's cheapest, least useful configs look precious."""
    from types import SimpleNamespace

    import pandas as pd

    from mqpredict.pareto import Line, Point
    from mqpredict.search.policy import Policy, PolicySettings

    pol = Policy.__new__(Policy)
    pol.settings = PolicySettings()
    pol.proposer = SimpleNamespace(max_bpw=8.5, worst_ln_kld=lambda s, ln_ref: -1.5)
    presets = pd.DataFrame({"bpw": [8.5, 2.1, 4.9], "kld_mean": [math.exp(-5.0), math.exp(1.0), math.exp(-1.9)]})
    own = pd.DataFrame({"bpw": [5.6, 4.6], "kld_mean": [math.exp(-2.6), math.exp(-1.2)]})

    def snapshot(presets, own):
        line = Line.from_presets(Point(r.bpw, r.kld_mean) for r in presets.itertuples())
        return SimpleNamespace(ok=pd.concat([presets, own]), own=own, ln_ref=-5.0, line=line)

    snap = snapshot(presets, own)
    pts, ref = pol.front(snap, s=object())
    assert len(pts) == 2 and ref[0] == pytest.approx(8.5) and ref[1] == pytest.approx(-1.2)  # a measured worse point
    pts, ref = pol.front(snapshot(presets, own[:1]), s=object())
    assert ref[1] == pytest.approx(-1.5)  # the space's predicted worst end
    assert pol.front(snap)[1][1] == pytest.approx(1.0)  # without a surrogate: every measured point
    gain = lambda r: ehvi(np.array([4.6]), np.array([-1.6]), np.array([1e-6]), pts, r)[0]
    assert gain((8.5, 1.0)) > 10 * gain(ref)  # what the presets' reference would make of a cheap config
    # a few chosen presets, the smallest at 4.9 bpw (ln KLD -1.9): a hybrid worse than all of them is worth nothing
    few = snapshot(presets[presets["bpw"] > 3], own)
    assert pol.front(few, s=object())[1][1] == pytest.approx(-1.9)
    assert ehvi(np.array([4.0]), np.array([-1.7]), np.array([1e-6]), *pol.front(few, s=object()))[0] == 0.0


def test_explore_scales_the_sigma_ehvi_uses_not_the_interval_shown(tiny):
    """``explore`` → 0 makes EHVI the hypervolume improvement of the predicted means (pure exploitation): the
    first proposal is that argmax over the whole (enumerated) space, and it still shows its calibrated interval."""
    from mqpredict.quant.model import ModelInfo
    from mqpredict.quant.types import T
    from mqpredict.search.proposer import Proposer
    from mqpredict.surrogate.model import Surrogate
    from mqpredict.surrogate.service import DEFAULT_SURROGATE
    from mqpredict.surrogate.weight_error import compute

    model = ModelInfo.load(tiny)
    types = (T.Q8_0, T.Q6_K, T.Q4_K)
    table = compute(model, "tiny", None, types, 2, sample_elements=4096)
    s, _ = Surrogate.load(DEFAULT_SURROGATE)
    prop = Proposer(model, table, types, allowed={g: types for g in model.groups})
    A = prop._space.enumerate()
    A = A[prop._space.unique(A)]
    _, bpw, mu, hw = prop.predict(A, s, -3.0)
    ref = (prop.max_bpw + 1e-6, prop.worst_ln_kld(s, -3.0) + 1e-6)
    tiny_sigma = np.full(len(mu), 1e-12)
    front, _ = batch(bpw, mu, tiny_sigma, [], ref, 8)  # a front of 8, where σ changes the pick (with σ: another)
    pts = [(float(bpw[i]), float(mu[i])) for i in front]
    best = int(np.argmax(ehvi(bpw, mu, tiny_sigma, pts, ref)))
    p = prop.ask(1, s, -3.0, pts, ref, set(), explore=1e-9)[0]
    assert p.bpw == pytest.approx(bpw[best]) and math.log(p.kld_pred) == pytest.approx(mu[best])
    assert math.log(p.kld_hi / p.kld_pred) == pytest.approx(hw[best])  # the calibrated half-width, unscaled


def test_configs_outside_the_grid_compete_in_the_same_batch(tiny):
    """The allocator's per-tensor answers join EHVI's candidates: proposed with their exact file, marked as the
    allocator's, and never again once measured."""
    from mqpredict.quant.config import Config
    from mqpredict.quant.model import ModelInfo
    from mqpredict.quant.resolve import resolve, types_key
    from mqpredict.quant.size import size_of
    from mqpredict.quant.types import T
    from mqpredict.search.proposer import Proposer
    from mqpredict.surrogate.model import Surrogate
    from mqpredict.surrogate.service import DEFAULT_SURROGATE
    from mqpredict.surrogate.weight_error import compute

    model = ModelInfo.load(tiny)
    table = compute(model, "tiny", None, (T.Q8_0, T.Q6_K, T.Q4_K), 2, sample_elements=4096)
    s, _ = Surrogate.load(DEFAULT_SURROGATE)
    prop = Proposer(model, table, (T.Q4_K,), allowed={g: (T.Q4_K,) for g in model.groups})  # a grid of one file
    extra = Config.parse(r"default=Q4_K,tensor:^blk\.0\.ffn_down\.weight$=Q8_0,tensor:^blk\.1\.attn_q\.weight$=Q6_K")
    key = types_key(model, resolve(model, extra))
    got = prop.ask(3, s, -3.0, [], (9.0, 1.0), set(), extra=(extra,))
    assert sorted(p.source for p in got) == ["allocator", "proposed"]  # the one grid file and the extra one
    a = next(p for p in got if p.source == "allocator")
    assert a.config == extra and a.types_key == key and a.size_bytes == size_of(model, resolve(model, extra)).size_bytes
    assert a.kld_lo < a.kld_pred < a.kld_hi and a.ei > 0
    assert [p.source for p in prop.ask(3, s, -3.0, [], (9.0, 1.0), {key}, extra=(extra,))] == ["proposed"]
