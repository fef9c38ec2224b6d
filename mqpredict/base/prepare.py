"""Turn a packaged (quantized) GGUF into an F32 base for measurements, recording its origin.

``restore="dither"`` (default) places every weight at a seeded random point of its quantization bin
(:mod:`mqpredict.base.dither`); ``restore="plain"`` only dequantizes, which keeps the old grid and
makes that grid's types look artificially good — useful only to show that artefact. The base's
metadata records ``mqpredict.base.origin`` (e.g. ``dither:Q4_1+Q8_0``), the source file, its sha256
and the seed, and every report states the origin.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

import numpy as np
from gguf.constants import LlamaFileType

from mqpredict.base.dither import restore
from mqpredict.errors import InputError
from mqpredict.quant.header import read_header
from mqpredict.quant.model import KEY_FAMILY, KEY_ORIGIN, KEY_SEED, KEY_SOURCE, KEY_SOURCE_SHA, ModelInfo
from mqpredict.records.identity import family_name
from mqpredict.quant.types import T, is_quantized
from mqpredict.quant.ggufwrite import FileRange, TensorOut, copied_kvs, kv_str, kv_u32, write_gguf
from mqpredict.util.hashing import file_sha256


class Restore(StrEnum):
    DITHER = "dither"
    PLAIN = "plain"


def prepare_base(
    source: str | os.PathLike,
    out: str | os.PathLike,
    restore_mode: Restore = Restore.DITHER,
    seed: int = 0,
    source_label: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Write an F32 base restored from ``source`` to ``out`` (atomically) and return its path."""
    hdr = read_header(source)
    src = Path(source)
    quantized = [t for t in hdr.tensors if is_quantized(t.qtype) or t.qtype in (T.F16, T.BF16)]
    if not quantized:
        raise InputError(f"{src} holds no quantized or 16-bit tensors", "it is already an F32 base; use it directly")
    mix = Counter(t.qtype.name for t in quantized if is_quantized(t.qtype))
    origin = f"{restore_mode.value}:" + "+".join(name for name, _ in mix.most_common()) if mix else "upcast:F16"
    skip = {"general.file_type", KEY_ORIGIN, KEY_SOURCE, KEY_SOURCE_SHA, KEY_SEED, KEY_FAMILY}
    skip |= {k for k in hdr.kvs if k.startswith("quantize.imatrix.")}
    kvs = copied_kvs(hdr, skip) + [
        kv_u32("general.file_type", int(LlamaFileType.ALL_F32)),
        kv_str(KEY_ORIGIN, origin),
        kv_str(KEY_SOURCE, source_label or src.name),
        kv_str(KEY_SOURCE_SHA, file_sha256(src)),
        kv_u32(KEY_SEED, seed),
        kv_str(KEY_FAMILY, family_name(ModelInfo(hdr))),
    ]
    raw = np.memmap(src, dtype=np.uint8, mode="r")
    done = [0]

    def loader(t):
        def load() -> np.ndarray:
            start = hdr.data_offset + t.offset
            data = raw[start : start + t.nbytes]
            if t.qtype == T.F16:
                w = data.view(np.float16).astype(np.float32)
            elif t.qtype == T.BF16:
                w = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                w = restore(data, t.qtype, t.shape, t.name, seed, restore_mode == Restore.DITHER)
            done[0] += 1
            if progress:
                progress("restore base", done[0], len(quantized))
            return w.astype(np.float32, copy=False)

        return load

    restored = {t.name for t in quantized}
    tensors = []
    for t in hdr.tensors:
        if t.name in restored:
            tensors.append(TensorOut(t.name, t.shape, T.F32, loader(t)))
        else:
            tensors.append(TensorOut(t.name, t.shape, t.qtype, FileRange(src, hdr.data_offset + t.offset)))
    return write_gguf(out, kvs, tensors, hdr.alignment)
