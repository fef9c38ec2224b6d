"""A measurement's context: what, besides the file, makes two measurements comparable.

Two records may share a line, a frontier or a paired test only when they were measured on the same base,
corpus, context window and batch layout, token slice, scoring mode, with the same importance matrix (or
both without one). :class:`Context` names that tuple once, so that the record key, the store filters of
seeds, campaigns and predictions, and the reference lookups all agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from mqpredict.measure.corpus import EvalSpec, Scoring
from mqpredict.records.schema import record_key


@dataclass(frozen=True)
class Context:
    model_id: str
    corpus: str
    ctx: int
    n_batch: int
    chunk_offset: int
    n_chunks: int
    scoring: str = Scoring.windows.value
    imatrix_id: str | None = None

    @classmethod
    def of(cls, engine, model_id: str, spec: EvalSpec | None = None) -> Context:
        """The context of measurements by ``engine`` (its corpus and imatrix) on ``spec`` (default: its own)."""
        spec = spec or engine.spec
        return cls(model_id, engine.corpus.id, spec.ctx, spec.n_batch, spec.chunk_offset, spec.n_chunks,
                   spec.scoring.value, engine.imatrix_id)  # fmt: skip

    def key(self, types_key: str, build: str) -> str:
        """The record key of the file ``types_key`` measured in this context by ``build``."""
        return record_key(self.model_id, self.corpus, self.ctx, self.n_batch, self.chunk_offset, self.n_chunks,
                          types_key, build, self.imatrix_id, self.scoring)  # fmt: skip

    def mask(self, df: pd.DataFrame, *, slice_: bool = True) -> pd.Series:
        """Rows of ``df`` (a store's records) measured in this context; ``slice_=False`` ignores the token
        slice (every slice of the same base, corpus, window, scoring and imatrix)."""
        m = (df["model_id"] == self.model_id) & (df["corpus"] == self.corpus) & (df["ctx"] == self.ctx)
        m &= df["scoring"].fillna(Scoring.windows.value) == self.scoring
        m &= same_imatrix(df["imatrix_id"], self.imatrix_id)
        if slice_:
            m &= (df["n_chunks"] == self.n_chunks) & (df["chunk_offset"] == self.chunk_offset)
        return m.fillna(False).astype(bool)

    def matches(self, values: dict) -> bool:
        """Whether one record (its values) was measured in this context."""
        return (values["model_id"], values["corpus"], values["ctx"], values["n_chunks"], values["chunk_offset"],
                values.get("scoring") or Scoring.windows.value, values.get("imatrix_id") or None) == (
            self.model_id, self.corpus, self.ctx, self.n_chunks, self.chunk_offset, self.scoring,
            self.imatrix_id)  # fmt: skip


def same_imatrix(column: pd.Series, imatrix_id: str | None) -> pd.Series:
    """Rows quantized with ``imatrix_id`` (None: rows quantized without an imatrix)."""
    if imatrix_id is None:
        return column.isna() | (column.astype("string").fillna("") == "")
    return column.astype("string") == imatrix_id
