"""Budgets people have: a file size, a bpw, or a GPU's VRAM at a context length.

Memory needed to run a config = its weights (the exact file size) + the KV cache at ``ctx`` for the
model's architecture (K and V, F16, every layer: ``2 × n_layers × ctx × n_head_kv × head_dim × 2`` bytes)
+ a stated compute-buffer allowance (:data:`COMPUTE_ALLOWANCE` plus the logits of one 512-token batch,
``n_vocab × 512 × 4`` bytes). The allowance is a rule of thumb for llama.cpp's CUDA/Metal back ends, not
a measurement; pass ``--vram`` a little below the card's size when other programs share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mqpredict.errors import InputError

COMPUTE_ALLOWANCE = 512 * 2**20
COMMON_VRAM_GB = (8, 12, 16, 24, 32, 48, 80)
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]i?b?)?\s*$", re.I)


def parse_size(text: str, what: str = "--target-size") -> int:
    """``3.2GB``, ``350MB``, ``1.5GiB``, ``24G`` → bytes (decimal units unless ``i``)."""
    m = _SIZE.match(text)
    if not m:
        raise InputError(f"{what} {text!r} is not a size", "e.g. 3.2GB, 350MB, 1.5GiB, 24GB")
    unit = (m.group(2) or "b").lower().rstrip("b")
    mult = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return int(float(m.group(1)) * mult)


@dataclass(frozen=True)
class Budget:
    size_bytes: int | None = None
    bpw: float | None = None
    vram_bytes: int | None = None
    ctx: int = 8192

    def fits(self, size_bytes: int, bpw: float, desc: dict) -> bool:
        if self.size_bytes is not None and size_bytes > self.size_bytes:
            return False
        if self.bpw is not None and bpw > self.bpw:
            return False
        if self.vram_bytes is not None and run_memory(size_bytes, desc, self.ctx) > self.vram_bytes:
            return False
        return True

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.size_bytes, self.bpw, self.vram_bytes))


def kv_cache_bytes(desc: dict, ctx: int) -> int:
    head_dim = desc["n_embd"] // max(1, desc["n_head"])
    return 2 * desc["n_layers"] * ctx * desc["n_head_kv"] * head_dim * 2


def run_memory(size_bytes: int, desc: dict, ctx: int) -> int:
    """Weights + F16 KV cache at ``ctx`` + the compute allowance."""
    return size_bytes + kv_cache_bytes(desc, ctx) + COMPUTE_ALLOWANCE + desc["n_vocab"] * 512 * 4


def smallest_vram(size_bytes: int, desc: dict, ctx: int) -> int | None:
    """The smallest common VRAM size (GB) the config runs in at ``ctx``, None if none."""
    need = run_memory(size_bytes, desc, ctx)
    return next((gb for gb in COMMON_VRAM_GB if need <= gb * 10**9), None)
