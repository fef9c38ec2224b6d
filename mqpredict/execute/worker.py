"""What a worker needs to measure: how to build its engine, and the files that engine reads.

An :class:`EngineRecipe` is sent with every job; a worker process builds the engine once and keeps it
(the in-process engine keeps its model and pure-quant cache warm; the base log-probabilities are cached
on the worker's disk, ``$MQPREDICT_CACHE``). The base and the corpus reach a worker as a
:class:`Shipment`: by path on a shared filesystem, or — for files small enough — through the
executor's object store, written once into the worker's cache and checked by sha256.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mqpredict.errors import InputError
from mqpredict.llama.engine import Engine
from mqpredict.measure.corpus import EvalSpec
from mqpredict.util.atomic import atomic_open
from mqpredict.util.hashing import file_sha256
from mqpredict.util.paths import cache_dir


@dataclass(frozen=True)
class Shipment:
    """A file a worker reads: its path on the driver, its sha256 and size, and maybe its bytes' handle."""

    path: str
    sha256: str
    size: int
    handle: object | None = None  # an object-store reference to the file's bytes (None: shared path only)

    @classmethod
    def of(cls, path: str | os.PathLike, handle: object | None = None) -> Shipment:
        p = Path(path).resolve()
        return cls(str(p), file_sha256(p), p.stat().st_size, handle)

    def local(self, fetch=None, prefer_handle: bool = False) -> Path:
        """The file on this machine: the shared path when it holds the same bytes, else the shipped copy."""
        p = Path(self.path)
        same = p.is_file() and p.stat().st_size == self.size and file_sha256(p) == self.sha256
        if same and not (prefer_handle and self.handle is not None):
            return p
        if self.handle is None or fetch is None:
            what = "is missing" if not p.exists() else "holds other bytes than the driver's"
            raise InputError(f"{p} {what} on worker {os.uname().nodename}",
                             "put the base and the corpus on a filesystem every node mounts at the same path "
                             "(files up to 256 MB also travel through Ray's object store with --ship auto)")  # fmt: skip
        dest = cache_dir() / "shipped" / self.sha256[:16] / p.name
        if not (dest.is_file() and dest.stat().st_size == self.size):
            data = fetch(self.handle)
            with atomic_open(dest) as f:
                f.write(data)
        if file_sha256(dest) != self.sha256:
            dest.unlink(missing_ok=True)
            raise InputError(f"the shipped copy of {p.name} on {os.uname().nodename} does not match its sha256",
                             "run the campaign again (the copy was removed)")  # fmt: skip
        return dest


@dataclass(frozen=True)
class EngineRecipe:
    """How to build the campaign's engine on a worker."""

    kind: str  # engine name: inprocess / tools
    base: Shipment
    corpus: Shipment
    spec: EvalSpec
    threads: int
    llama_bin: str | None = None  # the tools engine: the worker's own llama.cpp build (e.g. CUDA)
    tools_kld: str = "logits"
    prefer_shipped: bool = False  # use the object-store copy even where the path exists (nodes see other files)
    imatrix: Shipment | None = None  # the importance matrix builds are quantized with (its file name is kept)

    def key(self) -> tuple:
        return (self.kind, self.base.sha256, self.corpus.sha256, self.spec, self.threads, self.llama_bin, self.tools_kld,
                self.imatrix.sha256 if self.imatrix else None)  # fmt: skip

    def build(self, fetch=None) -> Engine:
        from mqpredict.llama.factory import EngineName, make_engine

        base = self.base.local(fetch, self.prefer_shipped)
        corpus = self.corpus.local(fetch, self.prefer_shipped)
        imatrix = self.imatrix.local(fetch, self.prefer_shipped) if self.imatrix else None
        return make_engine(base, corpus, self.spec, EngineName(self.kind), Path(self.llama_bin) if self.llama_bin else None,
                           self.threads, False, None, tools_kld=self.tools_kld, imatrix=imatrix)  # fmt: skip


_ENGINES: dict[tuple, Engine] = {}  # per worker process: one warm engine per recipe


def engine_for(recipe: EngineRecipe, fetch=None) -> Engine:
    key = recipe.key()
    if key not in _ENGINES:
        _ENGINES[key] = recipe.build(fetch)
    return _ENGINES[key]
