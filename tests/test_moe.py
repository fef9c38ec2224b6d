"""Mixture-of-experts models end to end, on tiny MoE GGUFs llama.cpp runs as such: expert groups, exact
sizes and effective types (3-D tensors, llama.cpp's MoE rules) against the real llama-quantize, stitched
builds byte-identical to it, real KLD by both engines, seed/campaign/predict, and a real MoE's shapes."""

from __future__ import annotations

import hashlib
import json

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
