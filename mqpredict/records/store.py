"""The records store: a folder of measurement records, safe to share and to write concurrently.

Layout::

    STORE.json           the format: {"format": "sqlite"} (the default), or csv/parquet with their schema version
    records.sqlite       one row per record (SQLite, WAL; the schema version is inside the database),
                         or records.csv / records.parquet (the same text columns)
    per_token/KEY.npy    per-token KLD vectors (float32) and KEY.scores.npz beside them
    .lock                the file lock that creation, migration and CSV/Parquet appends take

``Store.append`` is atomic and idempotent in every format: same key and same values → skipped as a
duplicate; same key and other values → a conflict, reported, and nothing of that append is written; a
``failed`` record is superseded by a real measurement of the same key. Two processes appending at once
lose nothing; a process killed at any moment leaves the store as it was before its last append or after
it. An SQLite append costs the same whatever the store holds; a CSV/Parquet append rewrites the table
(see :mod:`.table_sqlite` and :mod:`.table_file`). Full reads are cached while the table is unchanged.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from filelock import FileLock, Timeout

from mqpredict.errors import InputError
from mqpredict.records.schema import READABLE_VERSIONS, SCHEMA_VERSION, Record, check
from mqpredict.records.table import (
    CACHE, LOCK_TIMEOUT, META, AppendReport, ConflictError, StoreError, Table, frame, normalized, read_meta, write_meta,
)  # fmt: skip
from mqpredict.records.table_file import FileTable
from mqpredict.records.table_sqlite import FILE as SQLITE_FILE
from mqpredict.records.table_sqlite import SqliteTable
from mqpredict.util import faults
from mqpredict.util.atomic import atomic_open

FORMATS = ("sqlite", "csv", "parquet")
DEFAULT_FORMAT = "sqlite"

__all__ = ["FORMATS", "AppendReport", "ConflictError", "Store", "StoreError", "default_store"]


def default_store() -> Path:
    """``$MQPREDICT_STORE``, else ``records/`` under the current directory."""
    return Path(os.environ.get("MQPREDICT_STORE") or "records")


class Store:
    """A records store folder (see the module doc). ``fmt`` chooses the format of a new store (default
    sqlite); an existing store keeps its own (asking for another is an error)."""

    def __init__(self, root: str | os.PathLike, fmt: str | None = None, *, create: bool = True) -> None:
        self.root = Path(root)
        if fmt is not None and fmt not in FORMATS:
            raise InputError(f"store format {fmt!r} is not one of {', '.join(FORMATS)}")
        info = read_meta(self.root)
        if info is None:
            if not create:
                raise InputError(f"{self.root} is not a records store (no {META})", "check --store")
            info = self._create(fmt)
        self.fmt = info.get("format", "csv")
        if self.fmt not in FORMATS:
            raise StoreError(f"{self.root / META} names format {self.fmt!r}; this mqpredict reads "
                             f"{', '.join(FORMATS)}", "upgrade mqpredict to read it")  # fmt: skip
        if fmt and fmt != self.fmt:
            raise InputError(f"{self.root} is a {self.fmt} store, not {fmt}",
                             "leave out --format, or `mqpredict data migrate` it" if fmt == "sqlite" else None)  # fmt: skip
        self._table: Table
        if self.fmt == "sqlite":
            self._table = SqliteTable(self.root / SQLITE_FILE)
        else:
            if info.get("schema_version") not in READABLE_VERSIONS:
                raise StoreError(f"{self.root} holds schema version {info.get('schema_version')}; this mqpredict "
                                 f"reads versions {', '.join(map(str, READABLE_VERSIONS))}",
                                 "upgrade mqpredict to read it")  # fmt: skip
            self._table = FileTable(self.root, self.fmt, info["schema_version"])

    def _create(self, fmt: str | None) -> dict:
        """A new store, made under the folder's lock (two processes creating it at once make one store)."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(self.root / ".lock")).acquire(timeout=LOCK_TIMEOUT):
                info = read_meta(self.root)
                if info is not None:  # the other process made it meanwhile
                    return info
                fmt = fmt or DEFAULT_FORMAT
                orphan = [f for f in FORMATS if f != "sqlite" and (self.root / _table_name(f)).exists()]
                if orphan:  # never hidden behind a new empty store, never guessed
                    raise StoreError(f"{self.root} holds {_table_name(orphan[0])} but no {META}",
                                     f'restore {META} (e.g. {{"format": "{orphan[0]}", "schema_version": 2}}) '
                                     "or move the table elsewhere")  # fmt: skip
                if fmt == "sqlite" or (self.root / SQLITE_FILE).exists():
                    # (a database left by a creation that stopped before STORE.json is taken over as it is)
                    fmt = "sqlite"
                    SqliteTable.create(self.root / SQLITE_FILE).close()
                    info = {"format": "sqlite"}  # the schema version lives in the database
                else:
                    info = {"schema_version": SCHEMA_VERSION, "format": fmt}
                write_meta(self.root, info)
                return info
        except Timeout:
            raise StoreError(f"{self.root} has been locked for {LOCK_TIMEOUT:.0f} s",
                             f"remove {self.root / '.lock'} if no mqpredict process is running") from None  # fmt: skip

    def close(self) -> None:
        """Close the database connection this thread holds (SQLite; it also closes when the store is freed)."""
        self._table.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def table(self) -> Path:
        """The file (or database) holding the rows."""
        return self._table.path

    @property
    def version(self) -> int:
        return self._table.version

    # ------------------------------------------------------------------------------- read
    def records(self) -> list[Record]:
        """Every record, in the order they were stored; a bad row raises naming the file and row."""
        return list(self._table.read()[1])

    def keys(self) -> set[str]:
        return self._table.keys()

    def load(self) -> pd.DataFrame:
        """The records as a DataFrame with typed columns (one row per record): a fresh copy each call, built
        once per state of the store."""
        token, recs = self._table.read()
        entry = CACHE.get(self.table, token) or {}
        if "frame" not in entry:
            entry["frame"] = frame(recs)
        return entry["frame"].copy()

    def validate(self) -> list[str]:
        """Every problem in the store (empty when it is sound)."""
        return self._table.validate(self.root)

    def counts(self) -> list[dict]:
        """Records per (model, family, source, status)."""
        c = self._table.counts()
        return [{"model": m, "family": f, "source": s, "status": st, "count": n} for (m, f, s, st), n in sorted(c.items())]

    # ------------------------------------------------------------------------------ write
    def append(self, new: Iterable[Record]) -> AppendReport:
        """Add records atomically and idempotently (see the module doc); raises ConflictError."""
        new = list(new)
        lost = [r for r in new if r["per_token_path"] and not (self.root / r["per_token_path"]).exists()]
        if lost:
            raise StoreError(
                f"record {lost[0].key} ({lost[0]['config']}) points at per-token vector {lost[0]['per_token_path']}, "
                f"which is not in {self.root}",
                "attach the vector to this store first (Store.attach_vector) or drop per_token_path",
            )
        checked = []
        for r in new:
            try:
                n = normalized(r)
            except (ValueError, TypeError) as e:
                bad = [str(e)]
            else:
                bad = check(n.values)
            if bad:
                raise StoreError(f"record {r.key} ({r['config']}) is not valid: {'; '.join(bad[:4])}; nothing was "
                                 "written")  # fmt: skip
            checked.append(n)
        if not checked:
            return AppendReport()
        return self._table.append(checked)

    def set_run_ids(self, run_ids: dict[str, str]) -> int:
        """Record MLflow run ids (a volatile field: no conflict) for records already stored."""
        return self._table.set_run_ids(run_ids)

    def attach_vector(self, key: str, kld_npy: str | os.PathLike) -> str:
        """Copy a per-token vector (and its .scores.npz) into the store; returns its path relative to it."""
        src = Path(kld_npy)
        rel = Path("per_token") / f"{key}.kld.npy"
        dst = self.root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        for s, d in ((src, dst), (src.with_name(src.name.replace(".kld.npy", ".scores.npz")),
                                  dst.with_name(f"{key}.scores.npz"))):  # fmt: skip
            if s.exists():
                with open(s, "rb") as fin, atomic_open(d) as fout:
                    shutil.copyfileobj(fin, fout)
                faults.point("store", f"{key}:{d.name.removeprefix(key)}")  # one of the two files copied
        return str(rel)


def _table_name(fmt: str) -> str:
    return SQLITE_FILE if fmt == "sqlite" else f"records.{fmt}"


def clear_cache() -> None:
    """Forget every cached read (benchmarks time cold reads)."""
    CACHE.clear()
