"""Who a base model is: its id, its family, whether it is synthetic, and its descriptors."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from mqpredict.quant.model import KEY_FAMILY, KEY_SYNTHETIC, ModelInfo
from mqpredict.util.hashing import file_sha256


def family_name(model: ModelInfo) -> str:
    """The original model a base comes from. Bases mqpredict prepares, truncates or generates carry it
    in ``mqpredict.base.family``; otherwise ``general.basename``-``general.size_label`` (e.g.
    ``smollm2-135m``), else ``general.name``, else the file name."""
    h = model.header
    fam = h.get(KEY_FAMILY)
    if fam:
        return str(fam)
    base, size = h.get("general.basename"), h.get("general.size_label")
    name = f"{base}-{size}" if base and size else (base or h.get("general.name") or model.path.stem)
    return re.sub(r"[^a-z0-9._-]+", "-", str(name).lower()).strip("-")


@dataclass(frozen=True)
class ModelIdentity:
    model_id: str
    model_name: str
    family: str
    synthetic: bool
    descriptors: dict

    def columns(self) -> dict:
        d = self.descriptors
        return {
            "model_id": self.model_id,
            "model_name": self.model_name,
            "family": self.family,
            "synthetic": self.synthetic,
            **{k: d[k] for k in ("architecture", "n_params", "n_layers", "n_embd", "n_ff", "n_head", "n_head_kv",
                                  "n_expert", "n_vocab", "tied_embeddings", "base_origin")},  # fmt: skip
        }


def identify(model: ModelInfo) -> ModelIdentity:
    """model_id = hash of the tensor data + name + architecture (metadata edits do not change it)."""
    data = file_sha256(model.path, model.header.data_offset)
    mid = hashlib.sha256(f"{model.arch}|{model.name}|{data}".encode()).hexdigest()[:16]
    synthetic = bool(model.header.get(KEY_SYNTHETIC, False))
    return ModelIdentity(mid, model.name, family_name(model), synthetic, model.descriptors())
