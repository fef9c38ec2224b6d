"""Per-tensor types → the config that rebuilds them: the inverse of :mod:`mqpredict.quant.resolve`.

This is how a GGUF someone published (an Unsloth or bartowski quant, a llama.cpp preset) becomes a
config mqpredict can measure on this or another model, and how every record carries an
``effective_config`` that rebuilds its file from the header alone.

The derived config is pure and canonical: the type holding most parameters is the default; a group
whose tensors all share a type gets that type; a mixed group gets its majority type plus anchored
per-tensor patterns for the exceptions, merged per tensor family and type into one pattern with a
layer alternation (``^blk\\.(3|7|11)\\.ffn_down\\.weight$=Q6_K``). Every effective type fits its
tensor, so resolving the derived config reproduces the types exactly (checked).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping

from mqpredict.quant.config import Config
from mqpredict.quant.groups import layer_of
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.types import QuantType

_LAYER = re.compile(r"^(?P<pre>(?:.*\.)?blk\.)(?P<n>\d+)(?P<post>\..*)$")


def type_fractions(model: ModelInfo, types: Mapping[str, QuantType]) -> dict[str, dict[str, float]]:
    """group → {type name: fraction of the group's parameters at that type}."""
    out: dict[str, dict[str, float]] = {}
    for g, ts in model.groups.items():
        total = sum(t.n_elements for t in ts)
        c: Counter = Counter()
        for t in ts:
            c[types[t.name].name] += t.n_elements
        out[g] = {k: v / total for k, v in sorted(c.items())}
    return out


def _pattern(names: list[str]) -> str:
    """One anchored pattern for tensors that differ only in their layer index (or a plain name)."""
    esc = lambda s: s.replace(".", r"\.")  # noqa: E731
    if len(names) == 1 or layer_of(names[0]) is None:
        return "^" + esc(names[0]) + "$"
    m = _LAYER.match(names[0])
    layers = sorted(int(_LAYER.match(n).group("n")) for n in names)
    return f"^{esc(m.group('pre'))}({'|'.join(map(str, layers))}){esc(m.group('post'))}$"


def config_from_types(model: ModelInfo, types: Mapping[str, QuantType]) -> Config:
    """The canonical pure config whose effective types on ``model`` are exactly ``types``."""
    by_params: Counter = Counter()
    for t in model.assignable:
        by_params[types[t.name]] += t.n_elements
    if not by_params:
        raise ValueError(f"{model.path.name} has no quantizable tensors")
    default = max(by_params, key=lambda q: (by_params[q], -list(QuantType).index(q)))
    groups: dict[str, QuantType] = {}
    exceptions: dict[tuple[str, QuantType], list[str]] = defaultdict(list)
    for g, ts in model.groups.items():
        c: Counter = Counter()
        for t in ts:
            c[types[t.name]] += t.n_elements
        major = default if c[default] == max(c.values()) else max(c, key=lambda q: (c[q], -list(QuantType).index(q)))
        groups[g] = major
        for t in ts:
            if types[t.name] != major:
                family = _LAYER.sub(r"\g<pre>#\g<post>", t.name)
                exceptions[family, types[t.name]].append(t.name)
    tensors = tuple((_pattern(names), qt) for (_, qt), names in sorted(exceptions.items(), key=lambda x: (x[0][0], x[0][1].name)))
    return Config(default=default, groups=tuple(groups.items()), tensors=tensors)
