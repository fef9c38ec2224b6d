"""The CSV and Parquet tables of a records store: the exchange formats and the shipped dataset (CSV diffs in git).

Every append takes the store's file lock (``.lock``), reads the table, checks the new records against it
and writes the whole table to a temporary file that replaces the old one in one rename (fsync'd). So two
processes never interleave, and a process killed at any moment leaves the table as it was before its
last append or after it — never half-written. The cost of an append grows with the table (it is
rewritten): a store that keeps growing belongs in SQLite (``mqpredict data migrate``).

Reading validates every row (a CSV can be edited by hand); a table read again with the same bytes is
not parsed again (:data:`~mqpredict.records.table.CACHE`, keyed by the bytes' sha256).
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Hashable
from pathlib import Path

import pandas as pd
from filelock import FileLock, Timeout

from mqpredict.records.schema import (
    COLUMN_NAMES, SCHEMA_VERSION, Record, RowError, parse_row, upgrade_row,
)  # fmt: skip
from mqpredict.records.table import (
    CACHE, LOCK_TIMEOUT, AppendReport, ConflictError, StoreError, Table, plan_append, read_meta, write_meta,
)  # fmt: skip
from mqpredict.util import faults
from mqpredict.util.atomic import atomic_open


class FileTable(Table):
    def __init__(self, root: Path, fmt: str, version: int) -> None:
        self.root, self.fmt, self.version = Path(root), fmt, version
        self.path = self.root / f"records.{fmt}"
        self.lock = FileLock(str(self.root / ".lock"))

    # ------------------------------------------------------------------------------- read
    def _rows(self, data: bytes) -> list[dict[str, str]]:
        if self.fmt == "parquet":
            df = pd.read_parquet(io.BytesIO(data))
            return [upgrade_row({k: ("" if v is None else str(v)) for k, v in r.items()}) for r in df.to_dict("records")]
        reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
        if reader.fieldnames is None:
            return []
        missing = [c for c in COLUMN_NAMES if c not in reader.fieldnames and not (c == "scoring" and self.version == 1)]
        if missing:
            raise StoreError(f"{self.path}: missing column(s) {', '.join(missing)}", "the file was edited by hand")
        rows = []
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise StoreError(f"{self.path} row {reader.line_num}: wrong number of fields",
                                 "the file was edited by hand; fix or remove that row")  # fmt: skip
            rows.append(upgrade_row(row))
        return rows

    def _bytes(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as e:
            raise StoreError(f"{self.path} is unreadable ({e})") from None

    def read(self) -> tuple[Hashable, list[Record]]:
        data = self._bytes()
        token = (self.version, hashlib.sha256(data).hexdigest())
        hit = CACHE.get(self.path, token)
        if hit is not None:
            return token, hit["records"]
        out, seen = [], {}
        for i, row in enumerate(self._rows(data) if data else [], start=2):
            try:
                r = parse_row(row)
            except RowError as e:
                raise StoreError(f"{self.path} row {i}: {'; '.join(e.reasons[:4])}",
                                 "the file was edited by hand; `mqpredict data validate` lists every problem") from None  # fmt: skip
            if r.key in seen:
                raise StoreError(f"{self.path} rows {seen[r.key]} and {i} have the same key {r.key}")
            seen[r.key] = i
            out.append(r)
        CACHE.put(self.path, token, out)
        return token, out

    def validate(self, root: Path) -> list[str]:
        problems, seen = [], {}
        try:
            data = self._bytes()
            rows = self._rows(data) if data else []
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
            if pt and not (root / pt).exists():
                problems.append(f"row {i}: per-token vector {pt} is missing")
        return problems

    # ------------------------------------------------------------------------------ write
    def _locked(self):
        try:
            return self.lock.acquire(timeout=LOCK_TIMEOUT)
        except Timeout:
            raise StoreError(f"{self.root} has been locked by another writer for {LOCK_TIMEOUT:.0f} s",
                             f"wait for it, or remove {self.root / '.lock'} if no mqpredict process is running") from None  # fmt: skip

    def _still_mine(self) -> None:
        """Under the lock: the store is still this format (``data migrate`` may have moved it since it was opened)."""
        info = read_meta(self.root) or {}
        if info.get("format", "csv") != self.fmt:
            raise StoreError(f"{self.root} was migrated to {info.get('format')} while this process ran; nothing "
                             "was written", "run the command again")  # fmt: skip

    def _write(self, records: list[Record]) -> None:
        rows = [r.to_row() for r in records]
        if self.fmt == "parquet":
            buf = io.BytesIO()
            pd.DataFrame(rows, columns=list(COLUMN_NAMES), dtype="string").to_parquet(buf, index=False)
            data = buf.getvalue()
        else:
            text = io.StringIO()
            w = csv.DictWriter(text, fieldnames=list(COLUMN_NAMES), lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
            data = text.getvalue().encode("utf-8")
        with atomic_open(self.path, fsync=True) as f:
            f.write(data)
        if self.version != SCHEMA_VERSION:  # rewritten in today's schema: an older store is upgraded once
            write_meta(self.root, {"schema_version": SCHEMA_VERSION, "format": self.fmt})
            self.version = SCHEMA_VERSION
        CACHE.put(self.path, (self.version, hashlib.sha256(data).hexdigest()), records)

    def append(self, new: list[Record]) -> AppendReport:
        with self._locked():
            self._still_mine()
            current = {r.key: r for r in self.read()[1]}
            report, conflicts = plan_append(current, new)
            if conflicts:
                raise ConflictError(conflicts)
            if report.added or report.replaced:
                faults.point("store", f"{(report.added or report.replaced)[0].key}:append")  # lock held
                self._write(list(current.values()))
            return report

    def set_run_ids(self, run_ids: dict[str, str]) -> int:
        with self._locked():
            self._still_mine()
            recs = list(self.read()[1])
            n = 0
            for i, r in enumerate(recs):
                rid = run_ids.get(r.key)
                if rid and r["mlflow_run_id"] != rid:
                    recs[i] = r.replace(mlflow_run_id=rid)
                    n += 1
            if n:
                self._write(recs)
            return n
