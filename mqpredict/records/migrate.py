"""``mqpredict data migrate``: a CSV or Parquet store made an SQLite store, once, in place.

Explicit, never on a write: the shipped dataset (``datasets/records``) is a CSV store on purpose (it
diffs in git) and must stay one when someone appends to it. Under the store's lock (CSV/Parquet
writers wait; one that opened the store before re-checks its format and stops), every row is read and
validated first — a bad row stops the migration and nothing is written —, the database is built beside
the table and renamed into place, and ``STORE.json`` switches the format in one atomic write. The old
table stays as ``records.csv.migrated`` until you delete it; per-token vectors stay where they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from filelock import Timeout

from mqpredict.records.store import Store
from mqpredict.records.table import LOCK_TIMEOUT, StoreError, write_meta
from mqpredict.records.table_file import FileTable
from mqpredict.records.table_sqlite import FILE, SqliteTable


@dataclass(frozen=True)
class Migration:
    store: Path
    old_format: str
    records: int
    kept: Path | None  # the old table, renamed (None: nothing was migrated)

    @property
    def message(self) -> str:
        if self.kept is None:
            return f"{self.store} is already an SQLite store ({self.records} records); nothing to do"
        return (f"{self.store}: {self.records} records migrated from {self.old_format} to SQLite ({FILE}); the old "
                f"table is kept as {self.kept.name} — delete it when you no longer need it")  # fmt: skip

    def to_json(self) -> dict:
        return {"store": str(self.store), "from": self.old_format, "to": "sqlite", "records": self.records,
                "kept": str(self.kept) if self.kept else None}  # fmt: skip


def migrate(root: str | os.PathLike) -> Migration:
    st = Store(root, create=False)
    if st.fmt == "sqlite":
        return Migration(st.root, "sqlite", len(st.keys()), None)
    table = st._table
    assert isinstance(table, FileTable)
    try:
        lock = table.lock.acquire(timeout=LOCK_TIMEOUT)
    except Timeout:
        raise StoreError(f"{st.root} has been locked by another writer for {LOCK_TIMEOUT:.0f} s",
                         "wait for it to finish and migrate again") from None  # fmt: skip
    with lock:
        table._still_mine()
        records = table.read()[1]  # every row validated: a bad one raises before anything is written
        db, part = st.root / FILE, st.root / f".{FILE}.part"
        for p in (part, *_sidecars(part), *_sidecars(db)):  # leftovers of an interrupted migration
            p.unlink(missing_ok=True)
        try:
            new = SqliteTable.create(part)
            try:
                new.append(records)
                if sorted(new.keys()) != sorted(r.key for r in records):
                    raise StoreError(f"{part}: the migrated database does not hold the store's records", "report this bug")
            finally:
                new.close()  # its only connection: the WAL is checkpointed into the file and removed
            if any(p.exists() for p in _sidecars(part)):
                raise StoreError(f"{part}: the database was not checkpointed", "migrate again")
            os.replace(part, db)
        except BaseException:
            for p in (part, *_sidecars(part)):
                p.unlink(missing_ok=True)
            raise
        write_meta(st.root, {"format": "sqlite"})  # the switch: from here on the store is SQLite
        kept = table.path.with_name(table.path.name + ".migrated")
        os.replace(table.path, kept)
    return Migration(st.root, table.fmt, len(records), kept)


def _sidecars(db: Path) -> tuple[Path, Path]:
    return db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")
