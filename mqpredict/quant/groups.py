"""Tensor name → tensor group, and which tensors llama.cpp quantizes at all.

A **tensor group** is a family of tensors that a config gives one quant type. The standard groups
cover llama-family, Qwen2/3, Gemma 2/3, MoE and SSM models; any other
quantizable tensor gets a **dynamic group** named after it with the layer index and ``.weight``
stripped (``blk.7.attn_q_a.weight`` → ``attn_q_a``), so an unlisted architecture still works.

Tensors llama.cpp never quantizes (1-D norms and biases, ``ffn_gate_inp``, ``ssm_conv1d`` …) are
**fixed**: they belong to no group and keep their type. The rule is ``tensor_allows_quantization``
from llama.cpp's ``src/llama-quant.cpp`` (pinned commit), checked against llama.cpp's dry run by
the tests.

Mixture-of-experts models get three groups: the routed experts' up/gate projections
(``ffn_{up,gate,gate_up}_exps`` → ``moe_experts_up_gate``) and their down projections (``ffn_down_exps``
→ ``moe_experts_down``) — apart, as every published MoE recipe treats them, since their sensitivity
differs — and the shared experts (``ffn_*_shexp`` → ``moe_shexp``). The router (``ffn_gate_inp``) and a
shared expert's gate (``ffn_gate_inp_shexp``, 1-D) are fixed: llama.cpp never quantizes them.
"""

from __future__ import annotations

import re
from enum import StrEnum


class StandardGroup(StrEnum):
    EMBEDDINGS = "embeddings"
    LM_HEAD = "lm_head"
    ATTN_Q = "attn_q"
    ATTN_KV = "attn_kv"
    ATTN_OUTPUT = "attn_output"
    FFN_UP_GATE = "ffn_up_gate"
    FFN_DOWN = "ffn_down"
    MOE_EXPERTS_UP_GATE = "moe_experts_up_gate"
    MOE_EXPERTS_DOWN = "moe_experts_down"
    MOE_SHEXP = "moe_shexp"
    SSM = "ssm"


STANDARD_GROUPS: tuple[str, ...] = tuple(g.value for g in StandardGroup)

#: the stem (name without layer prefix and ``.weight``) → standard group
_STEM_GROUP: dict[str, StandardGroup] = {
    "token_embd": StandardGroup.EMBEDDINGS,
    "output": StandardGroup.LM_HEAD,
    "attn_q": StandardGroup.ATTN_Q,
    "attn_k": StandardGroup.ATTN_KV,
    "attn_v": StandardGroup.ATTN_KV,
    "attn_output": StandardGroup.ATTN_OUTPUT,
    "ffn_up": StandardGroup.FFN_UP_GATE,
    "ffn_gate": StandardGroup.FFN_UP_GATE,
    "ffn_down": StandardGroup.FFN_DOWN,
    "ffn_up_exps": StandardGroup.MOE_EXPERTS_UP_GATE,
    "ffn_gate_exps": StandardGroup.MOE_EXPERTS_UP_GATE,
    "ffn_gate_up_exps": StandardGroup.MOE_EXPERTS_UP_GATE,
    "ffn_down_exps": StandardGroup.MOE_EXPERTS_DOWN,
    "ffn_up_shexp": StandardGroup.MOE_SHEXP,
    "ffn_gate_shexp": StandardGroup.MOE_SHEXP,
    "ffn_down_shexp": StandardGroup.MOE_SHEXP,
}

_LAYER = re.compile(r"(^|\.)blk\.(\d+)\.")
_GROUP_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

# Substrings/names that llama.cpp never quantizes (tensor_allows_quantization, general rules).
_NEVER_SUBSTR = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)  # fmt: skip
_NEVER_NAMES = frozenset({"position_embd.weight", "token_types.weight"})


def is_quantizable(name: str, n_dims: int) -> bool:
    """Whether llama.cpp's quantizer may change this tensor's type (else it is fixed)."""
    if n_dims < 2 or not name.endswith("weight") or name in _NEVER_NAMES:
        return False
    return not any(s in name for s in _NEVER_SUBSTR)


def layer_of(name: str) -> int | None:
    """The block index of ``blk.N.…`` tensors, else None."""
    m = _LAYER.search(name)
    return int(m.group(2)) if m else None


def stem(name: str) -> str:
    """``blk.7.attn_q_a.weight`` → ``attn_q_a``; ``token_embd.weight`` → ``token_embd``."""
    s = _LAYER.sub(r"\1", name)
    if s.endswith(".weight"):
        s = s[: -len(".weight")]
    return s


def group_of(name: str, n_dims: int) -> str | None:
    """The tensor group of a tensor, or None when llama.cpp never quantizes it (fixed)."""
    if not is_quantizable(name, n_dims):
        return None
    s = stem(name)
    if s in _STEM_GROUP:
        return _STEM_GROUP[s].value
    if s.startswith("ssm_"):
        return StandardGroup.SSM.value
    dynamic = re.sub(r"[^a-z0-9_]+", "_", s.lower()).strip("_")
    return dynamic if _GROUP_NAME.match(dynamic) else f"t_{dynamic}"


def is_routed_expert(name: str) -> bool:
    """Whether a tensor holds routed experts (llama.cpp's ``*_exps`` tensors: one slice per expert, of
    which a token uses ``expert_used_count``)."""
    return stem(name).endswith("_exps")


def is_group_name(text: str) -> bool:
    """Whether ``text`` can name a group (standard or dynamic): a lower-case identifier."""
    return bool(_GROUP_NAME.match(text))
