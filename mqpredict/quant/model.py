"""A model as mqpredict sees it: header facts, tensors, groups and descriptors (no tensor data)."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mqpredict.quant.groups import STANDARD_GROUPS, group_of, is_routed_expert
from mqpredict.quant.header import GGUFHeader, TensorInfo, read_header
from mqpredict.quant.types import QuantType, is_quantized

#: metadata keys mqpredict writes into bases it prepares
KEY_ORIGIN = "mqpredict.base.origin"
KEY_SOURCE = "mqpredict.base.source"
KEY_SOURCE_SHA = "mqpredict.base.source_sha256"
KEY_SEED = "mqpredict.base.seed"
KEY_FAMILY = "mqpredict.base.family"
KEY_SYNTHETIC = "mqpredict.base.synthetic"


@dataclass(frozen=True)
class ModelInfo:
    """Everything mqpredict derives from one GGUF header."""

    header: GGUFHeader

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelInfo:
        return cls(read_header(path))

    # ------------------------------------------------------------ identity
    @property
    def path(self) -> Path:
        return self.header.path

    @property
    def arch(self) -> str:
        return str(self.header.get("general.architecture", "unknown"))

    @property
    def name(self) -> str:
        return str(self.header.get("general.name", self.path.stem))

    def _arch_kv(self, key: str, default=None):
        v = self.header.get(f"{self.arch}.{key}", default)
        if hasattr(v, "__len__") and not isinstance(v, str):  # per-layer arrays (e.g. n_ff per layer)
            v = max(int(x) for x in v) if len(v) else default
        return v

    # ------------------------------------------------------------- tensors
    @property
    def tensors(self) -> tuple[TensorInfo, ...]:
        return self.header.tensors

    @cached_property
    def group_map(self) -> dict[str, str | None]:
        """tensor name → group (None = fixed: llama.cpp never quantizes it)."""
        return {t.name: group_of(t.name, t.n_dims) for t in self.tensors}

    @cached_property
    def groups(self) -> dict[str, tuple[TensorInfo, ...]]:
        """group → its tensors; standard groups first in vocabulary order, then dynamic ones."""
        by: dict[str, list[TensorInfo]] = {}
        for t in self.tensors:
            g = self.group_map[t.name]
            if g is not None:
                by.setdefault(g, []).append(t)
        order = [g for g in STANDARD_GROUPS if g in by] + sorted(g for g in by if g not in STANDARD_GROUPS)
        return {g: tuple(by[g]) for g in order}

    @property
    def fixed(self) -> tuple[TensorInfo, ...]:
        return tuple(t for t in self.tensors if self.group_map[t.name] is None)

    @property
    def assignable(self) -> tuple[TensorInfo, ...]:
        return tuple(t for t in self.tensors if self.group_map[t.name] is not None)

    @cached_property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def group_params(self) -> dict[str, int]:
        return {g: sum(t.n_elements for t in ts) for g, ts in self.groups.items()}

    def active_fraction(self, t: TensorInfo) -> float:
        """The fraction of a tensor's parameters one token uses: ``expert_used_count / expert_count`` for
        routed experts (``*_exps``), else 1 (an embedding row is counted like any other weight)."""
        if self.n_expert and self.n_expert_used and is_routed_expert(t.name):
            return min(self.n_expert_used, self.n_expert) / self.n_expert
        return 1.0

    def group_active(self) -> dict[str, float]:
        """group → the fraction of its parameters one token uses (1 but for routed experts)."""
        return {g: sum(t.n_elements * self.active_fraction(t) for t in ts) / max(sum(t.n_elements for t in ts), 1)
                for g, ts in self.groups.items()}  # fmt: skip

    @cached_property
    def n_params_active(self) -> int:
        """Parameters one token uses (all of them for a dense model; MoE: only its routed experts' share)."""
        return round(sum(t.n_elements * self.active_fraction(t) for t in self.tensors))

    def k_quant_groups(self) -> tuple[list[str], list[str]]:
        """(groups whose row lengths fit 256-blocks, groups where K-quants fall back)."""
        fit, back = [], []
        for g, ts in self.groups.items():
            (fit if all(t.shape[0] % 256 == 0 for t in ts) else back).append(g)
        return fit, back

    def group_type_mix(self) -> dict[str, dict[QuantType, int]]:
        """group → {type: parameters at that type} as stored in this file."""
        out: dict[str, dict[QuantType, int]] = {}
        for g, ts in self.groups.items():
            c: Counter = Counter()
            for t in ts:
                c[t.qtype] += t.n_elements
            out[g] = dict(c)
        return out

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bpw(self) -> float:
        """Bits per weight as llama.cpp reports it: tensor bytes × 8 / all elements."""
        return 8.0 * self.tensor_bytes / max(self.n_params, 1)

    @property
    def quantized_tensors(self) -> tuple[TensorInfo, ...]:
        """Assignable tensors already stored in a block-quantized type."""
        return tuple(t for t in self.assignable if is_quantized(t.qtype))

    # ---------------------------------------------------------- descriptors
    @property
    def tied_embeddings(self) -> bool:
        return "output.weight" not in self.header.tensor_map

    @property
    def n_layers(self) -> int:
        return int(self._arch_kv("block_count", 0) or 0)

    @property
    def n_embd(self) -> int:
        return int(self._arch_kv("embedding_length", 0) or 0)

    @property
    def n_ff(self) -> int:
        return int(self._arch_kv("feed_forward_length", 0) or 0)

    @property
    def n_head(self) -> int:
        return int(self._arch_kv("attention.head_count", 0) or 0)

    @property
    def n_head_kv(self) -> int:
        return int(self._arch_kv("attention.head_count_kv", self.n_head) or 0)

    @property
    def n_expert(self) -> int:
        return int(self._arch_kv("expert_count", 0) or 0)

    @property
    def n_expert_used(self) -> int:
        return int(self._arch_kv("expert_used_count", 0) or 0)

    @cached_property
    def n_vocab(self) -> int:
        kv = self.header.kvs.get("tokenizer.ggml.tokens")
        if kv is not None:
            return kv.count
        emb = self.header.tensor_map.get("token_embd.weight")
        return emb.shape[1] if emb is not None and emb.n_dims > 1 else 0

    @cached_property
    def vocab_hash(self) -> str:
        """sha256 of the tokenizer's token list (what makes two models' logits comparable)."""
        h = hashlib.sha256()
        kv = self.header.kvs.get("tokenizer.ggml.tokens")
        if kv is not None:
            h.update(self.header.raw(kv.data_span))
        h.update(str(self.n_vocab).encode())
        return h.hexdigest()

    @property
    def base_origin(self) -> str:
        """How this file came to be a base: 'native' unless mqpredict prepared it (then e.g. 'dither:Q4_1')."""
        return str(self.header.get(KEY_ORIGIN, "native"))

    def descriptors(self) -> dict:
        return {
            "architecture": self.arch,
            "name": self.name,
            "n_params": self.n_params,
            "n_layers": self.n_layers,
            "n_embd": self.n_embd,
            "n_ff": self.n_ff,
            "n_head": self.n_head,
            "n_head_kv": self.n_head_kv,
            "n_expert": self.n_expert,
            "n_expert_used": self.n_expert_used,
            "n_params_active": self.n_params_active,
            "n_vocab": self.n_vocab,
            "tied_embeddings": self.tied_embeddings,
            "base_origin": self.base_origin,
        }
