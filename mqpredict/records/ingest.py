"""Configs people already use, turned into mqpredict configs: GGUF headers and recipe files.

* :func:`from_gguf` reads only a GGUF's header and derives the canonical config that rebuilds its
  per-tensor types (plus each group's type fractions). Unknown tensor names become dynamic groups,
  listed by name.
* :func:`read_type_file` reads llama-quantize ``--tensor-type-file`` files and per-tensor
  ``name=type`` lists; :func:`load_recipes` reads a folder of them with ``recipes.toml`` metadata
  (datasets/recipes/).
* :func:`adapt` moves a config to another model: patterns and groups that match nothing there are
  dropped (each named in the notes), and a tied model's shared embedding takes ``lm_head``'s type when
  that is the higher one (docs/configs.md).
"""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mqpredict.errors import InputError
from mqpredict.quant.config import Config
from mqpredict.quant.derive import config_from_types, type_fractions
from mqpredict.quant.groups import STANDARD_GROUPS, StandardGroup
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.presets import require_preset
from mqpredict.quant.types import QuantType, bpw, parse_type


@dataclass(frozen=True)
class GGUFConfig:
    """What a GGUF's header says about its quantization."""

    model: ModelInfo
    config: Config

    @property
    def types(self) -> dict[str, QuantType]:
        return {t.name: t.qtype for t in self.model.tensors}

    def to_json(self) -> dict:
        m = self.model
        return {
            "file": str(m.path),
            "config": self.config.key,
            "fractions": type_fractions(m, self.types),
            "tensors": [{"name": t.name, "group": m.group_map[t.name], "type": t.qtype.name} for t in m.tensors],
            "architecture": m.arch,
            "model_name": m.name,
            "n_params": m.n_params,
            "tied_embeddings": m.tied_embeddings,
            "size_bytes": m.header.file_size,
            "bpw": m.bpw,
            "dynamic_groups": {g: [t.name for t in ts] for g, ts in m.groups.items() if g not in STANDARD_GROUPS},
        }


def from_gguf(path: str | Path) -> GGUFConfig:
    """Header only: the canonical config that rebuilds this file's per-tensor types."""
    m = ModelInfo.load(path)
    if not m.assignable:
        raise InputError(f"{m.path} has no quantizable tensors", "is it a model GGUF (not an imatrix or LoRA)?")
    return GGUFConfig(m, config_from_types(m, {t.name: t.qtype for t in m.tensors}))


# -------------------------------------------------------------------------------- recipes
_PLAIN_NAME = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*\.(weight|bias)$")


def read_type_file(path: str | Path) -> list[tuple[str, QuantType]]:
    """``pattern=type`` tokens (whitespace-separated, as llama-quantize reads them). A token that is a
    plain tensor name (``blk.0.ffn_down.weight=q6_k``) is taken literally (escaped and anchored)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the recipe ({e})") from None
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        for tok in line.split():
            pattern, sep, t = tok.rpartition("=")
            if not sep or not pattern or not t:
                raise InputError(f"{path} line {n}: {tok!r} is not pattern=type", "llama-quantize's tensor-type format")
            qt = parse_type(t, where=f"in {path.name} line {n}")
            pattern = pattern.lower()
            if _PLAIN_NAME.match(pattern):
                pattern = "^" + pattern.replace(".", r"\.") + "$"
            try:
                re.compile(pattern)
            except re.error as e:
                raise InputError(f"{path} line {n}: {pattern!r} is not a regular expression ({e})") from None
            out.append((pattern, qt))
    if not out:
        raise InputError(f"{path} holds no pattern=type lines")
    return out


@dataclass(frozen=True)
class Recipe:
    name: str
    file: Path
    config: Config
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def url(self) -> str | None:
        return self.meta.get("source_url")

    @property
    def author(self) -> str | None:
        return self.meta.get("author")


def recipe_config(lines: list[tuple[str, QuantType]], base_ftype: str = "", pure: bool = True) -> Config:
    """A recipe's config: its patterns on top of a preset, or (pure lists) over their commonest type."""
    if base_ftype:
        return Config(preset=require_preset(base_ftype), tensors=tuple(lines))
    if not pure:
        raise InputError("a partial recipe without a base file type cannot be built", "give it a base_ftype")
    default = Counter(t for _, t in lines).most_common(1)[0][0]
    return Config(default=default, tensors=tuple(lines))


def load_recipes(folder: str | Path) -> tuple[list[Recipe], list[str]]:
    """Every recipe in ``folder`` (recipes.toml metadata when present) and notes on those skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such recipe folder")
    meta: dict[str, dict] = {}
    toml = folder / "recipes.toml"
    if toml.exists():
        try:
            meta = {r["file"]: r for r in tomllib.loads(toml.read_text()).get("recipe", [])}
        except (tomllib.TOMLDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{toml}: not a recipe index ({e})") from None
    recipes, skipped = [], []
    for f in sorted(folder.glob("*.txt")):
        m = meta.get(f.name, {})
        try:
            cfg = recipe_config(read_type_file(f), m.get("base_ftype", ""), m.get("pure", True))
        except InputError as e:
            skipped.append(f"{f.name}: {e}")
            continue
        recipes.append(Recipe(m.get("name", f.stem), f, cfg, m))
    return recipes, skipped


# ------------------------------------------------------------------------ moving configs
def adapt(config: Config, model: ModelInfo) -> tuple[Config, list[str]]:
    """``config`` made applicable to ``model``; notes say what was dropped or moved."""
    notes: list[str] = []
    groups = dict(config.groups)
    if StandardGroup.LM_HEAD in groups and StandardGroup.LM_HEAD not in model.groups:
        head = groups.pop(StandardGroup.LM_HEAD)
        emb = groups.get(StandardGroup.EMBEDDINGS, config.default)
        if model.tied_embeddings and (emb is None or bpw(head) > bpw(emb)):
            groups[StandardGroup.EMBEDDINGS] = head
            notes.append(f"tied embeddings: lm_head={head.name} moved to embeddings")
        else:
            notes.append(f"lm_head={head.name} dropped ({model.path.name} has no output.weight)")
    for g in list(groups):
        if g not in model.groups:
            notes.append(f"group {g} dropped ({model.path.name} has none)")
            del groups[g]
    tensors, front = [], []
    emb_rules = [t for p, t in config.tensors if re.search(p, "token_embd.weight")]
    emb_type = emb_rules[0] if emb_rules else groups.get(StandardGroup.EMBEDDINGS, config.default)
    for p, t in config.tensors:
        rx = re.compile(p)
        if any(rx.search(x.name) for x in model.assignable):
            tensors.append((p, t))
        elif model.tied_embeddings and rx.search("output.weight") and (emb_type is None or bpw(t) > bpw(emb_type)):
            front.append((r"^token_embd\.weight$", t))  # the shared tensor does the output's job
            notes.append(f"tied embeddings: tensor:{p}={t.name} moved to token_embd.weight")
        else:
            notes.append(f"tensor:{p}={t.name} dropped (matches no quantizable tensor of {model.path.name})")
    return Config(config.default, config.preset, tuple(groups.items()), tuple(front + tensors)), notes
