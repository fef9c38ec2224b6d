"""Benchmark: the records store at community size — SQLite and CSV side by side in one run.

Both stores get the same ``n - 1`` records (the shipped dataset's real records, repeated under new keys
until there are enough) in one bulk append, untimed. Then, ``repeats`` times and alternating which
format goes first, each store is timed on:

* ``append_s`` — appending one more record (the ``n``-th, then ``n+1``-th …) as a process that has not
  read the store yet does it (``data import``, ``seed`` and ``measure`` runs, a second writer);
* ``append_warm_s`` — the same in a process that has already read the store unchanged (a campaign);
* ``load_s`` — ``Store.load()`` (every record as a DataFrame) in a process that has not read it yet;
* ``load_again_s`` — ``Store.load()`` again with nothing changed (a campaign reads its store several
  times per decision).

Medians are reported, and the CSV/SQLite ratios of ``append_s`` and ``load_s``.
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mqpredict.records.schema import Record
from mqpredict.records.store import Store, clear_cache
from mqpredict.util.paths import DATASETS

FORMATS = ("sqlite", "csv")
FIGURES = ("append_s", "append_warm_s", "load_s", "load_again_s")


@dataclass(frozen=True)
class FormatTimes:
    fmt: str
    append_s: float
    append_warm_s: float
    load_s: float
    load_again_s: float
    table_bytes: int  # size of the table file (or database) at the end


@dataclass(frozen=True)
class StoreBench:
    n_records: int
    repeats: int
    formats: tuple[FormatTimes, ...]

    def by(self, fmt: str) -> FormatTimes:
        return next(f for f in self.formats if f.fmt == fmt)

    @property
    def append_ratio(self) -> float:
        return self.by("csv").append_s / self.by("sqlite").append_s

    @property
    def load_ratio(self) -> float:
        return self.by("csv").load_s / self.by("sqlite").load_s

    def to_json(self) -> dict:
        return {"n_records": self.n_records, "repeats": self.repeats,
                "formats": {f.fmt: {k: v for k, v in asdict(f).items() if k != "fmt"} for f in self.formats},
                "append_ratio_csv_to_sqlite": self.append_ratio, "load_ratio_csv_to_sqlite": self.load_ratio}  # fmt: skip


def records(n: int) -> list[Record]:
    """``n`` valid records with distinct keys: the shipped dataset's, cycled, each under a new key."""
    shipped = Store(DATASETS / "records", create=False).records()
    out = []
    for i in range(n):
        r = shipped[i % len(shipped)]
        out.append(r.replace(key=hashlib.sha256(f"bench-store-{i}".encode()).hexdigest()[:20], per_token_path=None))
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(n: int = 10_000, repeats: int = 5, progress=lambda what, done, total: None) -> StoreBench:
    recs = records(n - 1 + 2 * repeats)
    times: dict[str, dict[str, list[float]]] = {f: {k: [] for k in FIGURES} for f in FORMATS}
    with tempfile.TemporaryDirectory(prefix="mqpredict-bench-store-") as tmp:
        roots = {f: Path(tmp) / f for f in FORMATS}
        for i, f in enumerate(FORMATS):
            progress(f"fill the stores with {n - 1:,} records", i, len(FORMATS))
            Store(roots[f], f).append(recs[: n - 1])
        progress(f"fill the stores with {n - 1:,} records", len(FORMATS), len(FORMATS))
        nxt = n - 1
        for rep in range(repeats):
            progress("timed runs", rep, repeats)
            for f in FORMATS if rep % 2 == 0 else FORMATS[::-1]:
                t = times[f]
                clear_cache()
                t["append_s"].append(_timed(lambda: Store(roots[f]).append([recs[nxt]])))
                st = Store(roots[f])
                st.records()  # this process has read the store
                t["append_warm_s"].append(_timed(lambda: st.append([recs[nxt + 1]])))
                clear_cache()
                t["load_s"].append(_timed(lambda: Store(roots[f]).load()))
                t["load_again_s"].append(_timed(lambda: Store(roots[f]).load()))
            nxt += 2
        progress("timed runs", repeats, repeats)
        sizes = {f: Store(roots[f]).table.stat().st_size for f in FORMATS}
    clear_cache()
    med = {f: {k: statistics.median(v) for k, v in times[f].items()} for f in FORMATS}
    return StoreBench(n, repeats, tuple(FormatTimes(f, **med[f], table_bytes=sizes[f]) for f in FORMATS))
