"""Clone a campaign's survivor onto a variant: a fine-tune (instruct, uncensored …) of the same architecture.

A survivor's config is a mapping of groups (and per-tensor patterns) to types; it means the same thing
on any model with the same tensor layout. ``check_layout`` refuses a variant whose architecture, tensor
names or shapes differ (naming the first difference). The clone is then built and measured for real
against the **variant's own** full-precision weights, together with the two presets of the campaign's
line around it, so its paired margin to the line is confirmed on the variant, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

from mqpredict.errors import InputError
from mqpredict.llama.engine import Engine, Measurement, load_scores
from mqpredict.quant.config import Config
from mqpredict.quant.model import ModelInfo
from mqpredict.pareto import Line, Point
from mqpredict.search.paired import Paired, margin_to_line


def check_layout(base: ModelInfo, variant: ModelInfo) -> None:
    """Same architecture, same tensors with the same shapes — or an error naming the first difference."""
    if base.arch != variant.arch:
        raise InputError(f"{variant.path.name} is a {variant.arch} model, the campaign's base a {base.arch}",
                         "clone only onto a fine-tune of the same architecture")  # fmt: skip
    a = {t.name: tuple(t.shape) for t in base.header.tensors}
    b = {t.name: tuple(t.shape) for t in variant.header.tensors}
    for name in sorted(a.keys() | b.keys()):
        if name not in b:
            raise InputError(f"{variant.path.name} has no tensor {name} (the campaign's base has)", "not the same layout")
        if name not in a:
            raise InputError(f"{variant.path.name} has a tensor {name} the campaign's base lacks", "not the same layout")
        if a[name] != b[name]:
            raise InputError(f"tensor {name}: shape {list(b[name])} in {variant.path.name}, {list(a[name])} in the base",
                             "clone only onto a fine-tune with the same shapes")  # fmt: skip


@dataclass(frozen=True)
class Cloned:
    config: str
    measurement: Measurement
    presets: dict[str, Measurement]  # the line's presets around it, measured on the variant
    margin: Paired | None  # to the line of those presets on the variant
    campaign_kld: float  # what the survivor measured on the campaign's base

    def to_json(self) -> dict:
        m = self.measurement
        return {"config": self.config, "size_bytes": m.size_bytes, "bpw": m.bpw, "kld_mean": m.stats.kld_mean,
                "kld_mean_err": m.stats.kld_mean_err, "campaign_kld_mean": self.campaign_kld,
                "margin_ln": None if self.margin is None else self.margin.diff,
                "margin_se": None if self.margin is None else self.margin.se,
                "presets": {k: {"bpw": p.bpw, "kld_mean": p.stats.kld_mean} for k, p in self.presets.items()}}  # fmt: skip


def clone(engine: Engine, config: Config, campaign_kld: float, line_presets: list[Config], keep=None) -> Cloned:
    """Build ``config`` on the engine's base (the variant) and measure it with ``line_presets``."""
    m = engine.measure(config, keep=keep)
    pres = {p.key: engine.measure(p) for p in line_presets}
    margin = None
    if m.per_token_path and all(p.per_token_path for p in pres.values()) and pres:
        line = Line.from_presets([Point(p.bpw, p.stats.kld_mean, k) for k, p in pres.items()])
        vec = {k: load_scores(p.per_token_path).kld for k, p in pres.items()}
        margin = margin_to_line(load_scores(m.per_token_path).kld, m.bpw, line, vec, engine.spec.scored_per_chunk)
    return Cloned(config.key, m, pres, margin, campaign_kld)
