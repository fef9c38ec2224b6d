"""Restore plausible full-precision weights from a quantized tensor by seeded in-bin dithering.

A plainly dequantized tensor sits exactly on its old quantization grid, so re-quantizing it to that
grid (or one aligned with it) is nearly free and makes those types look far better than they are.
Dithering moves each weight to a uniformly random point of its own quantization bin,
``w + U(-step/2, +step/2)``, where ``step`` is the spacing of the grid at that weight: the block
scale ``d`` for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, the sub-block's effective scale for the K-quants. The
result quantizes back to the same codes (it is a plausible original) but no longer sits on the grid.

Block layouts follow gguf-py's dequantizers (``gguf.quants``).
"""

from __future__ import annotations

import zlib

import numpy as np
from gguf.quants import Q4_K, dequantize

from mqpredict.errors import InputError
from mqpredict.quant.types import QuantType, T, block_size, bytes_per_block

QK_K = 256


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32).reshape(-1, 1)


def _legacy(blocks: np.ndarray) -> np.ndarray:
    """Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: one scale d (the block's first f16) for 32 weights."""
    return np.repeat(np.abs(_f16(blocks, 0)), 32, axis=1)


def _q2_k(blocks: np.ndarray) -> np.ndarray:
    scales = blocks[:, :16]
    d = _f16(blocks, 16 + 64)
    return np.repeat(np.abs(d * (scales & 0xF).astype(np.float32)), 16, axis=1)


def _q3_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    scales = blocks[:, 32 + 64 : 32 + 64 + 12]
    d = _f16(blocks, 32 + 64 + 12)
    lsc, hsc = scales[:, :8], scales[:, 8:]
    lsc = (lsc.reshape(n, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)).reshape(n, 16)
    hsc = (hsc.reshape(n, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)).reshape(n, 16)
    sc = ((lsc & 0x0F) | ((hsc & 0x03) << 4)).astype(np.int8) - np.int8(32)
    return np.repeat(np.abs(d * sc.astype(np.float32)), 16, axis=1)


def _q4_q5_k(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks, 0)
    sc, _ = Q4_K.get_scale_min(blocks[:, 4:16])
    return np.repeat(np.abs(d * sc.reshape(blocks.shape[0], 8).astype(np.float32)), 32, axis=1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    scales = blocks[:, 128 + 64 : 128 + 64 + 16].copy().view(np.int8).astype(np.float32)
    d = _f16(blocks, 128 + 64 + 16)
    return np.repeat(np.abs(d * scales), 16, axis=1)


_STEP = {
    T.Q4_0: _legacy, T.Q4_1: _legacy, T.Q5_0: _legacy, T.Q5_1: _legacy, T.Q8_0: _legacy,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_q5_k, T.Q5_K: _q4_q5_k, T.Q6_K: _q6_k,
}  # fmt: skip

DITHERABLE = frozenset(_STEP)


def bin_steps(raw: np.ndarray, qtype: QuantType) -> np.ndarray:
    """Grid spacing at each weight of a quantized tensor (flat, float32)."""
    if qtype not in _STEP:
        supported = ", ".join(t.name for t in _STEP)
        raise InputError(
            f"in-bin dithering is not defined for {qtype.name} (a non-uniform grid)",
            f"use --restore plain, or a source in {supported}",
        )
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, bytes_per_block(qtype))
    return _STEP[qtype](blocks).reshape(-1)


def restore(raw: np.ndarray, qtype: QuantType, shape: tuple[int, ...], name: str, seed: int, dither: bool) -> np.ndarray:
    """F32 weights (numpy shape = reversed ggml shape) from the raw bytes of a quantized tensor."""
    w = dequantize(np.ascontiguousarray(raw, dtype=np.uint8), qtype).astype(np.float32).reshape(-1)
    if dither:
        assert block_size(qtype) > 1
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        u = rng.random(w.size, dtype=np.float32) - np.float32(0.5)
        w += u * bin_steps(raw, qtype)
    return w.reshape(tuple(reversed(shape)))
