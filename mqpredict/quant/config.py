"""Config: which quant type each tensor group (or tensor) of a model gets.

A config is either

* **pure**: a ``default`` type for every quantizable tensor, per-group types on top, and optional
  per-tensor regex overrides on top of those (first match wins, as in ``llama-quantize``); or
* **preset**: a llama.cpp preset (``Q4_K_M`` …) whose per-tensor choices llama.cpp makes on the
  actual model, optionally with group/tensor overrides that llama.cpp applies before its rules.

Text forms (all accepted by ``--config``)::

    Q4_K_M                                    a preset (llama-quantize names; Q4_K = Q4_K_M)
    Q4_K_M,ffn_down=Q6_K                      a preset with a group override
    default=Q4_K,ffn_down=Q6_K,embeddings=Q8_0
    default=Q5_0,tensor:blk\\.0\\.ffn_down=Q8_0   a per-tensor regex override (no commas inside)
    path/to/config.toml                       see :meth:`Config.from_toml`

The **canonical key** (:attr:`Config.key`) writes ``preset=``/``default=`` first, then groups in
alphabetical order, then tensor patterns in their order; pure configs drop groups that repeat the
default. ``Config.parse(c.key) == c`` always holds.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from mqpredict.errors import ConfigError, InputError
from mqpredict.quant.groups import is_group_name
from mqpredict.quant.presets import Preset, parse_preset, require_preset
from mqpredict.quant.types import QuantType, parse_type

TENSOR_PREFIX = "tensor:"
_RESERVED_TOML = {"preset", "default", "groups", "tensors", "name", "description", "source"}


@dataclass(frozen=True)
class Config:
    """A frozen mapping group → quant type (plus a default or a preset, and tensor overrides)."""

    default: QuantType | None = None
    preset: Preset | None = None
    groups: tuple[tuple[str, QuantType], ...] = ()
    tensors: tuple[tuple[str, QuantType], ...] = ()

    def __post_init__(self) -> None:
        if (self.default is None) == (self.preset is None):
            raise ConfigError("a config needs exactly one of a default type or a preset")
        groups = tuple(sorted(dict(self.groups).items()))
        if len(groups) != len(self.groups):
            raise ConfigError("a config names the same group twice")
        if self.default is not None:
            groups = tuple((g, t) for g, t in groups if t != self.default)
        for g, _ in groups:
            if not is_group_name(g):
                raise ConfigError(f"{g!r} is not a group name (lower-case identifier)")
        tensors = tuple((p.lower(), t) for p, t in self.tensors)
        for p, _ in tensors:
            _check_pattern(p)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "tensors", tensors)

    # ----------------------------------------------------------------- views
    @property
    def is_preset(self) -> bool:
        return self.preset is not None

    @property
    def group_types(self) -> dict[str, QuantType]:
        return dict(self.groups)

    def types_used(self) -> set[QuantType]:
        """Every quant type this config names (a preset's own choices are not known here)."""
        out = {t for _, t in self.groups} | {t for _, t in self.tensors}
        if self.default is not None:
            out.add(self.default)
        return out

    @property
    def key(self) -> str:
        head = f"preset={self.preset.value}" if self.preset is not None else f"default={self.default.name}"
        parts = [head]
        parts += [f"{g}={t.name}" for g, t in self.groups]
        parts += [f"{TENSOR_PREFIX}{p}={t.name}" for p, t in self.tensors]
        return ",".join(parts)

    def __str__(self) -> str:
        return self.key

    def with_groups(self, **groups: QuantType) -> Config:
        merged = dict(self.groups) | groups
        return Config(self.default, self.preset, tuple(merged.items()), self.tensors)

    # ---------------------------------------------------------------- parsing
    @classmethod
    def pure(cls, default: QuantType, **groups: QuantType) -> Config:
        return cls(default=default, groups=tuple(groups.items()))

    @classmethod
    def from_preset(cls, preset: Preset | str) -> Config:
        return cls(preset=preset if isinstance(preset, Preset) else require_preset(preset))

    @classmethod
    def parse(cls, text: str) -> Config:
        """Parse any text form (see the module doc) or the path of a TOML file."""
        text = text.strip()
        if not text:
            raise InputError("empty config", "give a preset (Q4_K_M) or default=TYPE[,group=TYPE…]")
        if text.endswith(".toml") or (os.sep in text and "=" not in text):
            return cls.from_toml(text)
        default = preset = None
        groups: list[tuple[str, QuantType]] = []
        tensors: list[tuple[str, QuantType]] = []
        for i, item in enumerate(x.strip() for x in text.split(",")):
            if not item:
                continue
            if "=" not in item:
                p = parse_preset(item)
                if i != 0 or p is None:
                    raise InputError(
                        f"config item {item!r} in {text!r} is not NAME=TYPE",
                        "a bare name is allowed only first, as a llama.cpp preset (e.g. Q4_K_M)",
                    )
                preset = p
                continue
            name, _, value = item.rpartition("=") if item.startswith(TENSOR_PREFIX) else item.partition("=")
            name, value = name.strip(), value.strip()
            if name == "preset":
                preset = require_preset(value)
            elif name == "default":
                default = parse_type(value, where=f"for default in {text!r}")
            elif name.startswith(TENSOR_PREFIX):
                pattern = name[len(TENSOR_PREFIX) :]
                if not pattern:
                    raise InputError(f"empty tensor pattern in {text!r}")
                tensors.append((pattern, parse_type(value, where=f"for tensor:{pattern} in {text!r}")))
            elif is_group_name(name):
                if name in dict(groups):
                    raise InputError(f"group {name} appears twice in {text!r}")
                groups.append((name, parse_type(value, where=f"for {name} in {text!r}")))
            else:
                raise InputError(
                    f"{name!r} in {text!r} is not a group name",
                    f"groups are lower-case identifiers; for a llama-quantize tensor pattern write tensor:{name}={value}",
                )
        if default is not None and preset is not None:
            raise InputError(f"config {text!r} has both a preset and a default", "use one of them")
        if default is None and preset is None:
            raise InputError(
                f"config {text!r} has no default type or preset",
                "start it with default=TYPE or a preset name, e.g. default=Q4_K,ffn_down=Q6_K",
            )
        return cls(default, preset, tuple(groups), tuple(tensors))

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> Config:
        """Read a config file::

            default = "Q4_K"        # or: preset = "Q4_K_M"
            ffn_down = "Q6_K"       # groups, at top level or under [groups]
            [tensors]               # per-tensor regex overrides, in order (first match wins)
            'blk\\.0\\.ffn_down' = "Q8_0"
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such config file")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not valid TOML ({e})") from None
        try:
            groups = dict(data.get("groups", {}))
            groups |= {k: v for k, v in data.items() if k not in _RESERVED_TOML}
            parts = []
            if "preset" in data:
                parts.append(f"preset={data['preset']}")
            if "default" in data:
                parts.append(f"default={data['default']}")
            cfg = cls.parse(",".join(parts + [f"{g}={t}" for g, t in groups.items()]) or "")
            tensors = tuple(
                (p, parse_type(str(t), where=f"for tensor {p}"))
                for p, t in dict(data.get("tensors", {})).items()
            )
        except InputError as e:
            raise InputError(f"{path}: {e.message}", e.hint) from None
        except (TypeError, ValueError, AttributeError) as e:
            raise InputError(f"{path}: unexpected structure ({e})", "see `mqpredict size --help`") from None
        return cls(cfg.default, cfg.preset, cfg.groups, tensors)

    def to_toml(self) -> str:
        lines = [f'preset = "{self.preset.value}"' if self.preset else f'default = "{self.default.name}"']
        if self.groups:
            lines += ["", "[groups]"] + [f'{g} = "{t.name}"' for g, t in self.groups]
        if self.tensors:
            lines += ["", "[tensors]"] + [f"'{p}' = \"{t.name}\"" for p, t in self.tensors]
        return "\n".join(lines) + "\n"


def _check_pattern(pattern: str) -> None:
    """Tensor patterns must survive the canonical key and llama-quantize's tensor-type file."""
    if not pattern or "," in pattern or any(c.isspace() for c in pattern):
        raise ConfigError(
            f"tensor pattern {pattern!r} is empty or holds a comma or whitespace",
            "write it without them (e.g. [0-9] instead of {1,2}); llama-quantize splits its file on whitespace",
        )
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"tensor pattern {pattern!r} is not a valid regular expression ({e})") from None


def parse_configs(texts: list[str]) -> list[Config]:
    return [Config.parse(t) for t in texts]
