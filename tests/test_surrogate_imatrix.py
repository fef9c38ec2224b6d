"""The surrogate knows the imatrix: records with and without one never share a reference or a line, the
features of an imatrix record come from its imatrix-weighted table, and the candidate space with an imatrix
holds the types that need one (sizes with its keys)."""

from __future__ import annotations

import numpy as np
import pytest

from mqpredict.llama.inprocess import InProcessEngine
from mqpredict.measure.corpus import EvalSpec
from mqpredict.quant.config import Config
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.presets import Preset
from mqpredict.quant.resolve import resolve
from mqpredict.quant.size import size_of
from mqpredict.quant.types import T
from mqpredict.records.identity import identify
from mqpredict.records.schema import Source
from mqpredict.records.store import Store
from mqpredict.surrogate import features as F
from mqpredict.surrogate.data import build
from mqpredict.surrogate.weight_error import compute
from tests.test_weight_error import tiny_imatrix  # noqa: F401  (the session fixture)

SPEC = EvalSpec(ctx=128, n_chunks=2)
CONFIGS = ("default=Q4_K", "default=Q4_K,ffn_down=Q6_K", "default=Q6_K,attn_q=Q3_K", "default=Q2_K,ffn_down=Q5_K")


@pytest.fixture(scope="module")
def both(tiny, tiny_imatrix, corpus, tmp_path_factory):  # noqa: F811
    """The same configs of the tiny model measured without and with the imatrix, in one store; their tables."""
    from mqpredict.workflows import seed as seeding

    store = Store(tmp_path_factory.mktemp("im-records") / "records")
    model = ModelInfo.load(tiny)
    mid = identify(model).model_id
    cands = seeding.preset_candidates((Preset.Q8_0,)) + seeding.config_candidates(
        [Config.parse(c) for c in CONFIGS], Source.hybrid)  # fmt: skip
    for im in (None, tiny_imatrix):
        with InProcessEngine(tiny, corpus, SPEC, threads=2, imatrix=im) as eng:
            seeding.seed(eng, store, cands, keep_vectors=False)
    types = (T.F16, T.Q8_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K)
    tables = {t.key: t for t in (compute(model, mid, None, types, 2, sample_elements=8192),
                                 compute(model, mid, tiny_imatrix, types, 2, sample_elements=8192))}  # fmt: skip
    return store, tables, mid


def test_records_with_and_without_an_imatrix_never_share_a_reference(both, tiny_imatrix):  # noqa: F811
    store, tables, mid = both
    recs = store.load()
    assert set(recs["imatrix_id"].fillna("")) == {"", tiny_imatrix.id}
    data = build(recs, tables)
    assert len(data.refs) == 2 and set(data.refs["imatrix_id"].fillna("none")) == {"none", tiny_imatrix.id}
    assert data.rows.groupby("context")["imatrix_id"].nunique(dropna=False).max() == 1  # one imatrix per line
    im = data.rows["imatrix_id"].notna().to_numpy()
    assert im.sum() == (~im).sum() == len(CONFIGS) + 1
    x = data.X[:, F.FEATURES.index("imatrix")]
    assert (x[im] == 1).all() and (x[~im] == 0).all()
    # each record is measured against its own context's Q8_0
    for ctx, rows in data.rows.groupby("context"):
        ref = data.refs[data.refs["context"] == ctx]
        assert (rows["ref_kld"] == ref["kld_ref"].iloc[0]).all()
    # and its weight errors come from its own table: the same config's lwerr differs between the two
    same = data.rows["config"] == "default=Q4_K"
    lw = data.X[same.to_numpy(), F.FEATURES.index("lwerr")]
    assert len(lw) == 2 and lw[0] != pytest.approx(lw[1], abs=1e-6)
    # without the imatrix's table its records are left out (never featurized with the plain errors)
    only_plain = build(recs, {mid: tables[mid]})
    assert len(only_plain.refs) == 1 and only_plain.rows["imatrix_id"].isna().all()


def test_cross_validation_keeps_contexts_apart(both):
    from mqpredict.surrogate.cv import evaluate
    from mqpredict.surrogate.model import Surrogate

    store, tables, _ = both
    data = build(store.load(), tables)
    data.rows["family"] = np.where(data.rows["imatrix_id"].isna(), "plain", "imatrix")  # two "families"
    data.refs["family"] = np.where(data.refs["imatrix_id"].isna(), "plain", "imatrix")
    table = evaluate(data, lambda: Surrogate(n_estimators=10, min_child_samples=2), min_rows=1)
    assert set(table["method"]) == {"surrogate", "bpw", "allocator"}  # no probe rows: the probes predict nothing
    ref = table[(table["mode"] == "reference") & (table["rows"] == "all")]
    assert sorted(ref.groupby("imatrix").size()) == [3, 3]  # one line per context, each method once
    assert (ref["n"] == len(CONFIGS)).all()  # the scored rows: every config but the Q8_0 reference


def test_candidate_space_with_an_imatrix(tiny, tiny_imatrix):  # noqa: F811
    from mqpredict.search.space import IMATRIX_EXTRA, CandidateSpace, space_types
    from mqpredict.search.vectorized import Featurizer, Space
    from mqpredict.surrogate.service import score_configs

    model = ModelInfo.load(tiny)
    assert not set(space_types(None)) & set(IMATRIX_EXTRA) and set(IMATRIX_EXTRA) <= set(space_types(tiny_imatrix))
    cs = CandidateSpace(model, space_types(tiny_imatrix), tiny_imatrix)
    sp = Space.build(model, {g: cs.allowed(g) for g in model.groups}, tiny_imatrix)
    allowed = dict(zip(sp.groups, sp.types))
    assert T.IQ2_XXS in allowed["ffn_down"] and T.IQ1_S in allowed["attn_q"]
    # no imatrix weights for token_embd/output: ggml would abort on the types that need them there
    assert T.IQ2_XXS not in allowed["embeddings"] and T.IQ3_XXS in allowed["embeddings"]
    plain = Space.build(model, {g: CandidateSpace(model).allowed(g) for g in model.groups})
    assert not {q for ts in plain.types for q in ts} & set(IMATRIX_EXTRA)
    table = compute(model, "tiny", tiny_imatrix, (T.Q8_0, T.Q4_K, T.IQ2_XXS, T.IQ1_S), 2, sample_elements=4096)
    fz = Featurizer(sp, table)
    cfg = Config.parse("default=Q4_K,ffn_down=IQ2_XXS,attn_q=IQ1_S")
    row = np.array([[sp.types[j].index(dict(cfg.groups).get(g, cfg.default)) for j, g in enumerate(sp.groups)]])
    size, bpw = sp.sizes(row)
    s = score_configs(model, table, [cfg], imatrix=tiny_imatrix)[0]
    exact = size_of(model, resolve(model, cfg, imatrix=tiny_imatrix), tiny_imatrix)
    assert s.size_bytes == exact.size_bytes == size[0]
    assert exact.size_bytes > size_of(model, resolve(model, cfg, imatrix=tiny_imatrix)).size_bytes  # its keys
    assert np.allclose(fz.matrix(row, bpw)[0], [s.features[k] for k in F.FEATURES], atol=1e-9)
    assert s.features["imatrix"] == 1.0


def test_a_576_wide_model_with_an_imatrix_proposes_and_allocates_only_what_llama_cpp_writes(tiny576, tmp_path):
    """SmolLM2's widths: IQ2_XS asked for token_embd falls back to another type, but mqpredict refuses the
    request itself (no imatrix weights there) — the search space, its features and the allocator must agree
    with that refusal (the README's main command once stopped on it after seeding)."""
    from mqpredict.llama.imatrix import ImatrixSettings, compute_imatrix
    from mqpredict.quant.resolve import quantizable
    from mqpredict.search.allocator import allocations_across
    from mqpredict.search.proposer import Proposer
    from mqpredict.search.space import space_types
    from mqpredict.util.paths import DEFAULT_CALIBRATION

    model = ModelInfo.load(tiny576)
    im, _ = compute_imatrix(tiny576, DEFAULT_CALIBRATION, tmp_path / "im.gguf", ImatrixSettings(4, 128), threads=2)
    assert not im.has("token_embd.weight")
    table = compute(model, "tiny576", im, space_types(im), 2, sample_elements=4096)
    prop = Proposer(model, table, space_types(im), imatrix=im)  # its Featurizer resolves every (group, type)
    emb = dict(zip(prop._space.groups, prop._space.types))["embeddings"]
    assert T.IQ2_XS not in emb and T.IQ2_XXS not in emb and T.Q8_0 in emb
    for a in allocations_across(model, table, 4, 2.5, 7.5, None, im):
        assert all(quantizable(n, q, im) for n, q in a.types.items())
        resolve(model, a.config, imatrix=im)  # builds as it is
