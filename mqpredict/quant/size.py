"""Exact file size of a config, computed from the base's header before anything is built.

The file llama.cpp writes (and the stitcher writes, byte for byte the same) is::

    the base's metadata, with general.quantization_version and general.file_type re-set as u32
    (moved to the end), the split.* keys removed and, with an imatrix, its four quantize.imatrix.* keys
    appended  |  the tensor infos  |  padding to the alignment  |  each tensor's data, padded

so its size follows from the base's header and the effective types alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mqpredict.quant.header import pad, tensor_nbytes
from mqpredict.quant.imatrix import Imatrix
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.types import QuantType

#: keys llama-quantize (re)sets as u32 on every output file
SET_U32_KEYS = ("general.quantization_version", "general.file_type")
#: keys llama-quantize removes from a single-file output
REMOVED_KEYS = ("split.no", "split.count", "split.tensors.count")


@dataclass(frozen=True)
class TensorSize:
    name: str
    group: str | None  # None: fixed (never quantized)
    qtype: QuantType
    nbytes: int


@dataclass(frozen=True)
class SizeReport:
    size_bytes: int  # the whole file
    tensor_bytes: int  # tensor data without padding
    n_params: int
    tensors: tuple[TensorSize, ...]

    @property
    def bpw(self) -> float:
        """Bits per weight as llama.cpp reports it (tensor data bytes × 8 / parameters)."""
        return 8.0 * self.tensor_bytes / max(self.n_params, 1)

    def to_json(self) -> dict:
        return {
            "size_bytes": self.size_bytes,
            "bpw": self.bpw,
            "tensor_bytes": self.tensor_bytes,
            "n_params": self.n_params,
            "tensors": [
                {"name": t.name, "group": t.group, "type": t.qtype.name, "bytes": t.nbytes} for t in self.tensors
            ],
        }


def _kv_entry_size(key: str, value_size: int) -> int:
    return 8 + len(key.encode()) + 4 + value_size


def appended_keys(imatrix: Imatrix | None) -> tuple[str, ...]:
    """Keys llama-quantize (re)sets at the end of every file it writes (existing copies are removed)."""
    return SET_U32_KEYS + (tuple(k for k, _ in imatrix.output_kvs()) if imatrix is not None else ())


def output_kv_bytes(model: ModelInfo, imatrix: Imatrix | None = None) -> int:
    """Size of the metadata section of any file llama-quantize writes from ``model`` (with ``imatrix``)."""
    hdr = model.header
    n = hdr.kv_span[1] - hdr.kv_span[0]
    for key in {*appended_keys(imatrix), *REMOVED_KEYS}:
        kv = hdr.kvs.get(key)
        if kv is not None:
            n -= kv.span[1] - kv.span[0]
    n += sum(_kv_entry_size(k, 4) for k in SET_U32_KEYS)
    for key, value in imatrix.output_kvs() if imatrix is not None else ():
        n += _kv_entry_size(key, 8 + len(value.encode()) if isinstance(value, str) else 4)
    return n


def header_size(model: ModelInfo, imatrix: Imatrix | None = None) -> int:
    """Header bytes (up to the data section, padding included) of a file built from ``model``."""
    infos = sum(t.info_size() for t in model.tensors)
    return pad(24 + output_kv_bytes(model, imatrix) + infos, model.header.alignment)


def size_of(model: ModelInfo, types: Mapping[str, QuantType], imatrix: Imatrix | None = None) -> SizeReport:
    """Exact size of the file with these effective types (every tensor of ``model`` must be typed),
    quantized with ``imatrix`` (whose identity llama-quantize writes into the file) or without."""
    align = model.header.alignment
    rows, data = [], 0
    for t in model.tensors:
        qt = types[t.name]
        nb = tensor_nbytes(t.shape, qt)
        rows.append(TensorSize(t.name, model.group_map[t.name], qt, nb))
        data += pad(nb, align)
    return SizeReport(
        size_bytes=header_size(model, imatrix) + data,
        tensor_bytes=sum(r.nbytes for r in rows),
        n_params=model.n_params,
        tensors=tuple(rows),
    )
