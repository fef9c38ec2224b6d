"""Cheap confirmations: measure a proposed config in stages and stop when it cannot win.

Stage 1 scores the first ``stage_fraction`` of the search slice's windows. The paired margin to the
line (and to every measured config at most its size, the incumbents) on exactly those tokens decides
(:func:`judge`, the policy's rule: the campaign's jobs and ``bench search`` both call it): if it is
already significantly above the line (one-sided t test over windows at level ``alpha``) or above one of
the incumbents (the same at ``alpha / k`` for k incumbents: Bonferroni, since any one of them stops it),
the run stops and is recorded as a **partial** measurement (its own token slice, status ``partial``: never mistaken for a full one).
Otherwise the remaining windows are scored and joined to the first ones — one window per batch makes
each window's numbers independent of which others are scored with it, so the joined vector equals a
full run's — and the record is a full ``ok`` measurement. Forward-pass tokens are counted either way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from mqpredict.llama.engine import Engine, Measurement, load_scores, save_scores
from mqpredict.measure.corpus import EvalSpec
from mqpredict.measure.kld import TokenScores
from mqpredict.measure.stats import KLDStats
from mqpredict.quant.config import Config
from mqpredict.pareto import Line
from mqpredict.search.paired import Paired, against, margin_to_line


@dataclass(frozen=True)
class Reference:
    """What a stage is judged against: the line, the hull presets' vectors, the incumbents' vectors, and
    the level of the tests (the policy's)."""

    OBJECT_STORE = True  # one per decision, shared by its jobs: a Ray executor puts it in the object store once

    line: Line
    vectors: dict[str, np.ndarray]  # per-token KLD on the full search slice, by point name
    incumbents: list[tuple[float, str]]  # (bpw, name) of measured configs that may dominate
    per_window: int
    alpha: float = 0.05
    #: a first stage significantly above the line stops the run (False: only one dominated by an incumbent stops)
    above_line_stops: bool = True


@dataclass(frozen=True)
class Outcome:
    measurement: Measurement
    complete: bool  # False: stopped after stage 1 (a partial measurement)
    reason: str | None
    margin: Paired | None  # to the line, on the tokens scored
    forward_tokens: int  # tokens the quantized model ran through (what the engines report)


def stage_specs(spec: EvalSpec, fraction: float) -> tuple[EvalSpec, EvalSpec | None]:
    """The first stage's slice and the rest of the search slice (None when one stage is all there is)."""
    n1 = max(1, round(spec.n_chunks * fraction))
    if n1 >= spec.n_chunks:
        return spec, None
    return spec.part(spec.chunk_offset, n1), spec.part(spec.chunk_offset + n1, spec.n_chunks - n1)


def judge(x: np.ndarray, bpw: float, ref: Reference) -> tuple[Paired | None, str | None]:
    """The paired margin to the line on the tokens of ``x``, and why it cannot win (None: it still can)."""
    m = margin_to_line(x, bpw, ref.line, ref.vectors, ref.per_window)
    if ref.above_line_stops and m is not None and m.above(ref.alpha):
        return m, f"above the line by {m.diff:+.3f} ± {m.se:.3f} (ln KLD) after {m.n_tokens} tokens"
    inc = [name for b, name in ref.incumbents if b <= bpw and name in ref.vectors]
    for name in inc:
        d = against(x, ref.vectors[name], ref.per_window)
        if d.above(ref.alpha / len(inc)):
            return m, f"dominated by {name} ({d.diff:+.3f} ± {d.se:.3f} ln KLD, smaller or equal size)"
    return m, None


def confirm(engine: Engine, config: Config, spec: EvalSpec, ref: Reference, fraction: float = 0.25) -> Outcome:
    """Measure ``config`` on ``spec`` in two stages (see the module docstring)."""
    # without per-token vectors (tools engine, statistics mode) a first stage cannot be judged: one full run
    first, rest = stage_specs(spec, fraction) if engine.keeps_vectors else (spec, None)
    m1 = engine.measure(config, spec=first)
    tokens = m1.forward_tokens
    if rest is None or m1.per_token_path is None:
        if rest is not None:  # no per-token vector after all: run it all
            m1 = engine.measure(config, spec=spec)
            tokens += m1.forward_tokens
        x = load_scores(m1.per_token_path).kld if m1.per_token_path else None
        margin = judge(x, m1.bpw, ref)[0] if x is not None else None
        return Outcome(m1, True, None, margin, tokens)
    s1 = load_scores(m1.per_token_path)
    margin, reason = judge(s1.kld, m1.bpw, ref)
    if reason is not None:
        return Outcome(m1, False, f"stopped early: {reason}", margin, tokens)
    m2 = engine.measure(config, spec=rest)  # a stream continues from where the first stage left it
    tokens += m2.forward_tokens
    full = join(engine, m1, m2, spec)
    x = load_scores(full.per_token_path).kld
    return Outcome(full, True, None, judge(x, full.bpw, ref)[0], tokens)


def join(engine: Engine, m1: Measurement, m2: Measurement, spec: EvalSpec) -> Measurement:
    """Two consecutive slices of one config → the measurement of their union."""
    scores = TokenScores.concat([load_scores(m1.per_token_path), load_scores(m2.per_token_path)])
    path = engine.per_token_path(m1.types_key, spec)
    save_scores(path, scores)
    return dataclasses.replace(m2, stats=KLDStats.from_scores(scores), chunk_offset=spec.chunk_offset,
                               n_chunks=spec.n_chunks, per_token_path=str(path),
                               seconds_build=m1.seconds_build + m2.seconds_build,
                               seconds_eval=m1.seconds_eval + m2.seconds_eval,
                               forward_tokens=m1.forward_tokens + m2.forward_tokens)  # fmt: skip
