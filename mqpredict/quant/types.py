"""Quant-type facts: sizes from gguf's table, and the rules llama.cpp applies per tensor.

A quant type is always a :class:`gguf.GGMLQuantizationType` inside mqpredict; strings only exist at
the edges (CLI, files) and go through :func:`parse_type`. Block size and bytes per block come from
``gguf.GGML_QUANT_SIZES``; nothing here is a magic number except the fallback table, which is
transcribed from ``tensor_type_fallback`` in llama.cpp's ``src/llama-quant.cpp`` at the pinned commit
(0c1e570, llama-cpp-python 0.3.36) and checked against llama.cpp's own dry run by the tests.
"""

from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from mqpredict.errors import InputError

QuantType = GGMLQuantizationType
T = GGMLQuantizationType

#: Types llama.cpp can write when quantizing a model (internal/integer types excluded).
TARGET_TYPES: tuple[QuantType, ...] = (
    T.F32, T.F16, T.BF16,
    T.Q8_0, T.Q6_K, T.Q5_K, T.Q5_1, T.Q5_0, T.Q4_K, T.Q4_1, T.Q4_0,
    T.IQ4_NL, T.IQ4_XS, T.MXFP4, T.Q3_K, T.IQ3_S, T.IQ3_XXS, T.Q2_K,
    T.IQ2_S, T.IQ2_XS, T.IQ2_XXS, T.TQ2_0, T.TQ1_0, T.IQ1_M, T.IQ1_S,
)  # fmt: skip

#: Types that llama.cpp refuses to write without an importance matrix (tensor_requires_imatrix);
#: token_embd/output are exempt there. Q2_K needs one only inside a Q2_K_S preset.
IMATRIX_TYPES: frozenset[QuantType] = frozenset({T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S})
#: Types ggml cannot quantize at all without weights for the tensor (ggml_quantize_requires_imatrix: it
#: aborts the process) — so not even token_embd/output may take them unless the imatrix covers them.
WEIGHTS_REQUIRED: frozenset[QuantType] = frozenset({T.IQ2_XXS, T.IQ2_XS, T.IQ1_S})

#: llama.cpp's replacement when a row length is not a multiple of the type's block size.
FALLBACK: dict[QuantType, QuantType] = {
    T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}  # fmt: skip


def block_size(t: QuantType) -> int:
    return GGML_QUANT_SIZES[t][0]


def bytes_per_block(t: QuantType) -> int:
    return GGML_QUANT_SIZES[t][1]


def bpw(t: QuantType) -> float:
    """Bits per weight of type ``t`` (block scales included)."""
    b, s = GGML_QUANT_SIZES[t]
    return 8.0 * s / b


def is_quantized(t: QuantType) -> bool:
    """True for block-quantized types (ggml_is_quantized): every type stored in blocks of > 1."""
    return GGML_QUANT_SIZES[t][0] > 1


def type_name(t: QuantType) -> str:
    return t.name


def parse_type(text: str, *, where: str = "") -> QuantType:
    """``"q4_k"``/``"Q4_K"`` → ``GGMLQuantizationType.Q4_K``; unknown names list the valid ones.

    ``where`` says where the name was found (e.g. "for ffn_down in 'default=Q4_K,ffn_down=Q9'").
    """
    name = text.strip().upper()
    try:
        t = GGMLQuantizationType[name]
    except KeyError:
        t = None
    if t is None or t not in TARGET_TYPES:
        valid = ", ".join(x.name for x in TARGET_TYPES)
        raise InputError(f"unknown quant type {text.strip()!r}{' ' + where if where else ''}", f"valid types: {valid}")
    return t


class NoFallback(Exception):
    """llama.cpp has no fallback for this type at this row length (it aborts the quantization)."""


def effective_type(requested: QuantType, row_length: int) -> QuantType:
    """The type llama.cpp actually writes for a tensor with rows of ``row_length`` elements.

    Mirrors ``tensor_type_fallback``: if the row length is not a multiple of the block size, a
    256-block type falls back to a 32-block type; if that still does not fit, F16.
    """
    blk = block_size(requested)
    if row_length % blk == 0:
        return requested
    if requested in FALLBACK:
        out = FALLBACK[requested]
    elif blk <= 32:
        out = requested
    else:
        raise NoFallback(requested)
    if row_length % block_size(out) != 0:
        out = T.F16
    return out
