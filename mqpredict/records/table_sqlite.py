"""The SQLite table of a records store (the default for new stores): ``records.sqlite``, standard library only.

* One row per record in ``records`` (one typed column per schema column; ``key`` UNIQUE), and a
  ``meta`` table: ``schema_version``, ``store_id`` (random, set at creation) and ``generation`` (bumped
  by triggers on every insert/update/delete, so a reader knows in one query whether anything changed).
* WAL journal, ``synchronous=FULL``: readers never block the writer nor each other; each append is one
  ``BEGIN IMMEDIATE`` transaction (writers queue on SQLite's own lock, up to :data:`LOCK_TIMEOUT`),
  durable once it returns, and a process killed mid-append leaves nothing of it.
* An append reads only the stored rows with the new records' keys and inserts the new rows: its cost
  does not grow with the store. A full read checks every value's type and the required columns in one
  SQL query, and the enumerations (status, source, scoring); the other semantic checks ran when each record
  was appended, and ``validate`` re-runs them all.
* WAL needs a local filesystem (not NFS); a store on a network filesystem should be ``--format csv``.
"""

from __future__ import annotations

import atexit
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Hashable
from contextlib import contextmanager
from pathlib import Path

from mqpredict.measure.corpus import Scoring
from mqpredict.records.schema import (
    COLUMN_NAMES, COLUMNS, READABLE_VERSIONS, SCHEMA_VERSION, Record, RowError, Source, Status, format_value, parse_row,
    upgrade_row,
)  # fmt: skip
from mqpredict.records.table import (
    CACHE, LOCK_TIMEOUT, AppendReport, ConflictError, StoreError, Table, plan_append,
)  # fmt: skip
from mqpredict.util import faults

FILE = "records.sqlite"
_SQL_TYPE = {"int": "INTEGER", "float": "REAL", "bool": "INTEGER", "json": "TEXT", "str": "TEXT"}
_TYPEOF = {"int": "'integer'", "float": "'real','integer'", "bool": "'integer'", "json": "'text'", "str": "'text'"}
_COLS = ", ".join(f'"{c}"' for c in COLUMN_NAMES)
_BOOL = [c.name for c in COLUMNS if c.kind == "bool"]
_JSON = [c.name for c in COLUMNS if c.kind == "json"]
_ENUMS = (("status", Status), ("source", Source), ("scoring", Scoring))
_CHUNK = 500  # keys per IN (...) query


def _column_sql(c) -> str:
    return f'"{c.name}" {_SQL_TYPE[c.kind]}' + (" NOT NULL UNIQUE" if c.name == "key" else "")


_BUMP = "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE name = 'generation'"
_CREATE = [
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY, {', '.join(_column_sql(c) for c in COLUMNS)})",
    *(f"CREATE TRIGGER IF NOT EXISTS records_{op.lower()} AFTER {op} ON records BEGIN {_BUMP}; END"
      for op in ("INSERT", "UPDATE", "DELETE")),  # fmt: skip
]


def _to_db(r: Record) -> tuple:
    """A (normalized) record as the row's values, in column order."""
    out = []
    for c in COLUMNS:
        v = r.values.get(c.name)
        if v is None:
            out.append(None)
        elif c.kind == "bool":
            out.append(1 if v else 0)
        elif c.kind == "json":
            out.append(format_value(c, v))
        else:
            out.append(v)
    return tuple(out)


def _from_db(row: tuple) -> Record:
    values = dict(zip(COLUMN_NAMES, row))
    for name in _BOOL:
        if values[name] is not None:
            values[name] = bool(values[name])
    for name in _JSON:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    return Record(values)


def _text_row(names: list[str], row: tuple) -> dict[str, str]:
    """A stored row in its text form (what a CSV row would say), for validation and older versions."""
    kinds = {c.name: c for c in COLUMNS}
    out = {}
    for n, v in zip(names, row):
        if n == "id":
            continue
        c = kinds.get(n)
        if v is None:
            out[n] = ""
        elif c is not None and c.kind == "bool" and isinstance(v, int):
            out[n] = "true" if v else "false"
        elif isinstance(v, float):
            out[n] = repr(v)
        else:
            out[n] = str(v)
    return out


class SqliteTable(Table):
    fmt = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"{self.path} is missing", "the store's STORE.json says sqlite: restore the database "
                             "from a backup, or delete STORE.json to start an empty store")  # fmt: skip
        self._uri = self.path.resolve().as_uri() + "?mode=rw"
        with self._connect() as con:
            self.version = self._version(con)

    # ------------------------------------------------------------------------ connections
    @classmethod
    def create(cls, path: Path) -> SqliteTable:
        """A new empty table at ``path`` (or the one already there, if it is a records database)."""
        try:
            con = sqlite3.connect(path, timeout=LOCK_TIMEOUT, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"{path}: cannot create the database ({e})") from None
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("BEGIN IMMEDIATE")
            known = con.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
            for sql in _CREATE if known is None else []:
                con.execute(sql)
            if known is None:
                con.executemany("INSERT INTO meta VALUES (?, ?)", [("schema_version", str(SCHEMA_VERSION)),
                                ("store_id", uuid.uuid4().hex), ("generation", "0")])  # fmt: skip
            con.execute("COMMIT")
        except sqlite3.Error as e:
            raise _error(path, e) from None
        finally:
            con.close()
        return cls(path)

    @contextmanager
    def _connect(self):
        """This process's connection to the database, for this thread alone while it is used."""
        try:
            con, lock = _connection(self._uri)
        except sqlite3.Error as e:
            raise _error(self.path, e) from None
        with lock:
            try:
                yield con
            except sqlite3.Error as e:
                raise _error(self.path, e) from None

    def close(self) -> None:
        """Close this process's connection (the last one to close checkpoints the WAL into the database)."""
        _close(self._uri)

    @contextmanager
    def _transaction(self, write: bool):
        """One transaction: a consistent snapshot to read, or the database's write lock (``BEGIN IMMEDIATE``)."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield con
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def _version(self, con) -> int:
        try:
            meta = dict(con.execute("SELECT name, value FROM meta").fetchall())
            version = int(meta["schema_version"])
        except (sqlite3.OperationalError, KeyError, ValueError):
            raise StoreError(f"{self.path} is an SQLite database but not a records store (no schema version in "
                             "its meta table)", "check --store, or restore the database from a backup") from None  # fmt: skip
        if version not in READABLE_VERSIONS:
            raise StoreError(f"{self.path} holds schema version {version}; this mqpredict reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}", "upgrade mqpredict to read it")  # fmt: skip
        return version

    def _token(self, con) -> Hashable:
        return tuple(v for _, v in con.execute("SELECT name, value FROM meta WHERE name IN ('store_id', "
                                               "'generation') ORDER BY name").fetchall())  # fmt: skip

    # ------------------------------------------------------------------------------- read
    def read(self) -> tuple[Hashable, list[Record]]:
        with self._transaction(write=False) as con:
            token = self._token(con)
            hit = CACHE.get(self.path, token)
            if hit is not None:
                return token, hit["records"]
            self.version = self._version(con)
            if self.version != SCHEMA_VERSION:  # an older database: rows upgraded on read, as CSV rows are
                cur = con.execute("SELECT * FROM records ORDER BY id")
                names = [d[0] for d in cur.description]
                recs = [self._parse(names, row) for row in cur.fetchall()]
            else:
                self._check_types(con)
                recs = [_from_db(row) for row in con.execute(f"SELECT {_COLS} FROM records ORDER BY id")]
        CACHE.put(self.path, token, recs)
        return token, recs

    def _parse(self, names: list[str], row: tuple) -> Record:
        try:
            return parse_row(upgrade_row(_text_row(names, row)))
        except RowError as e:
            raise StoreError(f"{self.path} row {row[0]}: {'; '.join(e.reasons[:4])}",
                             "the database was edited by hand; `mqpredict data validate` lists every problem") from None  # fmt: skip

    def _check_types(self, con) -> None:
        """Every value of the type its column holds, every required column set — one query, in SQLite."""
        bad = " OR ".join([f'typeof("{c.name}") NOT IN ({_TYPEOF[c.kind]}, \'null\')' for c in COLUMNS]
                          + [f'"{c.name}" IS NULL' for c in COLUMNS if c.required]
                          + [f'"{n}" NOT IN ({", ".join(repr(v) for v in e.__members__)})' for n, e in _ENUMS]
                          + [f"schema_version != {SCHEMA_VERSION}"])  # fmt: skip
        row = con.execute(f"SELECT id FROM records WHERE {bad} LIMIT 1").fetchone()
        if row is not None:
            cur = con.execute("SELECT * FROM records WHERE id = ?", row)
            self._parse([d[0] for d in cur.description], cur.fetchone())  # raises with the reasons, if it can tell
            raise StoreError(f"{self.path} row {row[0]}: a value of the wrong type",
                             "the database was edited by hand; `mqpredict data validate` lists every problem")  # fmt: skip

    def keys(self) -> set[str]:
        with self._connect() as con:
            return {k for (k,) in con.execute('SELECT "key" FROM records')}

    def counts(self) -> dict[tuple[str, str, str, str], int]:
        with self._connect() as con:
            rows = con.execute("SELECT model_name, family, source, status, COUNT(*) FROM records "
                               "GROUP BY model_name, family, source, status").fetchall()  # fmt: skip
        return {tuple(r[:4]): r[4] for r in rows}

    # ------------------------------------------------------------------------------ write
    def _stored(self, con, keys: list[str]) -> dict[str, Record]:
        out = {}
        for i in range(0, len(keys), _CHUNK):
            part = keys[i : i + _CHUNK]
            q = f'SELECT {_COLS} FROM records WHERE "key" IN ({", ".join("?" * len(part))})'
            out.update((r.key, r) for r in map(_from_db, con.execute(q, part)))
        return out

    def _upgrade(self, con) -> None:
        """An older database brought to today's schema inside the write transaction (once)."""
        if self._version(con) == SCHEMA_VERSION:
            return
        cur = con.execute("SELECT * FROM records ORDER BY id")
        names = [d[0] for d in cur.description]
        rows = cur.fetchall()
        for c in COLUMNS:
            if c.name not in names:
                con.execute(f"ALTER TABLE records ADD COLUMN {_column_sql(c)}")
        sets = ", ".join(f'"{n}" = ?' for n in COLUMN_NAMES)
        con.executemany(f"UPDATE records SET {sets} WHERE id = ?", [(*_to_db(self._parse(names, r)), r[0]) for r in rows])
        con.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION),))
        self.version = SCHEMA_VERSION

    def append(self, new: list[Record]) -> AppendReport:
        with self._transaction(write=True) as con:
            self._upgrade(con)
            stored = self._stored(con, list(dict.fromkeys(r.key for r in new)))
            report, conflicts = plan_append(stored, new)
            if conflicts:
                raise ConflictError(conflicts)  # rolled back: nothing of this append is written
            marks = ", ".join("?" * len(COLUMN_NAMES))
            con.executemany(f"INSERT INTO records ({_COLS}) VALUES ({marks})", [_to_db(r) for r in report.added])
            sets = ", ".join(f'"{n}" = ?' for n in COLUMN_NAMES)
            con.executemany(f'UPDATE records SET {sets} WHERE "key" = ?', [(*_to_db(r), r.key) for r in report.replaced])
            if report.added or report.replaced:
                faults.point("store", f"{(report.added or report.replaced)[0].key}:append")  # not yet committed
        return report

    def set_run_ids(self, run_ids: dict[str, str]) -> int:
        with self._transaction(write=True) as con:
            self._upgrade(con)
            todo = [(rid, k, rid) for k, rid in run_ids.items() if rid]
            if not todo:
                return 0
            cur = con.executemany('UPDATE records SET mlflow_run_id = ? WHERE "key" = ? AND mlflow_run_id IS NOT ?', todo)
            return cur.rowcount  # rows changed by the statement itself (not the triggers' meta updates)

    # --------------------------------------------------------------------------- validate
    def validate(self, root: Path) -> list[str]:
        problems = []
        try:
            with self._transaction(write=False) as con:
                check = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
                if check != ["ok"]:
                    return [f"SQLite integrity check: {c}" for c in check[:20]]
                self._version(con)
                cur = con.execute("SELECT * FROM records ORDER BY id")
                names = [d[0] for d in cur.description]
                rows = cur.fetchall()
        except StoreError as e:
            return [e.message]
        missing = [c for c in COLUMN_NAMES if c not in names and c != "scoring"]
        if missing:
            return [f"missing column(s) {', '.join(missing)}"]
        for row in rows:
            text = upgrade_row(_text_row(names, row))
            where = f"row {row[0]} (key {text.get('key') or '?'})"
            try:
                r = parse_row(text)
            except RowError as e:
                problems += [f"{where}: {reason}" for reason in e.reasons]
                continue
            pt = r["per_token_path"]
            if pt and not (root / pt).exists():
                problems.append(f"{where}: per-token vector {pt} is missing")
        return problems


# One connection per database and process, shared by every Store on it and kept open: closing the last
# connection checkpoints the WAL, which an append should not pay every time (and Python's sqlite3
# connections sit in reference cycles, so one per Store object would stay open until a garbage collection).
_OPEN: dict[tuple[int, str], tuple[sqlite3.Connection, threading.RLock]] = {}
_OPEN_LOCK = threading.Lock()


def _connection(uri: str) -> tuple[sqlite3.Connection, threading.RLock]:
    key = (os.getpid(), uri)  # a child process after fork opens its own
    with _OPEN_LOCK:
        got = _OPEN.get(key)
        if got is None:
            con = sqlite3.connect(uri, uri=True, timeout=LOCK_TIMEOUT, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA synchronous=FULL")
            got = _OPEN[key] = (con, threading.RLock())
        return got


def _close(uri: str) -> None:
    with _OPEN_LOCK:
        got = _OPEN.pop((os.getpid(), uri), None)
    if got is not None:
        with got[1]:
            got[0].close()


@atexit.register
def _close_all() -> None:
    for pid, uri in list(_OPEN):
        if pid == os.getpid():
            _close(uri)


def _error(path: Path, e: sqlite3.Error) -> StoreError:
    text = str(e)
    if "locked" in text or "busy" in text:
        return StoreError(f"{path} has been locked by another writer for {LOCK_TIMEOUT:.0f} s",
                          "wait for it to finish (SQLite's locks go away with the process holding them; a "
                          "store on a network filesystem can keep a stale one: keep stores on a local disk)")  # fmt: skip
    return StoreError(f"{path} is not a readable records database ({text})",
                      "restore it from a backup, or export what is readable with the sqlite3 shell (.recover)")  # fmt: skip
