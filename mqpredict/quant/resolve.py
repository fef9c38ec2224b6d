"""A config on a model → the **effective types**: the type of every tensor in the file llama.cpp writes.

Pure configs are resolved here, header-only: each quantizable tensor gets its first matching tensor
pattern, else its group's type, else the default, then llama.cpp's fallback for its row length
(:func:`mqpredict.quant.types.effective_type`) — exactly what ``llama-quantize --pure
--tensor-type-file`` does. Preset configs are resolved by llama.cpp itself (a dry run): pass a
``preset_resolver`` (:func:`mqpredict.llama.quantize.dry_run_types`).

Two configs with the same effective types are the same file; :func:`types_key` names that file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping

from mqpredict.errors import ConfigError
from mqpredict.quant.config import Config
from mqpredict.quant.groups import StandardGroup
from mqpredict.quant.imatrix import Imatrix
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.presets import DEFAULT_TYPE, IMATRIX_PRESETS, PURE_PRESET, Preset
from mqpredict.quant.types import IMATRIX_TYPES, WEIGHTS_REQUIRED, NoFallback, QuantType, effective_type, is_quantized

EffectiveTypes = dict[str, QuantType]
PresetResolver = Callable[[ModelInfo, Config], EffectiveTypes]
_NEED_IMATRIX_HINT = "pass --imatrix FILE (compute one with `mqpredict imatrix BASE --corpus CALIB.txt -o FILE`)"

_IMATRIX_EXEMPT = ("token_embd.weight", "per_layer_token_embd.weight", "output.weight")


def _tied_hint(model: ModelInfo) -> str:
    return (
        f"{model.path.name} ties its embeddings (no output.weight): token_embd.weight is both input and "
        "output, so set embeddings=TYPE instead (docs/configs.md: moving recipes between tied and untied models)"
    )


def validate(model: ModelInfo, config: Config) -> None:
    """Reject groups the model lacks and patterns that match nothing quantizable."""
    for g, _ in config.groups:
        if g not in model.groups:
            hint = f"groups of {model.path.name}: {', '.join(model.groups)}"
            if g == StandardGroup.LM_HEAD and model.tied_embeddings:
                hint = _tied_hint(model)
            raise ConfigError(f"config names group {g}, which {model.path.name} does not have", hint)
    for pattern, _ in config.tensors:
        rx = re.compile(pattern)
        hits = [t for t in model.tensors if rx.search(t.name)]
        if not any(model.group_map[t.name] is not None for t in hits):
            if hits:
                raise ConfigError(
                    f"tensor pattern {pattern!r} matches only {hits[0].name} (and others llama.cpp never quantizes)",
                    "norms, biases and router weights keep their type; target a weight matrix",
                )
            raise ConfigError(
                f"tensor pattern {pattern!r} matches no tensor of {model.path.name}",
                "run `mqpredict inspect MODEL` to see the tensor names",
            )


def requested_types(model: ModelInfo, config: Config) -> EffectiveTypes:
    """Pure config → the type asked for each quantizable tensor (before llama.cpp's fallbacks)."""
    if config.is_preset:
        raise ValueError("preset configs are resolved by llama.cpp (dry run)")
    patterns = [(re.compile(p), t) for p, t in config.tensors]
    groups = config.group_types
    out: EffectiveTypes = {}
    for t in model.assignable:
        for rx, qt in patterns:
            if rx.search(t.name):
                out[t.name] = qt
                break
        else:
            out[t.name] = groups.get(model.group_map[t.name], config.default)
    return out


def check_imatrix_preset(config: Config, imatrix: Imatrix | None) -> None:
    if imatrix is None and config.preset in IMATRIX_PRESETS:
        raise ConfigError(f"preset {config.preset.value} needs an importance matrix", _NEED_IMATRIX_HINT)


def needs_weights(name: str, qt: QuantType, preset: Preset | None = None) -> bool:
    """Whether llama.cpp refuses (or aborts on) type ``qt`` for tensor ``name`` without importance-matrix
    weights for that very tensor: the low-bit IQ types (token_embd/output exempt), and IQ2_XXS/IQ2_XS/IQ1_S
    everywhere (even token_embd/output, which an imatrix never holds)."""
    needs = qt in IMATRIX_TYPES or (qt == QuantType.Q2_K and preset == Preset.Q2_K_S)
    return (needs and name not in _IMATRIX_EXEMPT) or qt in WEIGHTS_REQUIRED


def quantizable(name: str, qt: QuantType, imatrix: Imatrix | None) -> bool:
    """Whether llama.cpp quantizes tensor ``name`` to ``qt`` with ``imatrix`` (or none) — what a search or an
    allocator may choose; :func:`check_types` refuses the rest with the reason."""
    return not needs_weights(name, qt) or (imatrix is not None and imatrix.has(name))


def check_types(model: ModelInfo, types: Mapping[str, QuantType], config: Config, imatrix: Imatrix | None = None) -> None:
    """Refuse what llama.cpp would refuse (or abort on): the low-bit IQ types need an importance matrix,
    and IQ2_XXS/IQ2_XS/IQ1_S need its weights for the very tensor (even token_embd/output)."""
    for name, qt in types.items():
        if model.group_map.get(name) is None:
            continue
        hard = needs_weights(name, qt, config.preset)
        if imatrix is None and hard:
            raise ConfigError(f"type {qt.name} (tensor {name}) needs an importance matrix", _NEED_IMATRIX_HINT)
        if imatrix is not None and hard and not imatrix.has(name):
            raise ConfigError(
                f"type {qt.name} for tensor {name} needs importance-matrix weights, which {imatrix.path.name} does "
                "not hold for that tensor (llama.cpp would refuse or abort)",
                "give that tensor's group another type (e.g. Q2_K or IQ3_S)",
            )


def resolve(model: ModelInfo, config: Config, preset_resolver: PresetResolver | None = None,
            imatrix: Imatrix | None = None) -> EffectiveTypes:  # fmt: skip
    """Effective type of every tensor (fixed tensors keep their own) for ``config`` on ``model``,
    quantized with ``imatrix`` or without (``preset_resolver`` must use the same imatrix)."""
    validate(model, config)
    check_imatrix_preset(config, imatrix)
    if config.is_preset:
        if preset_resolver is None:
            raise ConfigError(f"preset {config.preset.value} is resolved by llama.cpp, which is not available here")
        types = dict(preset_resolver(model, config))
    else:
        req = requested_types(model, config)
        check_types(model, req, config, imatrix)
        types = {t.name: t.qtype for t in model.tensors}
        for t in model.assignable:
            try:
                types[t.name] = effective_type(req[t.name], t.shape[0])
            except NoFallback:
                raise ConfigError(
                    f"type {req[t.name].name} does not fit tensor {t.name} (row length {t.shape[0]}) and llama.cpp has no fallback for it",
                    "choose another type for this tensor's group",
                ) from None
    check_types(model, types, config, imatrix)
    return types


def types_key(model: ModelInfo, types: Mapping[str, QuantType]) -> str:
    """A short hash naming the file these effective types produce (same hash → same file)."""
    h = hashlib.sha256()
    for t in model.tensors:
        h.update(f"{t.name}={types[t.name].name};".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ export to llama-quantize
def export_preset(config: Config) -> Preset:
    """The file type llama-quantize is run with (and that the output's general.file_type holds)."""
    if config.preset is not None:
        return config.preset
    if is_quantized(config.default):
        return PURE_PRESET[config.default]
    quantized = sorted((t for t in config.types_used() if is_quantized(t)), key=lambda t: t.name)
    # llama.cpp ignores --tensor-type when the file type's default is not quantized, so such a
    # config is run with a quantized file type and every group spelled out
    return PURE_PRESET[quantized[0]] if quantized else PURE_PRESET[config.default]


def tensor_pattern(name: str) -> str:
    """An anchored llama-quantize pattern for a tensor and its siblings in other layers:
    ``blk.3.ffn_down.weight`` → ``^blk\\.\\d+\\.ffn_down\\.weight$``."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i - 1] == "blk" and parts[i].isdigit():
            parts[i] = r"\d+"
            break
    return "^" + r"\.".join(parts) + "$"


def tensor_type_lines(model: ModelInfo, config: Config) -> list[str]:
    """The ``--tensor-type-file`` lines (``pattern=type``) that make llama-quantize write this config."""
    validate(model, config)
    lines = [f"{p}={t.name.lower()}" for p, t in config.tensors]
    base_type = DEFAULT_TYPE[export_preset(config)]
    groups = config.group_types
    for g, ts in model.groups.items():
        qt = groups.get(g, config.default)
        if qt is None or (not config.is_preset and qt == base_type):
            continue
        for pat in dict.fromkeys(tensor_pattern(t.name) for t in ts):
            lines.append(f"{pat}={qt.name.lower()}")
    return lines


def quantize_command(model: ModelInfo, config: Config, out: str, type_file: str, threads: int | None = None,
                     imatrix: Imatrix | None = None) -> list[str]:  # fmt: skip
    """The exact ``llama-quantize`` command line that builds ``config`` from ``model``. With an imatrix it
    names the file as mqpredict writes it into the GGUF (its base name): run it in the imatrix's folder."""
    cmd = ["llama-quantize"]
    if imatrix is not None:
        cmd += ["--imatrix", imatrix.file_label]
    if not config.is_preset:
        cmd.append("--pure")
    if tensor_type_lines(model, config):
        cmd += ["--tensor-type-file", type_file]
    cmd += [str(model.path), out, export_preset(config).value]
    if threads:
        cmd.append(str(threads))
    return cmd
