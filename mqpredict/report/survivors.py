"""Which measured configs survive: rules in the manner of MagicQuant, thresholds configurable.

1. **Dominance**: only the Pareto front over (size, KLD) of every fully measured config.
2. **Wins stay**: a re-confirmed nonlinear win on the front is kept (of near-duplicates, see 4).
3. **Size premium only for a real gain**: walking the front from small to large, a bigger config is kept
   only if its KLD is lower than the last survivor's by more than ``min_gain`` (in ln KLD) *and*
   significantly so on the same tokens (paired block error, one-sided t test at level ``alpha``).
4. **Near-duplicates collapse**: a config closer than ``spacing_bpw`` to the last survivor replaces it
   with a real gain (rule 3), or when it is a win and the survivor is not; otherwise the smaller stays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mqpredict.search.paired import Paired


@dataclass(frozen=True)
class Rules:
    spacing_bpw: float = 0.1
    min_gain: float = 0.02
    alpha: float = 0.05  # one-sided level of the paired test of a real gain


@dataclass(frozen=True)
class Entry:
    key: str  # record key
    name: str
    config: str
    source: str
    size_bytes: int
    bpw: float
    kld_mean: float
    win: bool = False


def pareto(entries: list[Entry]) -> list[Entry]:
    """Configs no other config beats on both size and KLD (ties: the smaller file)."""
    front: list[Entry] = []
    for e in sorted(entries, key=lambda e: (e.size_bytes, e.kld_mean)):
        if not front or e.kld_mean < front[-1].kld_mean:
            front.append(e)
    return front


def select(entries: list[Entry], rules: Rules, compare: Callable[[Entry, Entry], Paired]) -> list[Entry]:
    """The survivors; ``compare(a, b)`` is the paired ``ln KLD(a) − ln KLD(b)`` on the same tokens."""
    out: list[Entry] = []
    for e in pareto(entries):
        if not out:
            out.append(e)
            continue
        prev = out[-1]
        d = compare(e, prev)
        real = -d.diff > rules.min_gain and d.below(rules.alpha)
        if e.bpw - prev.bpw < rules.spacing_bpw:  # a near-duplicate of the last survivor: one of them stays
            if real or (e.win and not prev.win):
                out[-1] = e
        elif real or e.win:
            out.append(e)
    return out
