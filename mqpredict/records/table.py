"""What every records table (SQLite, CSV, Parquet) shares: its errors, the append rule, the read cache.

A :class:`Table` is the file (or database) inside a store folder that holds the rows; the folder, its
``STORE.json`` and the per-token vectors are :class:`~mqpredict.records.store.Store`'s. Every table
applies the same rule to an append (:func:`plan_append`): same key and same values → a duplicate,
skipped; same key and other values → a conflict, and nothing of that append is written; a ``failed``
record is superseded by a real measurement of the same key.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mqpredict.errors import MqError
from mqpredict.records.schema import COLUMN_NAMES, COLUMNS, Record, Status, format_value, parse_value
from mqpredict.util.atomic import atomic_write_text

LOCK_TIMEOUT = 600.0  # seconds another writer may hold the store
META = "STORE.json"  # the store's format (and, for CSV/Parquet, its schema version)


class StoreError(MqError):
    """The store on disk is unreadable or inconsistent (names the file and row)."""


class ConflictError(MqError):
    """Records with keys already in the store but different measured values."""

    def __init__(self, conflicts: list[tuple[Record, Record]]) -> None:
        first_old, first_new = conflicts[0]
        diff = sorted(k for k, v in first_new.measured().items() if first_old.measured().get(k) != v)
        super().__init__(
            f"{len(conflicts)} record(s) conflict with the store: key {first_new.key} "
            f"({first_new['config']}) differs in {', '.join(diff[:6])}",
            "nothing was written; a record is never silently overwritten — remove the old row by hand or "
            "measure into another store",
        )
        self.conflicts = conflicts


@dataclass
class AppendReport:
    added: list[Record] = field(default_factory=list)
    duplicates: list[Record] = field(default_factory=list)
    replaced: list[Record] = field(default_factory=list)  # failed records superseded by a real measurement

    def to_json(self) -> dict:
        return {"added": len(self.added), "duplicates": len(self.duplicates), "replaced": len(self.replaced)}


def read_meta(root: Path) -> dict | None:
    """The store's ``STORE.json`` (None: there is none)."""
    meta = root / META
    if not meta.exists():
        return None
    try:
        info = json.loads(meta.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise StoreError(f"{meta} is unreadable ({e})", 'restore it: it says the store\'s format, {"format": "sqlite"} '
                         'or e.g. {"format": "csv", "schema_version": 2}') from None  # fmt: skip
    return info


def write_meta(root: Path, info: dict) -> None:
    atomic_write_text(root / META, json.dumps(info) + "\n")


def normalized(r: Record) -> Record:
    """``r`` as any table gives it back: each value through its text form (floats round-trip exactly,
    NaN is empty, numpy scalars become Python ones), so a new record compares with a stored one as equals."""
    return Record({c.name: parse_value(c, format_value(c, r.values.get(c.name))) for c in COLUMNS})


def plan_append(stored: dict[str, Record], new: Iterable[Record]) -> tuple[AppendReport, list[tuple[Record, Record]]]:
    """What appending ``new`` does, given the stored records with the same keys (``stored`` is updated
    in place with what would be written: added and replaced records)."""
    report, conflicts = AppendReport(), []
    for r in new:
        old = stored.get(r.key)
        if old is None:
            stored[r.key] = r
            report.added.append(r)
        elif old.measured() == r.measured():
            report.duplicates.append(r)
        elif old["status"] == Status.failed and r["status"] != Status.failed:
            stored[r.key] = r
            report.replaced.append(r)
        else:
            conflicts.append((old, r))
    return report, conflicts


def frame(records: list[Record]) -> pd.DataFrame:
    """Records as a DataFrame with typed columns (one row per record)."""
    df = pd.DataFrame([r.values for r in records], columns=list(COLUMN_NAMES))
    for c in COLUMNS:
        if c.kind == "int":
            df[c.name] = df[c.name].astype("Int64")
        elif c.kind == "float":
            df[c.name] = df[c.name].astype("float64")
        elif c.kind == "bool":
            df[c.name] = df[c.name].astype("boolean")
    return df


class ReadCache:
    """The last few full reads of tables, by (table file, content token): a table read again unchanged
    costs a token check, not a re-read (a campaign reads its store several times per decision)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._items: OrderedDict[tuple, dict] = OrderedDict()

    def get(self, path: Path, token: Hashable) -> dict | None:
        key = (str(path), token)
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def put(self, path: Path, token: Hashable, records: list[Record]) -> dict:
        for k in [k for k in self._items if k[0] == str(path)]:  # an older state of the same table
            del self._items[k]
        entry = {"records": records}
        self._items[(str(path), token)] = entry
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._items.clear()


CACHE = ReadCache()


class Table(ABC):
    """The rows of one store. Implementations: SQLite (:mod:`.table_sqlite`), CSV/Parquet (:mod:`.table_file`)."""

    fmt: str
    path: Path  # the file (or database) holding the rows
    version: int  # schema version of what is on disk

    @abstractmethod
    def read(self) -> tuple[Hashable, list[Record]]:
        """A content token and every record (valid), in insertion order; cached while the token holds."""

    @abstractmethod
    def append(self, new: list[Record]) -> AppendReport:
        """Apply :func:`plan_append` to the stored records atomically; raises ConflictError (nothing written)."""

    @abstractmethod
    def set_run_ids(self, run_ids: dict[str, str]) -> int:
        """Set ``mlflow_run_id`` of stored records (by key); returns how many changed."""

    @abstractmethod
    def validate(self, root: Path) -> list[str]:
        """Every problem (empty: sound), per-token files under ``root`` included."""

    def close(self) -> None:
        """Release what the table holds open (nothing, for files)."""

    def keys(self) -> set[str]:
        return {r.key for r in self.read()[1]}

    def counts(self) -> dict[tuple[str, str, str, str], int]:
        """Records per (model, family, source, status)."""
        c: dict[tuple, int] = {}
        for r in self.read()[1]:
            k = (r["model_name"], r["family"], r["source"], r["status"])
            c[k] = c.get(k, 0) + 1
        return c
