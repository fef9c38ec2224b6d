"""The zero-run allocator: on target exactly (never over), configs that rebuild to the reported size, the
exact optimum where it can be checked, and the command's JSON and errors."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from mqpredict.errors import InputError
from mqpredict.quant.config import Config
from mqpredict.quant.header import pad, tensor_nbytes
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.resolve import resolve, types_key
from mqpredict.quant.size import header_size, size_of
from mqpredict.quant.types import T, effective_type
from mqpredict.search.allocator import Target, allocate, allocations_across
from mqpredict.surrogate.weight_error import compute
from tests.conftest import mq
from tests.test_weight_error import tiny_imatrix  # noqa: F401  (the session fixture)


#: the types of the tables here (the slowest low-bit quantizers left out: the machine is shared)
TYPES = (T.Q8_0, T.Q6_K, T.Q5_K, T.Q5_0, T.Q4_K, T.Q4_0, T.IQ4_XS, T.Q3_K, T.Q2_K)
IM_TYPES = (T.IQ2_S, T.IQ1_M, T.IQ1_S)


@pytest.fixture(scope="module")
def tables(tiny, tiny_imatrix):  # noqa: F811
    """The tiny model's tables without and with the imatrix (few rows: what is tested here is the allocation),
    saved where the command looks for them (the session's cache), so that the CLI tests reuse them."""
    from mqpredict.records.identity import identify
    from mqpredict.surrogate.weight_error import table_file
    from mqpredict.util.paths import cache_dir

    model = ModelInfo.load(tiny)
    mid = identify(model).model_id
    out = {None: compute(model, mid, None, TYPES, threads=2, sample_elements=4096),
           "im": compute(model, mid, tiny_imatrix, TYPES + IM_TYPES, threads=2, sample_elements=4096)}  # fmt: skip
    for t in out.values():
        t.save(cache_dir() / "weight_errors" / table_file(mid, t.imatrix_id))
    return out


@pytest.mark.parametrize("bpw", [3.0, 4.5, 6.0])
def test_bpw_targets_are_hit_from_below_and_rebuild_exactly(tiny, tiny_imatrix, tables, bpw):  # noqa: F811
    model = ModelInfo.load(tiny)
    a = allocate(model, tables["im"], Target(bpw=bpw), TYPES + IM_TYPES, tiny_imatrix)
    assert 0.95 * bpw <= a.bpw <= bpw and a.weighted
    types = resolve(model, Config.parse(a.config.key), imatrix=tiny_imatrix)  # the config as text, rebuilt
    assert types == dict(a.types)
    rep = size_of(model, types, tiny_imatrix)
    assert (rep.size_bytes, rep.bpw) == (a.size_bytes, a.bpw)
    if bpw == 3.0:  # the low-bit types are what make 3 bpw reachable on this model
        assert {q for q in a.types.values()} & set(IM_TYPES)


def test_distinct_configs_at_distinct_targets(tiny, tiny_imatrix, tables):  # noqa: F811
    model = ModelInfo.load(tiny)
    keys = {allocate(model, tables["im"], Target(bpw=b), TYPES + IM_TYPES, tiny_imatrix).config.key for b in (3.0, 4.5, 6.0)}
    assert len(keys) == 3
    spread = allocations_across(model, tables["im"], 5, 3.0, 6.0, TYPES + IM_TYPES, tiny_imatrix)
    assert 3 <= len(spread) <= 5 and [a.size_bytes for a in spread] == sorted(a.size_bytes for a in spread)
    assert all(a.bpw <= 6.0 for a in spread) and spread[-1].expected_error < spread[0].expected_error


def test_the_built_file_has_the_reported_size(tiny, tiny_imatrix, tables):  # noqa: F811
    from mqpredict.llama.inprocess import InProcessEngine

    model = ModelInfo.load(tiny)
    a = allocate(model, tables["im"], Target(bpw=6.0), TYPES + IM_TYPES, tiny_imatrix)
    with InProcessEngine(tiny, None, threads=2, imatrix=tiny_imatrix) as eng:
        built = eng.build(a.config)
        assert built.path.stat().st_size == a.size_bytes
        assert built.types_key == types_key(model, a.types)


def test_size_targets_never_go_over_and_leave_no_room_for_an_upgrade(tiny, tables):
    model = ModelInfo.load(tiny)
    q8 = size_of(model, resolve(model, Config.parse("default=Q8_0"))).size_bytes
    smallest = None
    for frac in (0.35, 0.5, 0.6, 0.75, 0.9):
        target = int(q8 * frac)
        a = allocate(model, tables[None], Target(size_bytes=target), TYPES)
        assert a.size_bytes <= target and not a.weighted
        smallest = min(smallest or a.size_bytes, a.size_bytes)
        left = target - a.size_bytes
        for t in model.assignable:  # no single tensor could move to a better type within what is left
            now = a.types[t.name]
            for q in TYPES:
                if q.name not in tables[None].tensors[t.name] or q != effective_type(q, t.shape[0]):
                    continue
                grow = pad(tensor_nbytes(t.shape, q), 32) - pad(tensor_nbytes(t.shape, now), 32)
                if 0 < grow <= left:
                    assert tables[None].tensors[t.name][q.name] >= tables[None].tensors[t.name][now.name]
    with pytest.raises(InputError, match="no config fits"):
        allocate(model, tables[None], Target(size_bytes=smallest // 4), TYPES)


def test_group_allocation_is_the_exhaustive_optimum(tiny, tables):
    """One type per group from four: the allocator's error equals the best of all 4^7 configs at every size."""
    model = ModelInfo.load(tiny)
    types = (T.Q8_0, T.Q6_K, T.Q4_K, T.Q3_K)
    tab = tables[None]
    groups = list(model.groups)
    cost = np.array([[sum(pad(tensor_nbytes(t.shape, q), 32) for t in model.groups[g]) for q in types] for g in groups])
    err = np.array([[sum(tab.abs_error(t.name, q.name) for t in model.groups[g]) for q in types] for g in groups])
    A = np.array(list(itertools.product(range(len(types)), repeat=len(groups))))
    C = header_size(model) + sum(pad(t.nbytes, 32) for t in model.fixed) + cost[np.arange(len(groups)), A].sum(1)
    E = err[np.arange(len(groups)), A].sum(1)
    for frac in np.linspace(0.05, 0.95, 19):
        S = int(C.min() + frac * (C.max() - C.min()))
        a = allocate(model, tab, Target(size_bytes=S), types, by="group")
        assert a.size_bytes <= S
        assert a.expected_error == pytest.approx(E[C <= S].min(), rel=1e-9)
        assert all(len({a.types[t.name] for t in ts}) == 1 for ts in model.groups.values())


def test_a_table_of_another_imatrix_is_refused(tiny, tiny_imatrix, tables):  # noqa: F811
    model = ModelInfo.load(tiny)
    with pytest.raises(InputError, match="imatrix"):
        allocate(model, tables[None], Target(bpw=4.0), imatrix=tiny_imatrix)
    with pytest.raises(InputError, match="exactly one"):
        Target(size_bytes=100, bpw=4.0)


def test_cli_json_and_recipe(tiny, tiny_imatrix, tmp_path):  # noqa: F811
    types = ",".join(q.name for q in TYPES + IM_TYPES)
    p = mq("allocate", tiny, "--imatrix", tiny_imatrix.path, "--target-bpw", "4.5", "--recipe", tmp_path / "tt.txt",
           "--types", types, "--json", "-t", "2")  # fmt: skip
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)  # stdout is the one JSON document
    assert {"config", "size_bytes", "bpw", "expected_error", "tensor_types", "command"} <= set(doc)
    assert doc["bpw"] <= 4.5 and doc["weighting"] == "imatrix"
    assert (tmp_path / "tt.txt").read_text().split() == doc["tensor_types"]
    assert doc["command"][:3] == ["llama-quantize", "--imatrix", tiny_imatrix.path.name] and "--pure" in doc["command"]
    sized = json.loads(mq("size", tiny, "-c", doc["config"], "--imatrix", tiny_imatrix.path, "--json").stdout)
    assert sized["size_bytes"] == doc["size_bytes"]
    plain = mq("allocate", tiny, "--target-size", "2MB", "--types", "Q8_0,Q4_K,Q2_K", "-t", "2", "--json")
    assert plain.returncode == 0 and "plain MSE" in plain.stderr
    d2 = json.loads(plain.stdout)
    assert d2["size_bytes"] <= 2_000_000 and d2["weighting"] == "plain MSE"
    assert set(Config.parse(d2["config"]).types_used()) <= {T.Q8_0, T.Q4_K, T.Q2_K}
    low = mq("allocate", tiny, "--target-bpw", "0.5", "--types", "Q4_K,Q2_K", "-t", "2")
    assert low.returncode != 0 and "no config fits 0.5 bpw" in low.stderr and "Traceback" not in low.stderr
    both = mq("allocate", tiny, "--target-bpw", "4", "--target-size", "1MB")
    assert both.returncode != 0 and "exactly one" in both.stderr
    bad = mq("allocate", tiny, "--target-bpw", "4", "--types", "Q4_K,TQ2_0")
    assert bad.returncode != 0 and "TQ2_0" in bad.stderr
