"""The records store: a directory of measurement records, safe to share and to write concurrently.

Layout::

    STORE.json           format and schema version
    records.csv          one row per record (or records.parquet; same text columns)
    per_token/KEY.npy    per-token KLD vectors (float32) and KEY.scores.npz beside them
    .lock                the file lock writers take

Every append takes the lock, reads the store, checks the new records against it and writes the whole
table to a temporary file that replaces the old one in one rename (fsync'd). So two processes never
interleave, and a process killed at any moment leaves the store as it was before its last append or
after it — never half-written. Same key and same values: skipped as a duplicate. Same key and other
values: a conflict, reported, and nothing of that append is written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from filelock import FileLock, Timeout

from mqpredict.errors import InputError, MqError
from mqpredict.records.schema import (
    COLUMN_NAMES, COLUMNS, READABLE_VERSIONS, SCHEMA_VERSION, Record, RowError, Status, parse_row, upgrade_row,
)  # fmt: skip
from mqpredict.util import faults
from mqpredict.util.atomic import atomic_open, atomic_write_text

FORMATS = ("csv", "parquet")
LOCK_TIMEOUT = 600.0  # seconds another writer may hold the store


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


def default_store() -> Path:
    """``$MQPREDICT_STORE``, else ``records/`` under the current directory."""
    return Path(os.environ.get("MQPREDICT_STORE") or "records")


class Store:
    def __init__(self, root: str | os.PathLike, fmt: str | None = None, *, create: bool = True) -> None:
        self.root = Path(root)
        meta = self.root / "STORE.json"
        if meta.exists():
            try:
                info = json.loads(meta.read_text())
            except (OSError, ValueError) as e:
                raise StoreError(f"{meta} is unreadable ({e})", "restore it or delete it to let mqpredict rewrite it")
            if info.get("schema_version") not in READABLE_VERSIONS:
                raise StoreError(f"{self.root} holds schema version {info.get('schema_version')}; this mqpredict "
                                 f"reads versions {', '.join(map(str, READABLE_VERSIONS))}",
                                 "upgrade mqpredict to read it")  # fmt: skip
            self.version = info["schema_version"]
            self.fmt = info.get("format", "csv")
            if fmt and fmt != self.fmt:
                raise InputError(f"{self.root} is a {self.fmt} store, not {fmt}")
        else:
            if not create:
                raise InputError(f"{self.root} is not a records store (no STORE.json)", "check --store")
            self.fmt = fmt or "csv"
            if self.fmt not in FORMATS:
                raise InputError(f"store format {self.fmt!r} is not one of {', '.join(FORMATS)}")
            self.root.mkdir(parents=True, exist_ok=True)
            self.version = SCHEMA_VERSION
            self._write_meta()
        self.lock = FileLock(str(self.root / ".lock"))

    def _write_meta(self) -> None:
        atomic_write_text(self.root / "STORE.json", json.dumps({"schema_version": SCHEMA_VERSION, "format": self.fmt}) + "\n")

    @property
    def table(self) -> Path:
        return self.root / f"records.{self.fmt}"

    # ------------------------------------------------------------------------------- read
    def _rows(self) -> list[dict[str, str]]:
        if not self.table.exists():
            return []
        if self.fmt == "parquet":
            df = pd.read_parquet(self.table)
            return [upgrade_row({k: ("" if v is None else str(v)) for k, v in r.items()}) for r in df.to_dict("records")]
        with open(self.table, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                return []
            missing = [c for c in COLUMN_NAMES if c not in reader.fieldnames and not (c == "scoring" and self.version == 1)]
            if missing:
                raise StoreError(f"{self.table}: missing column(s) {', '.join(missing)}", "the file was edited by hand")
            rows = []
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise StoreError(f"{self.table} row {reader.line_num}: wrong number of fields",
                                     "the file was edited by hand; fix or remove that row")  # fmt: skip
                rows.append(upgrade_row(row))
            return rows

    def records(self) -> list[Record]:
        """Every record, validated; a bad row raises naming the file and row."""
        out, seen = [], {}
        for i, row in enumerate(self._rows(), start=2):
            try:
                r = parse_row(row)
            except RowError as e:
                raise StoreError(f"{self.table} row {i}: {'; '.join(e.reasons[:4])}",
                                 "the file was edited by hand; `mqpredict data validate` lists every problem")  # fmt: skip
            if r.key in seen:
                raise StoreError(f"{self.table} rows {seen[r.key]} and {i} have the same key {r.key}")
            seen[r.key] = i
            out.append(r)
        return out

    def keys(self) -> set[str]:
        return {r.key for r in self.records()}

    def load(self) -> pd.DataFrame:
        """The records as a DataFrame with typed columns (one row per record)."""
        recs = self.records()
        df = pd.DataFrame([r.values for r in recs], columns=list(COLUMN_NAMES))
        for c in COLUMNS:
            if c.kind == "int":
                df[c.name] = df[c.name].astype("Int64")
            elif c.kind == "float":
                df[c.name] = df[c.name].astype("float64")
            elif c.kind == "bool":
                df[c.name] = df[c.name].astype("boolean")
        return df

    def validate(self) -> list[str]:
        """Every problem in the store (empty when it is sound)."""
        problems, seen = [], {}
        try:
            rows = self._rows()
        except (StoreError, OSError, ValueError) as e:
            return [str(e)]
        for i, row in enumerate(rows, start=2):
            try:
                r = parse_row(row)
            except RowError as e:
                problems += [f"row {i}: {reason}" for reason in e.reasons]
                continue
            if r.key in seen:
                problems.append(f"rows {seen[r.key]} and {i}: same key {r.key}")
            seen[r.key] = i
            pt = r["per_token_path"]
            if pt and not (self.root / pt).exists():
                problems.append(f"row {i}: per-token vector {pt} is missing")
        return problems

    # ------------------------------------------------------------------------------ write
    def _write(self, records: list[Record]) -> None:
        rows = [r.to_row() for r in records]
        if self.fmt == "parquet":
            buf = io.BytesIO()
            pd.DataFrame(rows, columns=list(COLUMN_NAMES), dtype="string").to_parquet(buf, index=False)
            with atomic_open(self.table, fsync=True) as f:
                f.write(buf.getvalue())
            self._upgraded()
            return
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=list(COLUMN_NAMES), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        with atomic_open(self.table, fsync=True) as f:
            f.write(text.getvalue().encode("utf-8"))
        self._upgraded()

    def _upgraded(self) -> None:
        """The table was rewritten in today's schema: say so in STORE.json (an older store is upgraded once)."""
        if self.version != SCHEMA_VERSION:
            self._write_meta()
            self.version = SCHEMA_VERSION

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
        try:
            with self.lock.acquire(timeout=LOCK_TIMEOUT):
                current = {r.key: r for r in self.records()}
                report, conflicts = AppendReport(), []
                for r in new:
                    old = current.get(r.key)
                    if old is None:
                        current[r.key] = r
                        report.added.append(r)
                    elif old.measured() == r.measured():
                        report.duplicates.append(r)
                    elif old["status"] == Status.failed and r["status"] != Status.failed:
                        current[r.key] = r
                        report.replaced.append(r)
                    else:
                        conflicts.append((old, r))
                if conflicts:
                    raise ConflictError(conflicts)
                if report.added or report.replaced:
                    faults.point("store", f"{(report.added or report.replaced)[0].key}:append")  # lock held
                    self._write(list(current.values()))
                return report
        except Timeout:
            raise StoreError(f"{self.root} has been locked by another writer for {LOCK_TIMEOUT:.0f} s",
                             f"wait for it, or remove {self.root / '.lock'} if no mqpredict process is running") from None  # fmt: skip

    def set_run_ids(self, run_ids: dict[str, str]) -> int:
        """Record MLflow run ids (a volatile field: no conflict) for records already stored."""
        with self.lock.acquire(timeout=LOCK_TIMEOUT):
            recs = self.records()
            n = 0
            for i, r in enumerate(recs):
                rid = run_ids.get(r.key)
                if rid and r["mlflow_run_id"] != rid:
                    recs[i] = r.replace(mlflow_run_id=rid)
                    n += 1
            if n:
                self._write(recs)
            return n

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

    def counts(self) -> list[dict]:
        """Records per (model, source, status)."""
        recs = self.records()
        c: dict[tuple, int] = {}
        for r in recs:
            k = (r["model_name"], r["family"], r["source"], r["status"])
            c[k] = c.get(k, 0) + 1
        return [{"model": m, "family": f, "source": s, "status": st, "count": n} for (m, f, s, st), n in sorted(c.items())]
