"""Skeleton GGUFs: a real model's published shapes with no weights, for exact sizes at full scale.

A skeleton is what the converter would write for the model (architecture, hyper-parameters, every
tensor's name, shape and type — BF16 weights, F32 norms and routers, as ``convert_hf_to_gguf.py`` keeps
them) with the data section left as a hole: the file is sparse, its apparent size is the model's (61 GB
for Qwen3-30B-A3B) and it takes a few hundred kilobytes of disk. Everything that needs only the header
works on it — ``inspect``, ``size`` (explicit configs from the header, presets by llama.cpp's own dry
run, which never reads tensor data) — so sizes and effective types can be checked against llama.cpp at
the scale of a real mixture of experts (128 experts, 8 used, 48 layers) without its 30 B weights.
Building or measuring a skeleton is refused: it has no weights (base origin ``skeleton``).

It has no tokenizer: its metadata section is smaller than the published GGUF's by the vocabulary, so its
file sizes are exact for this file, not for the published one (the tensor data bytes are the same).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mqpredict.errors import InputError
from mqpredict.quant.header import DEFAULT_ALIGNMENT, pad, tensor_nbytes
from mqpredict.quant.model import KEY_FAMILY, KEY_ORIGIN, KEY_SOURCE
from mqpredict.quant.types import T
from mqpredict.util.atomic import atomic_path

ORIGIN = "skeleton"


@dataclass(frozen=True)
class PublishedShape:
    """A mixture of experts' shapes as its published config gives them (Hugging Face ``config.json``)."""

    name: str
    arch: str
    source: str  # where the figures come from
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int  # the dense FFN width the config names (unused by an all-MoE model, but in its GGUF)
    n_ff_exp: int  # each routed expert's FFN width
    n_expert: int
    n_expert_used: int
    n_vocab: int
    context_length: int
    rope_theta: float
    rms_eps: float
    tied: bool = False


#: Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B, config.json): 48 layers, hidden 2048, 32 query heads and 4 KV heads
#: of 128, 128 experts of FFN width 768 with 8 used per token, vocabulary 151,936, untied embeddings.
QWEN3_30B_A3B = PublishedShape(
    name="Qwen3-30B-A3B", arch="qwen3moe", source="https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json",
    n_layers=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_ff=6144, n_ff_exp=768, n_expert=128,
    n_expert_used=8, n_vocab=151936, context_length=40960, rope_theta=1e6, rms_eps=1e-6,
)  # fmt: skip

SKELETONS: dict[str, PublishedShape] = {"qwen3-30b-a3b": QWEN3_30B_A3B}


def tensor_shapes(s: PublishedShape) -> list[tuple[str, tuple[int, ...], T]]:
    """(name, shape in ggml order — ne[0] first —, type) of every tensor, in the converter's order."""
    if s.arch != "qwen3moe":
        raise ValueError(f"no tensor layout for {s.arch}")
    d, q, kv = s.n_embd, s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    out: list[tuple[str, tuple[int, ...], T]] = [("token_embd.weight", (d, s.n_vocab), T.BF16)]
    for i in range(s.n_layers):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", (d,), T.F32),
            (p + "attn_q.weight", (d, q), T.BF16),
            (p + "attn_k.weight", (d, kv), T.BF16),
            (p + "attn_v.weight", (d, kv), T.BF16),
            (p + "attn_output.weight", (q, d), T.BF16),
            (p + "attn_k_norm.weight", (s.head_dim,), T.F32),
            (p + "attn_q_norm.weight", (s.head_dim,), T.F32),
            (p + "ffn_norm.weight", (d,), T.F32),
            (p + "ffn_gate_inp.weight", (d, s.n_expert), T.F32),  # the router stays F32, as converted
            (p + "ffn_gate_exps.weight", (d, s.n_ff_exp, s.n_expert), T.BF16),
            (p + "ffn_down_exps.weight", (s.n_ff_exp, d, s.n_expert), T.BF16),
            (p + "ffn_up_exps.weight", (d, s.n_ff_exp, s.n_expert), T.BF16),
        ]
    out.append(("output_norm.weight", (d,), T.F32))
    if not s.tied:
        out.append(("output.weight", (d, s.n_vocab), T.BF16))
    return out


def write_skeleton(path: str | os.PathLike, shape: PublishedShape | str) -> Path:
    """Write the sparse skeleton of ``shape`` (a :class:`PublishedShape` or a name in :data:`SKELETONS`)."""
    import gguf

    if isinstance(shape, str):
        if shape not in SKELETONS:
            raise InputError(f"no published shapes for {shape!r}", f"known: {', '.join(SKELETONS)}")
        shape = SKELETONS[shape]
    path = Path(path)
    tensors = tensor_shapes(shape)
    with atomic_path(path) as tmp:
        wr = gguf.GGUFWriter(str(tmp), arch=shape.arch)
        wr.add_name(f"{shape.name} (skeleton: published shapes, no weights)")
        wr.add_description(f"sparse skeleton written by `mqpredict base skeleton` from {shape.source}")
        wr.add_string(KEY_ORIGIN, ORIGIN)
        wr.add_string(KEY_SOURCE, shape.source)
        wr.add_string(KEY_FAMILY, shape.name.lower())
        wr.add_context_length(shape.context_length)
        wr.add_embedding_length(shape.n_embd)
        wr.add_block_count(shape.n_layers)
        wr.add_feed_forward_length(shape.n_ff)
        wr.add_head_count(shape.n_head)
        wr.add_head_count_kv(shape.n_head_kv)
        wr.add_key_length(shape.head_dim)
        wr.add_value_length(shape.head_dim)
        wr.add_rope_freq_base(shape.rope_theta)
        wr.add_layer_norm_rms_eps(shape.rms_eps)
        wr.add_expert_count(shape.n_expert)
        wr.add_expert_used_count(shape.n_expert_used)
        wr.add_expert_feed_forward_length(shape.n_ff_exp)
        wr.add_vocab_size(shape.n_vocab)
        wr.add_file_type(int(gguf.LlamaFileType.MOSTLY_BF16))
        data = 0
        for name, ne, qt in tensors:
            nb = tensor_nbytes(ne, qt)
            # gguf-py takes numpy order (ne reversed) and the byte count; the dtype only labels the type
            wr.add_tensor_info(name, tuple(reversed(ne)), np.dtype(np.float32 if qt == T.F32 else np.uint16), nb, raw_dtype=qt)
            data += pad(nb, DEFAULT_ALIGNMENT)
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_ti_data_to_file()
        wr.close()
        with open(tmp, "r+b") as f:  # the data section: a hole of the right length
            f.truncate(pad(os.path.getsize(tmp), DEFAULT_ALIGNMENT) + data)
    return path
