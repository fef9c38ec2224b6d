"""Assemble a hybrid GGUF from the tensor bytes of pure quantizations of the same base.

Quantizing a tensor to a type is deterministic and independent of every other tensor, so the
bytes of tensor X at type E are the same in any file llama.cpp writes with X at E — in particular in
the *pure* E quantization of the base. A hybrid is therefore a copy job: the base's metadata (edited
exactly as llama-quantize edits it, see :mod:`mqpredict.quant.size`), fresh tensor infos, and each
tensor's bytes copied (kernel-side, ``copy_file_range``) from the pure file that holds it. The result
is byte-identical to ``llama-quantize --pure --tensor-type-file …`` for the same effective types.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from mqpredict.errors import InputError
from mqpredict.quant.header import GGUFHeader
from mqpredict.quant.imatrix import Imatrix
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.size import REMOVED_KEYS, appended_keys
from mqpredict.quant.types import QuantType
from mqpredict.quant.ggufwrite import FileRange, TensorOut, copied_kvs, kv_str, kv_u32, write_gguf

GGML_QNT_VERSION = 2


def index_sources(headers: list[GGUFHeader]) -> dict[tuple[str, QuantType], FileRange]:
    """(tensor name, type) → where those bytes are, over a set of files of the same base."""
    out: dict[tuple[str, QuantType], FileRange] = {}
    for h in headers:
        for t in h.tensors:
            out.setdefault((t.name, t.qtype), FileRange(h.path, h.data_offset + t.offset))
    return out


def output_kvs(base: GGUFHeader, file_type: int, imatrix: Imatrix | None = None) -> list[bytes]:
    """Metadata entries as llama-quantize writes them for ``base`` (set keys move to the end, then the
    imatrix's keys as llama-quantize's overrides append them)."""
    kvs = copied_kvs(base, (*appended_keys(imatrix), *REMOVED_KEYS))
    kvs += [kv_u32("general.quantization_version", GGML_QNT_VERSION), kv_u32("general.file_type", file_type)]
    for key, value in imatrix.output_kvs() if imatrix is not None else ():
        kvs.append(kv_str(key, value) if isinstance(value, str) else kv_u32(key, value))
    return kvs


def stitch(
    model: ModelInfo,
    types: Mapping[str, QuantType],
    sources: Mapping[tuple[str, QuantType], FileRange],
    order: list[str],
    file_type: int,
    out: str | os.PathLike,
    imatrix: Imatrix | None = None,
) -> Path:
    """Write the hybrid with effective ``types`` to ``out`` (atomically); tensors in ``order``.

    ``order`` is llama.cpp's output order (take it from any file llama.cpp wrote from this base).
    Tensors whose type equals the base's are copied from the base.
    """
    base = model.header
    tensors = []
    for name in order:
        t = base.tensor_map[name]
        qt = types[name]
        src = FileRange(base.path, base.data_offset + t.offset) if qt == t.qtype else sources.get((name, qt))
        if src is None:
            raise InputError(f"no source for tensor {name} at type {qt.name}", "build the pure quantization first")
        tensors.append(TensorOut(name, t.shape, qt, src))
    return write_gguf(out, output_kvs(base, file_type, imatrix), tensors, base.alignment)
