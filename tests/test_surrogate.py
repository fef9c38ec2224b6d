"""Surrogate: weight errors, features, training, honest intervals, persistence, family exclusion, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mqpredict.base.testmodel import TinyShape, write_test_model
from mqpredict.llama.inprocess import InProcessEngine
from mqpredict.measure.corpus import EvalSpec
from mqpredict.quant.model import ModelInfo
from mqpredict.records.identity import identify
from mqpredict.records.schema import Source
from mqpredict.records.store import Store
from mqpredict.surrogate import features as F
from mqpredict.surrogate.data import build, load_tables
from mqpredict.surrogate.model import Surrogate
from mqpredict.surrogate.weight_error import ErrorTable, error_table
from tests.conftest import mq

SPEC = EvalSpec(ctx=128, n_chunks=2)
SHAPES = {"a0": (TinyShape(256, 768, 4), 0), "a1": (TinyShape(256, 768, 4), 1), "b0": (TinyShape(576, 1536, 2, tied=True), 0)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, corpus):
    """Three tiny models in two families (256-wide ×2 seeds, 576-wide tied), really measured:
    presets, probes and 25 hybrids each, with their weight-error tables."""
    from mqpredict.workflows import seed as seeding
    from mqpredict.search.space import CandidateSpace

    root = tmp_path_factory.mktemp("ds")
    store, tables = Store(root / "records"), root / "tables"
    paths = {}
    for name, (shape, s) in SHAPES.items():
        p = write_test_model(root / f"{name}.gguf", s, shape)
        paths[name] = p
        space = CandidateSpace(ModelInfo.load(p))
        cands = seeding.preset_candidates()
        cands += seeding.config_candidates(list(space.probes()), Source.probe)
        cands += seeding.config_candidates(space.sample(25, np.random.default_rng(s)), Source.hybrid)
        with InProcessEngine(p, corpus, SPEC, threads=2) as eng:
            error_table(eng, identify(eng.model).model_id).save(tables / f"{identify(eng.model).model_id}.json")
            seeding.seed(eng, store, cands, keep_vectors=False)
    return {"store": store.root, "tables": tables, "paths": paths}


def test_weight_errors_order_types(tiny):
    with InProcessEngine(tiny, None, SPEC, threads=2) as eng:
        t = error_table(eng, "tiny")
    e = t.errors["ffn_down"]
    assert e["F16"] < 1e-6 < e["Q8_0"] < e["Q6_K"] < e["Q5_K"] < e["Q4_K"] < e["Q3_K"] < e["Q2_K"]
    assert sum(t.shares.values()) < 1 and t.shares["ffn_down"] == pytest.approx(786432 / 3410176)
    assert ErrorTable.from_json(json.loads(json.dumps(t.to_json()))) == t


def test_every_feature_is_documented_and_tied_models_line_up(dataset):
    assert set(F.FEATURE_DOCS) == set(F.FEATURES) and all(F.FEATURE_DOCS.values())
    data = build(Store(dataset["store"]).load(), load_tables(dataset["tables"]))
    assert data.X.shape[1] == len(F.FEATURES) and np.isfinite(data.X).all()
    tied = data.rows["family"] == "synthetic-tiny-576"
    out, emb = F.FEATURES.index("lerr_out"), F.FEATURES.index("lerr_emb")
    assert np.allclose(data.X[tied.to_numpy(), out], data.X[tied.to_numpy(), emb])  # one tensor, both jobs
    assert (data.X[(~tied).to_numpy(), F.FEATURES.index("share_out")] > 0).all()


def test_fit_predict_and_round_trip(dataset, tmp_path):
    data = build(Store(dataset["store"]).load(), load_tables(dataset["tables"]))
    s = Surrogate(n_estimators=80).fit(data)
    p = s.predict(data.X)["kld"]
    assert np.corrcoef(p.mean, data.Y[:, 0])[0, 1] > 0.9  # learns the training data
    assert (p.lo <= p.mean).all() and (p.mean <= p.hi).all() and s.calibrated_
    mean, hw = s.predict_kld(data.X)  # what a search scores its pool with: the same numbers
    assert np.array_equal(mean, p.mean) and np.array_equal(mean + hw, p.hi) and np.array_equal(mean - hw, p.lo)
    s.save(tmp_path / "m")
    files = sorted(f.name for f in (tmp_path / "m").iterdir())
    assert files == ["kld.txt", "metadata.json", "miss.txt", "p99.txt"]  # LightGBM text + JSON, no pickle
    s2, meta = Surrogate.load(tmp_path / "m")
    assert np.allclose(s2.predict(data.X)["kld"].mean, p.mean) and meta["train_families"] == data.families
    again = Surrogate(n_estimators=80).fit(data)
    assert np.array_equal(again.predict(data.X)["kld"].mean, p.mean)  # seeded: deterministic


def test_incompatible_surrogate_is_refused(dataset, tmp_path):
    from mqpredict.errors import InputError

    s = Surrogate(n_estimators=20).fit(build(Store(dataset["store"]).load(), load_tables(dataset["tables"])))
    s.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "metadata.json").read_text())
    meta["features"] = meta["features"][:-1]
    (tmp_path / "m" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="retrain"):
        Surrogate.load(tmp_path / "m")
    with pytest.raises(InputError, match="not a surrogate folder"):
        Surrogate.load(tmp_path)


def test_out_of_range_is_flagged(dataset):
    data = build(Store(dataset["store"]).load(), load_tables(dataset["tables"]))
    s = Surrogate(n_estimators=20).fit(data)
    x = data.X[:1].copy()
    x[0, F.FEATURES.index("log_params")] = 11.0  # a 100B model
    assert any("log_params" in f for f in s.out_of_range(x)[0]) and s.out_of_range(data.X[:1]) == [[]]


def test_cross_validation_against_baselines(dataset):
    from mqpredict.surrogate.cv import METRICS, evaluate, summary

    data = build(Store(dataset["store"]).load(), load_tables(dataset["tables"]))
    table = evaluate(data, lambda: Surrogate(n_estimators=60))
    assert set(table["method"]) == {"surrogate", "bpw", "probes", "allocator"}
    assert set(table["model_name"]) == {r["model_name"] for _, r in data.rows.iterrows()}
    s = summary(table)
    assert set(METRICS) <= set(s.columns)
    surr = table[(table["method"] == "surrogate") & (table["mode"] == "reference")]
    assert (surr["spearman"] > 0.5).all() and surr["coverage"].between(0, 1).all()
    probes = table[table["method"] == "probes"]
    assert (probes["n"] > 0).all()  # the probe baseline applies to the probe-covered configs
    # every method on the same rows: no probe or reference row scored, the probes compared on their subset
    sub = table[table["rows"] == "probe-predictable"]
    assert set(sub["method"]) == {"surrogate", "bpw", "probes", "allocator"}
    assert (sub.groupby("model_id")["n"].nunique() == 1).all()
    allr = table[(table["rows"] == "all") & (table["mode"] == "reference")]
    assert "probes" not in set(allr["method"]) and (allr.groupby("model_id")["n"].nunique() == 1).all()
    scored = data.rows[(data.rows["source"] != "probe") & (data.rows["config"] != "preset=Q8_0")]
    assert dict(allr[allr["method"] == "bpw"].set_index("model_id")["n"]) == dict(scored["model_id"].value_counts())
    assert (s["n_models"] >= 1).all()


def test_zero_shot_reference_learns_from_real_models_only():
    """The Q8_0 reference's zero-shot ridge leaves synthetic models out once two real models are there, and
    with fewer real models than its descriptors need it predicts their mean (no exact-fit slope)."""
    import pandas as pd

    from mqpredict.surrogate.model import REF_FEATURES

    rng = np.random.default_rng(0)
    n_syn, k = 12, len(REF_FEATURES)
    X = rng.normal(size=(n_syn + 3, len(F.FEATURES)))
    lp = F.FEATURES.index("log_params")
    y = np.r_[5.0 * X[:n_syn, lp], -5.2, -5.6, -6.7]  # synthetic: a steep slope real models do not follow
    refs = pd.DataFrame({"model_id": [f"s{i}" for i in range(n_syn)] + ["a", "b", "b"],
                         "synthetic": [True] * n_syn + [False] * 3})  # fmt: skip
    s = Surrogate()
    coef, _, mu, sd = s._fit_ref(X, y, refs)
    pred = s._ref_predict(rng.normal(size=(4, len(F.FEATURES))) * 10, coef, mu, sd)
    assert np.allclose(pred, np.mean([-5.2, -5.6, -6.7]))
    many = pd.DataFrame({"model_id": [f"r{i}" for i in range(k + 3)], "synthetic": False})
    Xm = rng.normal(size=(k + 3, len(F.FEATURES)))
    coef, _, mu, sd = s._fit_ref(Xm, 0.5 * Xm[:, lp] - 6, many)  # enough real models: a ridge on descriptors
    assert coef[1 + REF_FEATURES.index("log_params")] > 0.2
    coef, _, mu, sd = s._fit_ref(X[:n_syn], y[:n_syn], refs[:n_syn])  # no real model: the synthetic ones it is
    assert coef[1 + REF_FEATURES.index("log_params")] > 1.0


def test_local_correction_applies_only_what_its_own_residuals_support():
    """A campaign's refit corrects the boosters by the model's own residuals: a shift when they are shifted,
    a ridge on the per-group errors when they follow one, nothing on noise or with too few rows."""
    from mqpredict.surrogate.local import LocalCorrection

    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, len(F.FEATURES)))
    shift = LocalCorrection.fit(X, 0.8 + 0.01 * rng.normal(size=12))
    assert shift is not None and shift.predict(rng.normal(size=(3, len(F.FEATURES)))) == pytest.approx([0.8] * 3, abs=0.05)
    d = F.FEATURES.index("dlerr_ffn_down")
    X30 = rng.normal(size=(30, len(F.FEATURES)))  # a campaign's presets and proposals
    lin = LocalCorrection.fit(X30, 0.5 * X30[:, d])
    assert lin is not None and lin.kind.startswith("ridge") and lin.loo_rmse < 0.5 * lin.loo_rmse_none
    Xn = rng.normal(size=(6, len(F.FEATURES)))
    assert np.corrcoef(lin.predict(Xn), 0.5 * Xn[:, d])[0, 1] > 0.9
    noise = LocalCorrection.fit(X, 0.05 * rng.normal(size=12))
    assert noise is None or np.abs(noise.predict(X)).max() < 0.05
    assert LocalCorrection.fit(X[:2], np.array([1.0, 1.0])) is None


def test_interval_width_varies_by_candidate_and_stays_calibrated():
    """Normalized conformal: where residuals are large the interval is wide, where small narrow, and 80% of
    new rows (of families it never saw) fall inside."""
    rng = np.random.default_rng(0)
    n, k = 1800, len(F.FEATURES)
    X = rng.random((n, k))
    sd = 0.05 + 0.5 * X[:, 0]  # the surrogate is unsure where feature 0 is large
    r = np.abs(rng.normal(0, sd))
    fam = np.array([f"f{i % 6}" for i in range(n)], dtype=object)
    s = Surrogate()
    s.halfwidth_ = [float(np.quantile(r, 0.8))] * 3
    s._calibrate_scale(X, r, np.ones(n), fam)
    hw = s.kld_halfwidth(X)
    assert np.corrcoef(hw, sd)[0, 1] > 0.8 and hw.max() > 3 * hw.min()
    X2 = rng.random((4000, k))
    r2 = np.abs(rng.normal(0, 0.05 + 0.5 * X2[:, 0]))
    assert 0.75 <= np.mean(r2 <= s.kld_halfwidth(X2)) <= 0.85


def test_surrogate_never_used_on_its_own_family(dataset, tmp_path):
    from mqpredict.surrogate.service import surrogate_for, train

    s, meta = train(dataset["store"], dataset["tables"], n_estimators=20)
    s.save(tmp_path / "m", meta)
    ident = identify(ModelInfo.load(dataset["paths"]["a0"]))
    assert ident.family in s.train_families_
    s2, meta2 = surrogate_for(ident, tmp_path / "m", dataset["store"], dataset["tables"])
    assert ident.family not in s2.train_families_ and meta2["excluded_families"] == [ident.family]
    other = identify(write_test_model_at(tmp_path, TinyShape(384, 1024, 2)))
    assert surrogate_for(other, tmp_path / "m", dataset["store"], dataset["tables"])[0].train_families_ == s.train_families_


def write_test_model_at(tmp_path: Path, shape: TinyShape) -> ModelInfo:
    return ModelInfo.load(write_test_model(tmp_path / "other.gguf", 5, shape))


def test_train_and_predict_cli(dataset, tmp_path, corpus):
    m = tmp_path / "surr"
    p = mq("train", "--store", dataset["store"], "--tables", dataset["tables"], "--out", m, "--cv", "--no-track", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["cv"] and (m / "cv.csv").exists()
    new = write_test_model(tmp_path / "new.gguf", 7, TinyShape(384, 1024, 2))  # a family it never saw
    rows = json.loads(mq("predict", new, "-c", "Q8_0", "-c", "Q4_K_M", "-c", "Q2_K", "--surrogate", m, "--json").stdout)
    assert [r["config"] for r in rows] == ["preset=Q8_0", "preset=Q4_K_M", "preset=Q2_K"]
    need = {"config", "size_bytes", "bpw", "kld_pred", "kld_lo", "kld_hi", "mode"}
    assert all(need <= set(r) and r["mode"] == "zero-shot" and r["kld_lo"] <= r["kld_pred"] <= r["kld_hi"] for r in rows)
    assert rows[0]["kld_pred"] < rows[1]["kld_pred"] < rows[2]["kld_pred"]
    sized = json.loads(mq("size", new, "-c", "Q4_K_M", "--json").stdout)
    assert rows[1]["size_bytes"] == sized["size_bytes"]
    ref = json.loads(mq("predict", new, "-c", "Q4_K_M", "--corpus", corpus, "--ctx", "128", "--tokens", "256",
                        "--surrogate", m, "--json").stdout)  # fmt: skip
    assert [r["mode"] for r in ref] == ["reference", "reference"] and ref[-1]["reference"]
    best = json.loads(mq("predict", new, "--target-bpw", "5.0", "--top", "3", "--candidates", "300", "--surrogate", m,
                         "--json").stdout)  # fmt: skip
    assert 1 <= len(best) <= 3 and all(r["bpw"] <= 5.0 and r["command"].startswith("llama-quantize") for r in best)
    assert [r["kld_pred"] for r in best] == sorted(r["kld_pred"] for r in best)
    # with an imatrix: its types are candidates, sizes count its keys, the commands quantize with it
    from mqpredict.llama.imatrix import ImatrixSettings, compute_imatrix

    wide = write_test_model(tmp_path / "new512.gguf", 9, TinyShape(512, 1024, 2))  # K/IQ types fit, a new family
    im, _ = compute_imatrix(wide, corpus, tmp_path / "new.imatrix.gguf", ImatrixSettings(2, 128), threads=2)
    low = json.loads(mq("predict", wide, "--imatrix", im.path, "--target-bpw", "3.5", "--top", "3", "--candidates",
                        "300", "--surrogate", m, "--json").stdout)  # fmt: skip
    assert low and all(r["bpw"] <= 3.5 and "--imatrix" in r["command"] for r in low)
    sized = json.loads(mq("size", wide, "-c", low[0]["config"], "--imatrix", im.path, "--json").stdout)
    assert sized["size_bytes"] == low[0]["size_bytes"]


def test_nothing_is_pickled():
    root = Path(__file__).parents[1]
    files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=root).stdout.split()
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".joblib"))]
    code = "\n".join((root / f).read_text() for f in files if f.startswith("mqpredict/") and f.endswith(".py"))
    assert "import pickle" not in code and "joblib" not in code and "allow_pickle=True" not in code


@pytest.mark.parametrize("name", ["a0", "b0"])
def test_vectorized_space_matches_the_reference_path(dataset, name):
    """Exact sizes, effective-type dedup and features of a million-candidate screen equal the per-config path."""
    from mqpredict.quant.derive import type_fractions
    from mqpredict.quant.resolve import resolve, types_key
    from mqpredict.quant.size import size_of
    from mqpredict.search.space import CandidateSpace
    from mqpredict.search.vectorized import Featurizer, Space

    m = ModelInfo.load(dataset["paths"][name])
    table = load_tables(dataset["tables"])[identify(m).model_id]
    cs = CandidateSpace(m)
    sp = Space.build(m, {g: cs.allowed(g) for g in m.groups})
    A = sp.enumerate(20000)
    size, bpw = sp.sizes(A)
    keep = sp.unique(A)
    fz = Featurizer(sp, table)
    rng = np.random.default_rng(1)
    keys = set()
    for i in rng.choice(len(A), 25, replace=False):
        types = resolve(m, sp.config(A[i]))
        rep = size_of(m, types)
        assert rep.size_bytes == size[i] and rep.bpw == pytest.approx(bpw[i])
        ref = F.row(type_fractions(m, types), table, m.descriptors(), rep.bpw, fz.ref_fr)
        assert np.allclose(fz.matrix(A[i : i + 1], bpw[i : i + 1])[0], [ref[k] for k in F.FEATURES], atol=1e-9)
    for i in keep[:200]:
        keys.add(types_key(m, resolve(m, sp.config(A[i]))))
    assert len(keys) == min(200, len(keep))  # the kept candidates are distinct files


def test_train_counts_the_records_it_cannot_use_and_refuses_a_store_that_gives_nothing(dataset, tmp_path):
    recs = Store(dataset["store"]).load()
    ids = {name: identify(ModelInfo.load(p)).model_id for name, p in dataset["paths"].items()}
    # a store of the dataset without a1's Q8_0 reference, and tables of a0 and a1 only (none of b0)
    csv_all, csv_cut = tmp_path / "all.csv", tmp_path / "cut.csv"
    mq("data", "export", "--store", dataset["store"], "-o", csv_all, check=True)
    lines = csv_all.read_text().splitlines(keepends=True)
    cut = [x for x in lines if not (ids["a1"] in x and ",preset=Q8_0," in x)]
    assert len(cut) == len(lines) - 1
    csv_cut.write_text("".join(cut))
    mq("data", "import", csv_cut, "--store", tmp_path / "store", check=True)
    tables = tmp_path / "tables"
    tables.mkdir()
    for name in ("a0", "a1"):
        shutil.copy(dataset["tables"] / f"{ids[name]}.json", tables)
    doc = json.loads(mq("train", "--store", tmp_path / "store", "--tables", tables, "--out", tmp_path / "m", "--no-track",
                        "--json", check=True).stdout)  # fmt: skip
    ok = recs[recs["status"] == "ok"]
    want = {"no_table": int((ok["model_id"] == ids["b0"]).sum()), "no_reference": int((ok["model_id"] == ids["a1"]).sum()) - 1}
    if (recs["status"] != "ok").any():
        want["not_ok"] = int((recs["status"] != "ok").sum())
    assert doc["unused_records"] == want and doc["rows"] == int((ok["model_id"] == ids["a0"]).sum())
    human = mq("train", "--store", tmp_path / "store", "--tables", tables, "--out", tmp_path / "m2", "--no-track")
    assert f"{want['no_table']} no weight-error table for its model" in human.stderr
    # a store that contributes nothing: one line, no surrogate written
    empty = tmp_path / "no-tables"
    empty.mkdir()
    p = mq("train", "--store", tmp_path / "store", "--tables", empty, "--out", tmp_path / "m3", "--no-track")
    assert p.returncode == 2 and "Traceback" not in p.stderr and not (tmp_path / "m3").exists()
    msg = " ".join(p.stderr.split())
    assert f"{tmp_path / 'store'} contributes no training row" in msg and f"{len(recs) - 1} record(s)" in msg
    assert "no weight-error table for its model" in msg
