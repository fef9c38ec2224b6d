"""A minimal streaming GGUF v3 writer that reuses metadata bytes verbatim.

Used by the stitcher (hybrids from pure quantizations) and by base preparation (restored F32
weights). Metadata is passed as raw KV entries so that copies are exact; tensors are written in the
given order, each padded to the alignment, from a file range or from a numpy array.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGUFValueType

from mqpredict.errors import InputError
from mqpredict.quant.header import GGUFHeader, pad, tensor_nbytes
from mqpredict.quant.types import QuantType
from mqpredict.util import faults
from mqpredict.util.atomic import atomic_open


def kv_u32(key: str, value: int) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<II", GGUFValueType.UINT32, value)


def kv_str(key: str, value: str) -> bytes:
    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", GGUFValueType.STRING) + struct.pack("<Q", len(v)) + v


def copied_kvs(base: GGUFHeader, skip: Iterable[str]) -> list[bytes]:
    """The raw entries of ``base``'s metadata, in order, without the keys in ``skip``."""
    skip = set(skip)
    return [base.raw(kv.span) for kv in base.kvs.values() if kv.key not in skip]


@dataclass(frozen=True)
class FileRange:
    """Tensor bytes to copy from a file (absolute offset)."""

    path: Path
    offset: int


TensorData = FileRange | Callable[[], np.ndarray]


@dataclass(frozen=True)
class TensorOut:
    name: str
    shape: tuple[int, ...]  # ggml order
    qtype: QuantType
    data: TensorData

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)


def _copy(src_fd: int, dst_fd: int, offset: int, n: int) -> None:
    while n > 0:
        try:
            done = os.copy_file_range(src_fd, dst_fd, n, offset)
        except OSError:
            done = 0
        if done <= 0:  # unsupported here: copy in user space
            data = os.pread(src_fd, min(n, 64 << 20), offset)
            if not data:
                raise InputError(f"unexpected end of file while copying tensor data (offset {offset})")
            done = os.write(dst_fd, data)
        offset += done
        n -= done


def header_bytes(kvs: list[bytes], tensors: list[TensorOut], alignment: int) -> bytes:
    """Everything before the data section: magic, counts, metadata, tensor infos, padding."""
    infos, offset = [], 0
    for t in tensors:
        nm = t.name.encode()
        infos.append(struct.pack("<Q", len(nm)) + nm + struct.pack("<I", len(t.shape)))
        infos.append(struct.pack(f"<{len(t.shape)}Q", *t.shape) + struct.pack("<IQ", int(t.qtype), offset))
        offset += pad(t.nbytes, alignment)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (pad(len(head), alignment) - len(head))


def write_gguf(out: str | os.PathLike, kvs: list[bytes], tensors: list[TensorOut], alignment: int) -> Path:
    """Write a GGUF v3 file atomically: a crash or Ctrl-C leaves no partial ``out``."""
    head = header_bytes(kvs, tensors, alignment)
    out = Path(out)
    fds: dict[Path, int] = {}
    try:
        with atomic_open(out) as f:
            f.write(head)
            f.flush()
            dst = f.fileno()
            for i, t in enumerate(tensors):
                if i == len(tensors) // 2:
                    faults.point("build", f"{out.name}:half")  # half the tensors written
                nb = t.nbytes
                if isinstance(t.data, FileRange):
                    if t.data.path not in fds:
                        fds[t.data.path] = os.open(t.data.path, os.O_RDONLY)
                    _copy(fds[t.data.path], dst, t.data.offset, nb)
                else:
                    arr = np.ascontiguousarray(t.data())
                    if arr.nbytes != nb:
                        raise ValueError(f"{t.name}: {arr.nbytes} bytes for a {nb}-byte tensor")
                    os.write(dst, arr.tobytes())
                if pad(nb, alignment) > nb:
                    os.write(dst, b"\0" * (pad(nb, alignment) - nb))
    finally:
        for fd in fds.values():
            os.close(fd)
    return out
