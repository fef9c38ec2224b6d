"""The candidate space of one model: its assignable groups × allowed quant types.

Candidates are pure configs (a default type plus group types). Two candidates that make the same file
(same effective per-tensor types, after llama.cpp's fallbacks) are one candidate: the space
deduplicates by ``types_key``. On a 576-wide model most K-types fall back, so many nominal configs
collapse; the sizes are exact (header-only).

With an importance matrix the space also holds the types llama.cpp writes only with one (IQ3_XXS, IQ2_S,
IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S: :func:`space_types`, added whatever ``types`` says), and candidates resolve
knowing the imatrix (a group whose tensors it holds no weights for cannot take the types that need them).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mqpredict.errors import ConfigError
from mqpredict.quant.config import Config
from mqpredict.quant.groups import StandardGroup
from mqpredict.quant.imatrix import Imatrix
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.resolve import resolve, types_key
from mqpredict.quant.types import QuantType, T

#: the types a search considers by default (F16 too for embeddings/lm_head)
DEFAULT_TYPES: tuple[QuantType, ...] = (T.Q8_0, T.Q6_K, T.Q5_K, T.Q5_0, T.Q4_K, T.Q4_0, T.IQ4_NL, T.IQ4_XS, T.Q3_K, T.Q2_K)
#: added when an importance matrix is given: the types llama.cpp refuses to write without one
IMATRIX_EXTRA: tuple[QuantType, ...] = (T.IQ3_XXS, T.IQ2_S, T.IQ2_XS, T.IQ2_XXS, T.IQ1_M, T.IQ1_S)
EMBEDDING_EXTRA: tuple[QuantType, ...] = (T.F16,)
_OUTER = (StandardGroup.EMBEDDINGS.value, StandardGroup.LM_HEAD.value)


def space_types(imatrix: Imatrix | None, types: tuple[QuantType, ...] = DEFAULT_TYPES) -> tuple[QuantType, ...]:
    """The types a search considers: ``types``, plus the imatrix-only ones when there is an imatrix."""
    return types + tuple(t for t in IMATRIX_EXTRA if t not in types) if imatrix is not None else types


@dataclass
class CandidateSpace:
    model: ModelInfo
    types: tuple[QuantType, ...] = DEFAULT_TYPES
    imatrix: Imatrix | None = None

    def __post_init__(self) -> None:
        self.types = space_types(self.imatrix, tuple(self.types))  # with an imatrix, its types join
        self.groups = list(self.model.groups)
        self._seen: set[str] = set()

    def allowed(self, group: str) -> tuple[QuantType, ...]:
        return self.types + (EMBEDDING_EXTRA if group in _OUTER else ())

    def key(self, config: Config) -> str | None:
        """The candidate's file identity, or None if it cannot be built on this model."""
        try:
            return types_key(self.model, resolve(self.model, config, imatrix=self.imatrix))
        except ConfigError:
            return None

    def new(self, config: Config) -> bool:
        """True the first time a file is seen (marks it seen)."""
        k = self.key(config)
        if k is None or k in self._seen:
            return False
        self._seen.add(k)
        return True

    def probes(self, carrier: QuantType = T.Q8_0) -> Iterator[Config]:
        """Isolation probes: one group changed on an all-``carrier`` config."""
        for g in self.groups:
            for t in self.allowed(g):
                if t != carrier:
                    c = Config.pure(carrier, **{g: t})
                    if self.new(c):
                        yield c

    def sample(self, n: int, rng: np.random.Generator, max_tries: int = 50) -> list[Config]:
        """``n`` distinct random hybrids: a random default and 1…all groups set to random types."""
        out: list[Config] = []
        tries = 0
        while len(out) < n and tries < n * max_tries:
            tries += 1
            default = self.types[rng.integers(len(self.types))]
            k = int(rng.integers(1, len(self.groups) + 1))
            chosen = rng.choice(len(self.groups), size=k, replace=False)
            groups = {self.groups[i]: self.allowed(self.groups[i])[rng.integers(len(self.allowed(self.groups[i])))]
                      for i in chosen}  # fmt: skip
            c = Config(default=default, groups=tuple(groups.items()))
            if self.new(c):
                out.append(c)
        return out
