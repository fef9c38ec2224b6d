"""What one decision of the search sees: the store read once, for one context.

A :class:`Snapshot` holds one model's records on one search slice (one
:class:`~mqpredict.records.context.Context`: base, corpus, window, slice, scoring, imatrix) — the ones
measured in full (``ok``) and the ones a staged confirmation stopped early (``partial``, on their first
stage's tokens) — with their per-token KLD vectors, and the files that are measured or being measured
(never proposed again). The campaign builds it from the records store; ``bench search`` from what its
oracle has revealed; the :class:`~mqpredict.search.policy.Policy` decides from it alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from mqpredict.pareto import Line, Point

REFERENCE = "preset=Q8_0"


@dataclass(frozen=True)
class Snapshot:
    ok: pd.DataFrame  # records measured in full on the search slice (store columns: key, config, source, bpw, kld_mean …)
    vectors: Mapping[str, np.ndarray]  # record key → per-token KLD on the tokens it scored
    per_window: int  # scored tokens per window (the block of every paired error)
    partial: pd.DataFrame = field(default_factory=pd.DataFrame)  # stopped early: first-stage records
    measured: frozenset[str] = frozenset()  # types keys measured (any status, any slice) or running now

    @staticmethod
    def points_of(df: pd.DataFrame) -> list[Point]:
        return [Point(float(r.bpw), float(r.kld_mean), str(r.key)) for r in df.itertuples()]

    @cached_property
    def presets(self) -> pd.DataFrame:
        return self.ok[self.ok["source"] == "preset"]

    @cached_property
    def own(self) -> pd.DataFrame:
        """Configs measured in full that are not presets (what the search found)."""
        return self.ok[self.ok["source"] != "preset"]

    @cached_property
    def line(self) -> Line:
        return Line.from_presets(self.points_of(self.presets))

    @cached_property
    def ln_ref(self) -> float | None:
        ref = self.ok[self.ok["config"] == REFERENCE]
        return math.log(float(ref["kld_mean"].iloc[0])) if len(ref) else None

    @cached_property
    def known(self) -> frozenset[str]:
        """Types keys never to propose: measured here, elsewhere, or running."""
        keys = set(self.measured) | set(self.ok["types_key"]) if len(self.ok) else set(self.measured)
        if len(self.partial):
            keys |= set(self.partial["types_key"])
        return frozenset(keys)
