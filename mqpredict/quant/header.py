"""Read a GGUF file's header (metadata + tensor infos) without touching tensor data.

The header is parsed from a memory map, so only the pages that hold the header are read: a 100 GB
file costs the same as a 100 MB one. Every value keeps its byte span so that writers can copy the
metadata verbatim (see :mod:`mqpredict.llama.stitch`), and the file is checked for truncation
against the tensor infos before anyone relies on it.

Layout (GGUF v2/v3, little endian)::

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv     × (string key | u32 value type | value)
    n_tensors× (string name | u32 n_dims | u64 ne[n_dims] | u32 ggml type | u64 offset)
    padding to `general.alignment` (default 32) | tensor data, each tensor padded to the alignment
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from mqpredict.errors import GGUFError, InputError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

_SCALAR = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {
    GGUFValueType.UINT8: np.uint8,
    GGUFValueType.INT8: np.int8,
    GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16,
    GGUFValueType.UINT32: np.uint32,
    GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32,
    GGUFValueType.BOOL: np.bool_,
    GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT64: np.float64,
}


def pad(n: int, alignment: int) -> int:
    """``n`` rounded up to a multiple of ``alignment`` (GGML_PAD)."""
    return (n + alignment - 1) // alignment * alignment


def tensor_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    """Bytes of a tensor of ``shape`` (ggml order, ne[0] = row length) stored as ``qtype``."""
    block, size = GGML_QUANT_SIZES[qtype]
    n_rows = 1
    for d in shape[1:]:
        n_rows *= d
    return shape[0] // block * size * n_rows


@dataclass(frozen=True)
class KV:
    """One metadata entry; ``span`` is the byte range of the whole entry (key included)."""

    key: str
    vtype: GGUFValueType
    span: tuple[int, int]
    value: Any = None  # scalars and strings; arrays are read on demand (GGUFHeader.array)
    item_type: GGUFValueType | None = None  # arrays only
    count: int = 0  # arrays only
    data_span: tuple[int, int] = (0, 0)  # arrays only: the elements


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it; ``offset`` is relative to the data section."""

    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length (ne[0])
    qtype: GGMLQuantizationType
    offset: int

    @property
    def n_dims(self) -> int:
        return len(self.shape)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)

    def info_size(self) -> int:
        """Bytes this tensor's entry takes in a header."""
        return 8 + len(self.name.encode()) + 4 + 8 * self.n_dims + 4 + 8


@dataclass(frozen=True)
class GGUFHeader:
    """The parsed header of one GGUF file."""

    path: Path
    version: int
    kvs: dict[str, KV]
    tensors: tuple[TensorInfo, ...]
    kv_span: tuple[int, int]
    data_offset: int
    file_size: int
    _raw: bytes = field(repr=False, compare=False, default=b"")

    @property
    def alignment(self) -> int:
        kv = self.kvs.get("general.alignment")
        return int(kv.value) if kv is not None else DEFAULT_ALIGNMENT

    def get(self, key: str, default: Any = None) -> Any:
        kv = self.kvs.get(key)
        if kv is None:
            return default
        if kv.vtype == GGUFValueType.ARRAY:
            return self.array(key)
        return kv.value

    def raw(self, span: tuple[int, int]) -> bytes:
        """Bytes of the header between file offsets ``span`` (only header spans are held)."""
        return self._raw[span[0] : span[1]]

    def array(self, key: str) -> list | np.ndarray:
        """A metadata array: numpy for numbers, a list of str for strings."""
        kv = self.kvs[key]
        data = self.raw(kv.data_span)
        if kv.item_type == GGUFValueType.STRING:
            out, pos = [], 0
            for _ in range(kv.count):
                (n,) = struct.unpack_from("<Q", data, pos)
                out.append(data[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"))
                pos += 8 + n
            return out
        if kv.item_type in _NUMPY:
            return np.frombuffer(data, dtype=_NUMPY[kv.item_type], count=kv.count)
        raise GGUFError(f"{self.path}: metadata {key} is a nested array, which mqpredict does not read")

    @cached_property
    def tensor_map(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    @property
    def data_size(self) -> int:
        """Bytes the data section needs according to the tensor infos."""
        if not self.tensors:
            return 0
        return max(t.offset + pad(t.nbytes, self.alignment) for t in self.tensors)


_U64 = struct.Struct("<Q")


class _Cursor:
    __slots__ = ("buf", "pos", "path")

    def __init__(self, buf: Any, path: Path, pos: int = 0) -> None:
        self.buf, self.path, self.pos = buf, path, pos

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise _Truncated
        s = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def skip_value(self, vtype: GGUFValueType) -> Any:
        """Read a scalar or string value; for arrays return (item_type, count, data_span)."""
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item = GGUFValueType(self.unpack("<I"))
            count = self.unpack("<Q")
            start = self.pos
            if item == GGUFValueType.STRING:
                buf, pos, end = self.buf, self.pos, len(self.buf)
                unpack = _U64.unpack_from
                try:
                    for _ in range(count):  # a tokenizer holds ~10⁵ of these: keep the loop minimal
                        pos += 8 + unpack(buf, pos)[0]
                except struct.error:
                    raise _Truncated from None
                if pos > end:
                    raise _Truncated
                self.pos = pos
            elif item == GGUFValueType.ARRAY:
                for _ in range(count):
                    self.skip_value(GGUFValueType.ARRAY)
            else:
                self.pos += struct.calcsize(_SCALAR[item]) * count
            if self.pos > len(self.buf):
                raise _Truncated
            return item, count, (start, self.pos)
        return self.unpack(_SCALAR[vtype])


class _Truncated(Exception):
    pass


def read_tensor_infos(path: str | os.PathLike, infos_offset: int, n_tensors: int) -> tuple[TensorInfo, ...] | None:
    """Tensor infos read straight from ``infos_offset`` (when the metadata's size is known), or None
    if they are not there. Lets a writer read back what it wrote without re-walking the metadata."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm[:4] != GGUF_MAGIC or struct.unpack_from("<Q", mm, 8)[0] != n_tensors:
                return None
            cur = _Cursor(mm, Path(path), infos_offset)
            out = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.unpack("<I")
                if n_dims > 8:
                    return None
                shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
                out.append(TensorInfo(name, shape, GGMLQuantizationType(cur.unpack("<I")), cur.unpack("<Q")))
            return tuple(out)
    except (_Truncated, ValueError, OSError):
        return None


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse the header of ``path``; raise a clear error for anything that is not a whole GGUF."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file", "check the path")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a GGUF file")
    file_size = path.stat().st_size
    if file_size < 24:
        raise GGUFError(f"{path} is not a GGUF file ({file_size} bytes)", "give a .gguf model file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != GGUF_MAGIC:
            raise GGUFError(
                f"{path} is not a GGUF file (starts with {bytes(mm[:4])!r}, not b'GGUF')",
                "give a .gguf model file (convert safetensors with llama.cpp's convert_hf_to_gguf.py)",
            )
        cur = _Cursor(mm, path, 4)
        try:
            version = cur.unpack("<I")
            if version not in (2, 3):
                raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
            n_tensors = cur.unpack("<Q")
            n_kv = cur.unpack("<Q")
            if n_tensors > 10_000_000 or n_kv > 10_000_000:
                raise GGUFError(f"{path}: header claims {n_tensors} tensors and {n_kv} keys; the file is corrupt")
            kv_start = cur.pos
            kvs: dict[str, KV] = {}
            for _ in range(n_kv):
                start = cur.pos
                key = cur.string()
                try:
                    vtype = GGUFValueType(cur.unpack("<I"))
                except ValueError:
                    raise GGUFError(f"{path}: metadata {key!r} has an unknown value type; the file is corrupt")
                v = cur.skip_value(vtype)
                if vtype == GGUFValueType.ARRAY:
                    item, count, dspan = v
                    kvs[key] = KV(key, vtype, (start, cur.pos), None, item, count, dspan)
                else:
                    kvs[key] = KV(key, vtype, (start, cur.pos), v)
            kv_end = cur.pos
            tensors = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.unpack("<I")
                if n_dims > 8:
                    raise GGUFError(f"{path}: tensor {name} has {n_dims} dimensions; the file is corrupt")
                shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
                type_id = cur.unpack("<I")
                offset = cur.unpack("<Q")
                try:
                    qtype = GGMLQuantizationType(type_id)
                except ValueError:
                    raise GGUFError(
                        f"{path}: tensor {name} has ggml type id {type_id}, unknown to the installed gguf package",
                        "upgrade mqpredict/gguf, or re-quantize the file with a supported type",
                    )
                if qtype not in GGML_QUANT_SIZES or shape and shape[0] % GGML_QUANT_SIZES[qtype][0]:
                    raise GGUFError(f"{path}: tensor {name} has shape {shape} that type {qtype.name} cannot hold")
                tensors.append(TensorInfo(name, shape, qtype, offset))
            header_end = cur.pos
            raw = bytes(mm[:header_end])
        except _Truncated:
            raise GGUFError(
                f"{path} is truncated or corrupt: its header runs past the end of the file ({file_size} bytes)",
                "re-download or rebuild the file",
            )
    align = int(kvs["general.alignment"].value) if "general.alignment" in kvs else DEFAULT_ALIGNMENT
    if align <= 0 or align & (align - 1):
        raise GGUFError(f"{path}: general.alignment is {align}, not a power of two; the file is corrupt")
    hdr = GGUFHeader(path, version, kvs, tuple(tensors), (kv_start, kv_end), pad(header_end, align), file_size, raw)
    need = hdr.data_offset + max((t.offset + t.nbytes for t in tensors), default=0)
    if need > file_size:
        raise GGUFError(
            f"{path} is truncated: it has {file_size} bytes but its tensors need {need}",
            "re-download or rebuild the file",
        )
    return hdr
