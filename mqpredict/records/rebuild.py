"""Does a config derived from a GGUF rebuild that GGUF? Tensor for tensor, header apart.

Build the derived config on a base and compare each tensor's type and bytes with the original file;
metadata differences (e.g. ``general.file_type``, which a pure rebuild sets from its default type) are
listed separately, never hidden. Bytes can only match when the base is the very model the GGUF was
quantized from; on a restored base (dithered weights) the types match and the bytes do not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from mqpredict.llama.engine import Engine
from mqpredict.quant.header import GGUFHeader, read_header
from mqpredict.records.ingest import GGUFConfig


@dataclass
class RebuildCheck:
    n_tensors: int
    types_differ: list[str] = field(default_factory=list)
    bytes_differ: list[str] = field(default_factory=list)
    header_differ: list[str] = field(default_factory=list)  # metadata keys whose values differ
    size_original: int = 0
    size_rebuilt: int = 0

    @property
    def tensors_match(self) -> bool:
        return not self.types_differ and not self.bytes_differ

    def to_json(self) -> dict:
        return {
            "n_tensors": self.n_tensors,
            "types_match": not self.types_differ,
            "bytes_match": not self.bytes_differ,
            "types_differ": self.types_differ[:20],
            "bytes_differ": self.bytes_differ[:20],
            "n_bytes_differ": len(self.bytes_differ),
            "header_differ": self.header_differ,
            "size_original": self.size_original,
            "size_rebuilt": self.size_rebuilt,
        }


def _tensor_digests(h: GGUFHeader) -> dict[str, str]:
    out = {}
    with open(h.path, "rb") as f:
        for t in h.tensors:
            f.seek(h.data_offset + t.offset)
            out[t.name] = hashlib.sha256(f.read(t.nbytes)).hexdigest()
    return out


def rebuild_check(g: GGUFConfig, engine: Engine, out: Path | None = None) -> RebuildCheck:
    """Build ``g.config`` with ``engine`` (on its base) and compare with the original file."""
    built = engine.build(g.config, out)
    try:
        a, b = g.model.header, read_header(built.path)
        res = RebuildCheck(len(a.tensors), size_original=a.file_size, size_rebuilt=b.file_size)
        tb = b.tensor_map
        res.types_differ = [t.name for t in a.tensors if t.name not in tb or tb[t.name].qtype != t.qtype]
        da, db = _tensor_digests(a), _tensor_digests(b)
        res.bytes_differ = [n for n in da if da[n] != db.get(n)]
        keys = set(a.kvs) | set(b.kvs)
        res.header_differ = sorted(
            k for k in keys if k not in a.kvs or k not in b.kvs or a.raw(a.kvs[k].span) != b.raw(b.kvs[k].span)
        )
        return res
    finally:
        if out is None:
            built.path.unlink(missing_ok=True)
