"""Mixture-of-experts models end to end, on tiny MoE GGUFs llama.cpp runs as such: expert groups, exact
sizes and effective types (3-D tensors, llama.cpp's MoE rules) against the real llama-quantize, stitched
builds byte-identical to it, real KLD by both engines, seed/campaign/predict, and a real MoE's shapes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from mqpredict.base.testmodel import TinyShape, write_test_model
from mqpredict.measure.corpus import EvalSpec
from mqpredict.quant.config import Config
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.size import size_of
from mqpredict.quant.types import T
from tests.conftest import mq

#: qwen3moe (routed experts only), granitemoe (+ an ungated shared expert), qwen2moe (+ a gated one), and
#: an 8-expert qwen3moe: llama.cpp's presets treat 8-expert models apart (attn_k/attn_v at Q8_0 …)
SHAPES = {
    "e4": TinyShape(256, 256, 2, n_expert=4, n_expert_used=2),
    "e4s": TinyShape(256, 256, 2, n_expert=4, n_expert_used=2, shared_expert=True),
    "e4g": TinyShape(256, 256, 2, n_expert=4, n_expert_used=2, shared_expert=True, shared_expert_gate=True),
    "e8": TinyShape(256, 256, 2, n_expert=8, n_expert_used=2),
}
CONFIGS = [
    "Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS", "MXFP4_MOE",
    "default=Q8_0,moe_experts_up_gate=Q4_K,moe_experts_down=Q5_K",
    "default=Q4_K,moe_experts_down=Q6_K,attn_kv=Q8_0,embeddings=Q6_K",
    r"default=Q5_0,tensor:blk\.1\.ffn_down_exps=Q8_0,moe_experts_up_gate=IQ4_NL",
    "Q4_K_M,moe_experts_up_gate=Q3_K",
]  # fmt: skip
#: every config on the shared-expert model; a few on the others (each build runs llama-quantize once)
BUILDS = {"e4s": CONFIGS, "e4": ["Q4_K_M", CONFIGS[6], CONFIGS[-1]], "e4g": ["Q4_K_M", "MXFP4_MOE", CONFIGS[7]],
          "e8": ["Q4_K_M"]}  # fmt: skip
SPEC = EvalSpec(ctx=128, n_chunks=4)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("moe")
    return {k: write_test_model(d / f"{k}.gguf", seed=i, shape=s) for i, (k, s) in enumerate(SHAPES.items())}


@pytest.fixture(scope="module")
def moe_engines(moe, corpus, make_engine):
    made = {(kind, name): make_engine(kind, p, corpus, SPEC) for name, p in moe.items() for kind in ("inprocess", "tools")}
    yield made
    for e in made.values():
        e.close()


def test_testmodel_is_a_deterministic_moe(moe, tmp_path):
    again = write_test_model(tmp_path / "again.gguf", seed=0, shape=SHAPES["e4"])
    assert _sha(again) == _sha(moe["e4"])
    archs = {k: ModelInfo.load(p).arch for k, p in moe.items()}
    assert archs == {"e4": "qwen3moe", "e4s": "granitemoe", "e4g": "qwen2moe", "e8": "qwen3moe"}
    m = ModelInfo.load(moe["e4g"])
    t = m.header.tensor_map["blk.0.ffn_down_exps.weight"]
    assert t.shape == (256, 256, 4)  # ne: row length (expert FFN width), rows, experts
    assert m.group_map["blk.0.ffn_gate_inp.weight"] is None and m.group_map["blk.0.ffn_gate_inp_shexp.weight"] is None
    assert (m.n_expert, m.n_expert_used) == (4, 2)
    with pytest.raises(Exception, match="experts-used"):
        write_test_model(tmp_path / "bad.gguf", shape=TinyShape(n_expert=4, n_expert_used=5))


def test_inspect_shows_expert_groups_with_their_shares(moe):
    doc = json.loads(mq("inspect", moe["e4s"], "--json", check=True).stdout)
    g = {x["group"]: x for x in doc["groups"]}
    assert list(g) == ["embeddings", "lm_head", "attn_q", "attn_kv", "attn_output", "moe_experts_up_gate",
                       "moe_experts_down", "moe_shexp"]  # fmt: skip
    # per layer: up+gate 2 × 4 experts × 256 × 256, down 4 × 256 × 256, shared expert 3 × 256 × 256
    assert g["moe_experts_up_gate"]["n_params"] == 2 * 2 * 4 * 256 * 256
    assert g["moe_experts_down"]["n_params"] == 2 * 4 * 256 * 256
    assert g["moe_shexp"]["n_params"] == 2 * 3 * 256 * 256
    assert g["moe_experts_down"]["share"] == pytest.approx(2 * 4 * 256 * 256 / doc["n_params"])
    assert g["moe_experts_down"]["active"] == 0.5 and g["moe_shexp"]["active"] == 1.0  # 2 of 4 experts per token
    routed = g["moe_experts_up_gate"]["n_params"] + g["moe_experts_down"]["n_params"]
    assert doc["n_params_active"] == doc["n_params"] - routed // 2
    assert {"blk.0.ffn_gate_inp.weight"} <= set(doc["fixed"]["names"])
    text = mq("inspect", moe["e4s"], check=True).stdout
    assert "2 used per token" in text and "moe_experts_down" in text


@pytest.fixture(scope="module")
def built(moe_engines, tmp_path_factory):
    """Every config built by llama-quantize (tools engine) and by the stitcher (in-process engine)."""
    out = tmp_path_factory.mktemp("moe-built")
    return {(kind, name, c): eng.build(Config.parse(c), out / f"{kind}-{name}-{i}.gguf")
            for (kind, name), eng in moe_engines.items() for i, c in enumerate(BUILDS[name])}  # fmt: skip


@pytest.mark.parametrize("name", list(SHAPES))
def test_sizes_are_exact_and_stitched_builds_equal_llama_quantize(built, moe_engines, name):
    for c in BUILDS[name]:
        a, b = built["inprocess", name, c], built["tools", name, c]
        m = moe_engines["tools", name].model
        predicted = size_of(m, moe_engines["inprocess", name].resolve(Config.parse(c)))
        assert b.path.stat().st_size == predicted.size_bytes, c  # llama-quantize's file, sized before building
        assert {t.name: t.qtype for t in ModelInfo.load(b.path).tensors} == a.types, c  # effective types
        assert _sha(a.path) == _sha(b.path), c  # the stitched hybrid is llama-quantize's file byte for byte


def test_llama_cpp_moe_rules_are_what_the_sizes_follow(built):
    """Presets follow llama.cpp's MoE rules, read from its own dry run: MXFP4_MOE puts the 3-D expert tensors
    at MXFP4 and the rest at Q8_0; on 8-expert models attn_k/attn_v go to Q8_0 and attn_output to Q5_K."""
    mx = built["tools", "e4g", "MXFP4_MOE"].types
    assert mx["blk.0.ffn_up_exps.weight"] == mx["blk.1.ffn_down_exps.weight"] == T.MXFP4
    assert mx["blk.0.ffn_up_shexp.weight"] == mx["blk.0.attn_q.weight"] == T.Q8_0  # 2-D: not experts
    e8, e4 = built["tools", "e8", "Q4_K_M"].types, built["tools", "e4", "Q4_K_M"].types
    assert e8["blk.0.attn_k.weight"] == e8["blk.1.attn_v.weight"] == T.Q8_0
    assert e8["blk.0.attn_output.weight"] == T.Q5_K and e4["blk.0.attn_output.weight"] == T.Q4_K
    assert e4["blk.0.attn_k.weight"] == T.Q4_K
    # Q4_K_M's "more bits" layers for ffn_down (here the last of 2) apply to the experts' down projections
    assert e4["blk.1.ffn_down_exps.weight"] == T.Q6_K and e4["blk.0.ffn_down_exps.weight"] == T.Q4_K
    assert e4["blk.1.ffn_up_exps.weight"] == T.Q4_K
    hyb = built["tools", "e4", "Q4_K_M,moe_experts_up_gate=Q3_K"].types
    assert hyb["blk.0.ffn_gate_exps.weight"] == hyb["blk.1.ffn_up_exps.weight"] == T.Q3_K
    assert hyb["blk.0.ffn_gate_inp.weight"] == T.F32  # the router stays as it is


def test_imatrix_on_a_moe_weights_each_expert_and_builds_equal_llama_quantize(moe, tmp_path):
    """llama-imatrix keeps one weight vector per expert; quantized with it, an expert hybrid with low-bit types that
    need those weights is sized exactly and stitched byte-identical to llama-quantize --imatrix."""
    from mqpredict.llama.inprocess import InProcessEngine
    from mqpredict.llama.tools import ToolsEngine
    from mqpredict.quant.imatrix import Imatrix

    calib = tmp_path / "calib.txt"
    calib.write_text((Path(__file__).parents[1] / "README.md").read_text() * 3)  # not the evaluation text
    im_path = tmp_path / "moe.imatrix.gguf"
    mq("imatrix", moe["e4s"], "--corpus", calib, "-o", im_path, "--chunks", 8, "--ctx", 128, "--json", check=True)
    im = Imatrix.load(im_path)
    w = im.entries["blk.0.ffn_down_exps.weight"]
    assert w.shape == (256 * 4,) and (w > 0).all()  # row length × experts
    assert im.entries["blk.1.ffn_up_shexp.weight"].shape == (256,)
    cfgs = ["default=Q4_K,moe_experts_up_gate=IQ2_XS,moe_experts_down=IQ3_XXS,moe_shexp=Q5_K"]
    out = {}
    for cls in (InProcessEngine, ToolsEngine):
        with cls(moe["e4s"], None, SPEC, threads=2, imatrix=im_path) as eng:
            for i, c in enumerate(cfgs):
                b = eng.build(Config.parse(c), tmp_path / f"{cls.__name__}-{i}.gguf")
                assert b.path.stat().st_size == eng.size(Config.parse(c)).size_bytes, c
                out[cls, c] = b
    for c in cfgs:
        assert _sha(out[InProcessEngine, c].path) == _sha(out[ToolsEngine, c].path), c
    assert out[InProcessEngine, cfgs[0]].types["blk.1.ffn_gate_exps.weight"] == T.IQ2_XS


# ------------------------------------------------------------------------------ measured
HYBRID = "default=Q8_0,moe_experts_up_gate=Q4_K,moe_experts_down=Q4_K,moe_shexp=Q4_K"


def test_real_kld_orders_expert_hybrids_and_both_engines_agree(moe_engines):
    """In process and with the real tools (llama-quantize's file, llama-perplexity) the KLD of a MoE's
    expert hybrid sits between Q8_0 and Q2_K, and the two engines agree."""
    got = {(kind, c): moe_engines[kind, "e4s"].measure(Config.parse(c)).stats
           for kind in ("inprocess", "tools") for c in ("Q8_0", HYBRID)}  # fmt: skip
    q2 = moe_engines["inprocess", "e4s"].measure(Config.parse("Q2_K")).stats
    assert 0 < got["inprocess", "Q8_0"].kld_mean < got["inprocess", HYBRID].kld_mean < q2.kld_mean
    for c in ("Q8_0", HYBRID):
        a, b = got["inprocess", c], got["tools", c]
        assert a.n_tokens == b.n_tokens == 4 * 63
        assert a.kld_mean == pytest.approx(b.kld_mean, rel=0.01) and a.ppl_base == pytest.approx(b.ppl_base, rel=1e-4)


def test_every_expert_group_is_used_by_llama_cpp(moe_engines):
    """The graph really runs routed and shared experts: each expert group at Q2_K alone costs KLD, one layer's
    routed experts less than all layers'."""
    eng = moe_engines["inprocess", "e4s"]
    kld = lambda c: eng.measure(Config.parse(c)).stats.kld_mean  # noqa: E731
    ref = kld("Q8_0")
    one = kld(r"default=Q8_0,tensor:blk\.0\.ffn_down_exps=Q2_K")
    assert ref < one < kld("default=Q8_0,moe_experts_down=Q2_K")
    assert kld("default=Q8_0,moe_shexp=Q2_K") > 2 * ref and kld("default=Q8_0,moe_experts_up_gate=Q2_K") > 2 * ref


# ------------------------------------------------------------------ records, surrogate, campaign
DATA_SPEC = EvalSpec(ctx=128, n_chunks=2)


@pytest.fixture(scope="module")
def moe_data(moe, corpus, tmp_path_factory):
    """Two MoE families really measured: e4 seeded by the CLI (presets + the published recipes), e4s by the
    library (presets + isolation probes + hybrids); their weight-error tables."""
    import numpy as np

    from mqpredict.llama.inprocess import InProcessEngine
    from mqpredict.workflows import seed as seeding
    from mqpredict.records.identity import identify
    from mqpredict.records.schema import Source
    from mqpredict.records.store import Store
    from mqpredict.search.space import CandidateSpace
    from mqpredict.surrogate.weight_error import error_table

    root = tmp_path_factory.mktemp("moe-data")
    store, tables = root / "records", root / "tables"
    p = mq("seed", moe["e4"], "--store", store, "--recipes", "datasets/recipes", "--corpus", corpus, "--ctx", 128,
           "--tokens", 126, "--no-imatrix", "--no-track", "--json", "-t", 2, check=True)  # fmt: skip
    seeded = json.loads(p.stdout)
    for name in ("e4", "e4s"):
        with InProcessEngine(moe[name], corpus, DATA_SPEC, threads=2) as eng:
            mid = identify(eng.model).model_id
            error_table(eng, mid).save(tables / f"{mid}.json")
            if name == "e4s":
                space = CandidateSpace(eng.model)
                cands = seeding.preset_candidates()
                cands += seeding.config_candidates(space.sample(6, np.random.default_rng(0)), Source.hybrid)
                seeding.seed(eng, Store(store), cands, keep_vectors=False)
    return {"store": store, "tables": tables, "seeded": seeded}


def test_seed_measures_presets_and_published_moe_recipes(moe_data):
    """The recipes' expert patterns land on the experts, per layer where the recipe says so."""
    from mqpredict.records.store import Store

    s = moe_data["seeded"]
    assert not s["failed"] and len(s["measured"]) >= 17 + 5
    assert "preset=MXFP4_MOE" in s["measured"]  # a mixture of experts also gets llama.cpp's MoE preset
    recs = Store(moe_data["store"]).load()
    glm = recs[recs["provenance_file"].fillna("").str.endswith("thireus-glm-4.7-flash-3.48bpw.txt")].iloc[0]
    assert glm["fractions"]["moe_experts_down"].get("IQ4_NL", 0) >= 0.5  # ^blk\.(1|[7-8])\.ffn_down_exps…=iq4_nl
    q2kl = recs[recs["provenance_file"].fillna("").str.endswith("unsloth-q2_k_l-generic.txt")].iloc[0]
    assert q2kl["fractions"]["moe_experts_down"] == {"Q3_K": 1.0}  # its \\.ffn_down_exps=Q3_K pattern
    assert q2kl["fractions"]["moe_experts_up_gate"] == {"Q2_K": 1.0} and q2kl["n_expert"] == 4


def test_moe_features_and_the_vectorized_screen_agree(moe, moe_data):
    """Expert slots, active share, expert ratio and the active-weighted error: the vectorized screen of a
    MoE's candidate space equals the per-config features, and exact sizes too."""
    import numpy as np

    from mqpredict.quant.derive import type_fractions
    from mqpredict.quant.resolve import resolve
    from mqpredict.records.identity import identify
    from mqpredict.search.space import CandidateSpace
    from mqpredict.search.vectorized import Featurizer, Space
    from mqpredict.surrogate import features as F
    from mqpredict.surrogate.data import load_tables

    m = ModelInfo.load(moe["e4s"])
    table = load_tables(moe_data["tables"])[identify(m).model_id]
    assert table.active == {"moe_experts_up_gate": 0.5, "moe_experts_down": 0.5}
    assert 0 < table.mse("moe_experts_down", "Q8_0") < table.mse("moe_experts_down", "MXFP4") < table.mse("moe_experts_down", "Q2_K")
    cs = CandidateSpace(m)
    sp = Space.build(m, {g: cs.allowed(g) for g in m.groups})
    A = sp.enumerate(5000)
    size, bpw = sp.sizes(A)
    fz = Featurizer(sp, table)
    X = fz.matrix(A, bpw)
    for i in np.random.default_rng(1).choice(len(A), 12, replace=False):
        types = resolve(m, sp.config(A[i]))
        rep = size_of(m, types)
        assert rep.size_bytes == size[i]
        ref = F.row(type_fractions(m, types), table, m.descriptors(), rep.bpw, fz.ref_fr)
        assert np.allclose(X[i], [ref[k] for k in F.FEATURES], atol=1e-9)
    col = {k: X[0, F.FEATURES.index(k)] for k in F.FEATURES}
    assert col["active_share"] == pytest.approx(m.n_params_active / m.n_params) and col["expert_ratio"] == 0.5
    assert col["share_moe_experts_down"] == pytest.approx(table.shares["moe_experts_down"]) and col["share_ffn_down"] == 0
    # experts at Q2_K: the active-weighted error rises less than the plain one (a token uses half the experts)
    q8 = Config.parse("default=Q8_0")
    lo = Config.parse("default=Q8_0,moe_experts_up_gate=Q2_K,moe_experts_down=Q2_K")
    r8, rl = (F.row(type_fractions(m, resolve(m, c)), table, m.descriptors(), 8.5, fz.ref_fr) for c in (q8, lo))
    assert rl["dlwerr"] > rl["dlwerr_active"] > r8["dlwerr_active"] == pytest.approx(0)


def test_train_and_predict_on_a_moe_it_never_saw(moe, moe_data, tmp_path):
    from mqpredict.quant.resolve import resolve
    from mqpredict.surrogate.service import train

    s, meta = train(moe_data["store"], moe_data["tables"], n_estimators=80, n_jobs=1)
    s.save(tmp_path / "surr", meta)
    saved = json.loads((tmp_path / "surr" / "metadata.json").read_text())
    assert {"active_share", "lwerr_active", "share_moe_experts_down"} <= set(saved["features"])
    assert len(saved["train_families"]) == 2
    rows = json.loads(mq("predict", moe["e4g"], "-c", "Q8_0", "-c", HYBRID, "-c", "Q2_K", "--surrogate", tmp_path / "surr",
                         "--json", check=True).stdout)  # fmt: skip
    assert rows[0]["kld_pred"] < rows[1]["kld_pred"] < rows[2]["kld_pred"]
    m = ModelInfo.load(moe["e4g"])
    assert rows[1]["size_bytes"] == size_of(m, resolve(m, Config.parse(HYBRID))).size_bytes


def test_a_short_campaign_on_a_moe(moe, moe_data, corpus, tmp_path):
    """Seed → fit (the dataset without the model's family + its own records) → propose expert hybrids → confirm for real; everything recorded
    once. The campaign runs on e4s, whose presets the dataset already holds (seeds are free), over a reduced
    type set (the space is enumerated rather than searched: seconds, not minutes)."""
    import shutil

    from mqpredict.llama.inprocess import InProcessEngine
    from mqpredict.records.store import Store
    from mqpredict.workflows.campaign import Campaign, Probes, Settings

    shutil.copytree(moe_data["store"], tmp_path / "store")
    store = Store(tmp_path / "store")
    before = len(store.load())
    settings = Settings(budget=3, batch=2, probes=Probes.no, types=("Q8_0", "Q5_K", "Q4_K", "Q2_K"))
    with InProcessEngine(moe["e4s"], corpus, DATA_SPEC, threads=2) as eng:
        c = Campaign.start(eng, store, tmp_path / "out", settings, train_store=moe_data["store"],
                           train_tables=moe_data["tables"])  # fmt: skip
        res = c.run()
        # of its own family, the surrogate learnt only from this model's records (the dataset's copy is left out)
        assert {m for m, f, _ in c.surrogate_.train_models_ if f == c.ident.family} == {c.ident.model_id}
    recs = store.load()
    mine = recs[recs["provenance_file"].fillna("").str.startswith("campaign:")]
    assert 1 <= res.spent == len(mine) <= 3 and len(recs) > before
    search = mine[mine["chunk_offset"] == 0]
    assert len(search) >= 1 and search["types_key"].is_unique
    assert (search["source"] == "proposed").all() and (search["n_expert"] == 4).all()
    preds = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert {p["types_key"] for p in preds} >= set(search["types_key"])  # each was proposed with a prediction


# ------------------------------------------------------------------ a real MoE's shapes
SKELETON_CONFIGS = [
    "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K", "IQ4_XS", "MXFP4_MOE",
    "default=Q8_0,moe_experts_up_gate=Q3_K,moe_experts_down=Q4_K",
    "default=Q6_K,moe_experts_up_gate=IQ4_XS,moe_experts_down=Q5_K,embeddings=Q4_K",
    r"default=Q4_K,tensor:blk\.(0|1|47)\.ffn_down_exps=Q8_0,attn_kv=Q8_0,lm_head=Q6_K",
    "Q4_K_M,moe_experts_up_gate=Q3_K",
]  # fmt: skip


def _llama_quantize_dry_run(model: ModelInfo, config: Config, tmp_path) -> tuple[dict, float]:
    """The real llama-quantize binary's --dry-run: per-tensor types and the 'quant size' it prints (MiB)."""
    import re
    import subprocess

    from mqpredict.llama.quantize import parse_dry_run
    from mqpredict.llama.tools import find_tool
    from mqpredict.quant.resolve import quantize_command, tensor_type_lines

    tt = tmp_path / "types.txt"
    tt.write_text("\n".join(tensor_type_lines(model, config)) + "\n")
    cmd = quantize_command(model, config, "/dev/null", str(tt))
    p = subprocess.run([str(find_tool("llama-quantize")), "--dry-run", *cmd[1:]], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = (p.stdout + p.stderr).splitlines()
    mib = float(re.search(r"quant size\s*=\s*([\d.]+) MiB", p.stdout + p.stderr).group(1))
    return parse_dry_run(lines), mib


def test_qwen3_30b_a3b_skeleton_sizes_exactly(tmp_path):
    """The published shapes of Qwen3-30B-A3B (48 layers, 128 experts of which 8 active, hidden 2048, expert FFN
    768) as a sparse skeleton: presets and expert hybrids get llama-quantize's own per-tensor types (its dry run,
    the real binary) and the tensor bytes it reports — without 30 B weights on disk."""
    from mqpredict.base.skeleton import write_skeleton
    from mqpredict.llama.quantize import dry_run_types
    from mqpredict.quant.resolve import resolve

    path = write_skeleton(tmp_path / "qwen3-30b-a3b.gguf", "qwen3-30b-a3b")
    m = ModelInfo.load(path)
    assert os.stat(path).st_blocks * 512 < 1 << 20 < m.header.file_size  # a hole, not 61 GB of zeros
    assert (m.n_layers, m.n_expert, m.n_expert_used, m.n_embd) == (48, 128, 8, 2048)
    assert m.header.tensor_map["blk.7.ffn_down_exps.weight"].shape == (768, 2048, 128)
    assert 30.4e9 < m.n_params < 30.6e9 and 3.3e9 < m.n_params_active < 3.4e9  # "30B-A3B"
    sizes = {}
    for text in SKELETON_CONFIGS:
        c = Config.parse(text)
        types = resolve(m, c, dry_run_types)  # explicit configs: from the header alone
        theirs, mib = _llama_quantize_dry_run(m, c, tmp_path)
        assert types == theirs, text
        rep = size_of(m, types)
        assert abs(rep.tensor_bytes / 2**20 - mib) <= 0.005, (text, rep.tensor_bytes / 2**20, mib)
        sizes[text] = rep.size_bytes
    assert sizes["Q2_K"] < sizes["Q4_K_M"] < sizes["Q5_K_M"] < sizes["Q6_K"] < sizes["Q8_0"]
    # llama.cpp's MoE rules at full scale: MXFP4_MOE's experts are MXFP4; Q4_K_M bumps some experts' down projections
    q4 = resolve(m, Config.parse("Q4_K_M"), dry_run_types)
    assert {q4[f"blk.{i}.ffn_down_exps.weight"] for i in range(48)} == {T.Q4_K, T.Q6_K}
    mx = resolve(m, Config.parse("MXFP4_MOE"), dry_run_types)
    assert mx["blk.0.ffn_up_exps.weight"] == T.MXFP4 and mx["blk.0.attn_q.weight"] == T.Q8_0
    doc = json.loads(mq("size", path, "-c", "Q4_K_M", "--json", check=True).stdout)
    assert doc["size_bytes"] == sizes["Q4_K_M"]
    assert mq("build", path, "-c", "Q4_K_M", "-o", tmp_path / "x.gguf").returncode != 0  # no weights to build from
