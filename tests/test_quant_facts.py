"""Quant facts against llama.cpp itself: fallbacks, quantizability, preset resolution, group mapping."""

from __future__ import annotations

import pytest

from mqpredict.quant.config import Config
from mqpredict.quant.groups import group_of, is_quantizable, stem
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.resolve import resolve
from mqpredict.quant.types import FALLBACK, IMATRIX_TYPES, TARGET_TYPES, T, bpw, effective_type


def test_type_table_comes_from_gguf():
    assert bpw(T.Q8_0) == 8.5
    assert bpw(T.Q4_K) == 4.5
    assert bpw(T.Q6_K) == pytest.approx(6.5625)
    assert bpw(T.IQ4_XS) == 4.25
    assert bpw(T.F16) == 16


def test_fallback_rules():
    assert effective_type(T.Q4_K, 576) == T.Q5_0
    assert effective_type(T.Q5_K, 576) == T.Q5_1
    assert effective_type(T.Q6_K, 576) == T.Q8_0
    assert effective_type(T.Q3_K, 576) == T.Q4_0
    assert effective_type(T.Q2_K, 576) == T.Q4_0
    assert effective_type(T.IQ4_XS, 576) == T.IQ4_NL
    assert effective_type(T.Q4_K, 1536) == T.Q4_K
    assert effective_type(T.Q8_0, 48) == T.F16  # a 32-block type that does not fit either
    assert effective_type(T.Q4_K, 48) == T.F16  # falls back to Q5_0, which does not fit 48 either


@pytest.mark.parametrize("qtype", [t for t in TARGET_TYPES if t not in IMATRIX_TYPES], ids=lambda t: t.name)
def test_pure_types_match_llama_dry_run(any_tiny, qtype):
    """Python's resolution of a pure config equals what llama.cpp's own dry run decides, tensor for tensor."""
    from mqpredict.llama.quantize import dry_run_types

    m = ModelInfo.load(any_tiny)
    cfg = Config.pure(qtype)
    assert resolve(m, cfg) == dry_run_types(m, cfg)


def test_hybrids_and_overrides_match_llama_dry_run(any_tiny):
    from mqpredict.llama.quantize import dry_run_types

    m = ModelInfo.load(any_tiny)
    for text in ("default=Q4_K,ffn_down=Q6_K,embeddings=Q8_0", r"default=IQ4_XS,tensor:blk\.[01]\.=Q8_0,attn_kv=Q3_K",
                 "default=F16,ffn_down=Q4_K,attn_q=Q2_K"):  # fmt: skip
        cfg = Config.parse(text)
        assert resolve(m, cfg) == dry_run_types(m, cfg), text


def test_fallbacks_exercised_on_576_wide(tiny576):
    m = ModelInfo.load(tiny576)
    types = resolve(m, Config.parse("default=Q4_K,ffn_down=Q6_K"))
    assert types["blk.0.ffn_down.weight"] == T.Q6_K  # row length n_ff = 1536
    assert types["blk.0.attn_q.weight"] == T.Q5_0  # row length 576: Q4_K falls back
    assert types["token_embd.weight"] == T.Q5_0
    assert set(FALLBACK) >= {T.Q4_K, T.Q5_K, T.Q6_K}


def test_quantizable_tensors_are_what_llama_quantizes(any_tiny):
    """Fixed tensors keep their type under every pure preset; assignable ones change under Q8_0."""
    from mqpredict.llama.quantize import dry_run_types

    m = ModelInfo.load(any_tiny)
    q8 = dry_run_types(m, Config.pure(T.Q8_0))
    for t in m.tensors:
        assert (q8[t.name] != t.qtype) == (m.group_map[t.name] is not None), t.name


def test_presets_resolved_by_llama_differ_from_pure(tiny):
    from mqpredict.llama.quantize import dry_run_types

    m = ModelInfo.load(tiny)
    q4km = resolve(m, Config.parse("Q4_K_M"), dry_run_types)
    assert q4km["output.weight"] == T.Q6_K  # llama.cpp's own rule for the output tensor
    assert sum(v == T.Q6_K for v in q4km.values()) > 1
    assert resolve(m, Config.parse("Q4_K"), dry_run_types) == q4km  # llama-quantize's alias


@pytest.mark.parametrize(
    "name,dims,group",
    [
        ("token_embd.weight", 2, "embeddings"),
        ("output.weight", 2, "lm_head"),
        ("blk.3.attn_q.weight", 2, "attn_q"),
        ("blk.3.attn_k.weight", 2, "attn_kv"),
        ("blk.3.attn_v.weight", 2, "attn_kv"),
        ("blk.3.attn_output.weight", 2, "attn_output"),
        ("blk.3.ffn_gate.weight", 2, "ffn_up_gate"),
        ("blk.3.ffn_up.weight", 2, "ffn_up_gate"),
        ("blk.3.ffn_down.weight", 2, "ffn_down"),
        ("blk.3.ffn_down_exps.weight", 3, "moe_experts_down"),
        ("blk.3.ffn_gate_exps.weight", 3, "moe_experts_up_gate"),
        ("blk.3.ffn_up_exps.weight", 3, "moe_experts_up_gate"),
        ("blk.3.ffn_gate_up_exps.weight", 3, "moe_experts_up_gate"),
        ("blk.3.ffn_up_shexp.weight", 2, "moe_shexp"),
        ("blk.3.ssm_in.weight", 2, "ssm"),
        ("blk.3.ssm_out.weight", 2, "ssm"),
        ("blk.7.attn_q_a.weight", 2, "attn_q_a"),  # dynamic group (DeepSeek MLA)
        ("blk.7.attn_kv_a_mqa.weight", 2, "attn_kv_a_mqa"),
        ("per_layer_token_embd.weight", 2, "per_layer_token_embd"),
        # fixed: llama.cpp never quantizes these
        ("blk.3.attn_norm.weight", 1, None),
        ("blk.3.attn_q_norm.weight", 1, None),
        ("blk.3.attn_q.bias", 1, None),
        ("blk.3.ffn_gate_inp.weight", 2, None),
        ("blk.3.ffn_gate_inp_shexp.weight", 1, None),
        ("blk.3.ssm_conv1d.weight", 2, None),
        ("blk.3.ssm_a", 2, None),
        ("output_norm.weight", 1, None),
        ("position_embd.weight", 2, None),
    ],
)
def test_group_names(name, dims, group):
    assert group_of(name, dims) == group
    assert is_quantizable(name, dims) == (group is not None)


def test_stem_strips_layer_and_suffix():
    assert stem("blk.12.attn_q_a.weight") == "attn_q_a"
    assert stem("token_embd.weight") == "token_embd"
