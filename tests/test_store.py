"""The records store contract, one suite for every format (SQLite, CSV, Parquet), then what is format-specific:
SQLite's corruption, schema versions and hand edits, CSV stores kept as they are, and the migration.

Records are the shipped dataset's real measurements; per-token vectors come from a real in-process run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CORPUS, mq
from mqpredict.errors import InputError
from mqpredict.records.schema import COLUMN_NAMES, Record
from mqpredict.records.store import FORMATS, ConflictError, Store, StoreError, clear_cache
from mqpredict.records.table import frame, normalized
from mqpredict.util.paths import DATASETS

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = DATASETS / "records"


def _records(n: int = 40) -> list[Record]:
    """``n`` real records of the shipped dataset, from several models, in a fixed order."""
    recs = Store(SHIPPED, create=False).records()
    return recs[:: max(1, len(recs) // n)][:n]


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            if f != ".lock" and not f.endswith("-shm"):  # SQLite's shared-memory index changes as readers read
                h.update(f.encode() + (Path(root) / f).read_bytes())
    return h.hexdigest()


def _sql(db: Path, *statements: tuple) -> list:
    """Statements run on a database by hand (as a user with the sqlite3 shell would), then closed."""
    con = sqlite3.connect(db)
    try:
        out = [con.execute(*st).fetchall() for st in statements]
        con.commit()
        return out
    finally:
        con.close()


def _fails(p, *words):
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    said = " ".join(p.stderr.split())
    for w in words:
        assert w.lower() in said.lower(), (w, p.stderr)


@pytest.fixture(params=FORMATS)
def fmt(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def measured(tiny, tmp_path_factory):
    """A real measurement of the tiny model as a record, and its per-token vector file."""
    from mqpredict.llama.inprocess import InProcessEngine
    from mqpredict.measure.corpus import EvalSpec
    from mqpredict.quant.config import Config
    from mqpredict.records.convert import from_measurement
    from mqpredict.records.identity import identify
    from mqpredict.records.schema import Source

    spec = EvalSpec(ctx=128, n_chunks=2)
    with InProcessEngine(tiny, CORPUS, spec, threads=1) as e:
        m = e.measure(Config.parse("Q4_0"))
        return from_measurement(e, identify(e.model), m, spec, Source.preset), Path(m.per_token_path)


# ------------------------------------------------------------------------------- the contract
def test_a_new_store_says_its_format(fmt, tmp_path):
    st = Store(tmp_path / "s", None if fmt == "sqlite" else fmt)  # sqlite is the default
    assert json.loads((tmp_path / "s" / "STORE.json").read_text())["format"] == fmt == st.fmt
    assert st.records() == [] and st.load().empty and list(st.load().columns) == list(COLUMN_NAMES)
    again = Store(tmp_path / "s")
    assert again.fmt == fmt and again.version == 2
    other = "csv" if fmt == "sqlite" else "sqlite"
    with pytest.raises(InputError, match=f"is a {fmt} store, not {other}"):
        Store(tmp_path / "s", other)
    if fmt == "sqlite":
        assert st.table.read_bytes()[:16] == b"SQLite format 3\x00"
        [meta] = _sql(st.table, ("SELECT name, value FROM meta",))  # the schema version lives in the database
        assert dict(meta)["schema_version"] == "2"


def test_append_reads_back_exactly(fmt, tmp_path):
    recs = _records()
    st = Store(tmp_path / "s", fmt)
    assert st.append(recs).to_json() == {"added": len(recs), "duplicates": 0, "replaced": 0}
    clear_cache()  # read from disk, not from this process's cache
    back = Store(tmp_path / "s").records()
    assert [r.values for r in back] == [normalized(r).values for r in recs]  # same values, same order
    assert Store(tmp_path / "s").keys() == {r.key for r in recs}
    df = Store(tmp_path / "s").load()
    assert df.equals(frame(back)) and df.dtypes.equals(frame(_records()).dtypes)
    df.loc[0, "kld_mean"] = -1.0  # a copy: the store's own view is untouched
    assert Store(tmp_path / "s").load()["kld_mean"].iloc[0] == recs[0]["kld_mean"]


def test_append_is_idempotent_and_a_conflict_writes_nothing(fmt, tmp_path):
    recs = _records()
    st = Store(tmp_path / "s", fmt)
    assert len(st.append(recs[:5]).added) == 5
    rep = st.append(recs[:7])
    assert len(rep.duplicates) == 5 and len(rep.added) == 2
    volatile = recs[1].replace(timestamp="2020-01-01T00:00:00+00:00", mlflow_run_id="abc")
    assert len(st.append([volatile]).duplicates) == 1  # volatile fields never conflict
    before = _digest(st.root)
    changed = recs[0].replace(kld_mean=recs[0]["kld_mean"] * 2)
    with pytest.raises(ConflictError, match="kld_mean"):
        st.append([recs[8], changed])
    with pytest.raises(ConflictError):
        st.append([recs[9], recs[9].replace(bpw=recs[9]["bpw"] + 1)])  # a conflict inside one append
    assert _digest(st.root) == before and len(st.records()) == 7  # recs[8], recs[9] were not written either


def test_a_failed_record_is_superseded_by_a_measurement(fmt, tmp_path):
    from mqpredict.measure.stats import FIELDS

    st = Store(tmp_path / "s", fmt)
    r = _records()[3]
    failed = r.replace(status="failed", status_reason="llama.cpp crashed", **{f: None for f in FIELDS})
    st.append([_records()[0], failed, _records()[5]])
    rep = st.append([r])
    assert len(rep.replaced) == 1 and rep.to_json()["added"] == 0
    assert [x["status"] for x in st.records()] == ["ok", "ok", "ok"] and st.records()[1].values == normalized(r).values
    with pytest.raises(ConflictError):
        st.append([failed])  # a measurement is never replaced by a failure


def test_invalid_or_incomplete_records_are_refused_whole(fmt, tmp_path, measured):
    recs = _records()
    st = Store(tmp_path / "s", fmt)
    st.append(recs[:2])
    before = _digest(st.root)
    with pytest.raises(StoreError, match="status='maybe'"):
        st.append([recs[2], recs[3].replace(status="maybe")])
    with pytest.raises(StoreError, match="per-token vector"):
        st.append([recs[4], measured[0].replace(per_token_path="per_token/elsewhere.kld.npy")])
    assert _digest(st.root) == before


def test_vectors_run_ids_counts_and_validate(fmt, tmp_path, measured):
    rec, vector = measured
    st = Store(tmp_path / "s", fmt)
    recs = _records()
    rel = st.attach_vector(rec.key, vector)
    assert (st.root / rel).read_bytes() == vector.read_bytes() and (st.root / "per_token" / f"{rec.key}.scores.npz").exists()
    st.append([*recs, rec.replace(per_token_path=rel)])
    assert st.validate() == []
    assert st.set_run_ids({recs[0].key: "run-a", rec.key: "run-b", "nokey": "run-c"}) == 2
    assert st.set_run_ids({recs[0].key: "run-a"}) == 0
    by = {r.key: r for r in Store(tmp_path / "s").records()}
    assert by[recs[0].key]["mlflow_run_id"] == "run-a" and by[recs[1].key]["mlflow_run_id"] is None
    assert len(by) == len(recs) + 1
    counts = {(c["model"], c["source"], c["status"]): c["count"] for c in st.counts()}
    expect: dict = {}
    for r in [*recs, rec]:
        k = (r["model_name"], r["source"], r["status"])
        expect[k] = expect.get(k, 0) + 1
    assert counts == expect
    (st.root / rel).unlink()
    assert any("per-token vector" in p and rel in p for p in st.validate())


def test_a_read_sees_what_another_writer_appended(fmt, tmp_path):
    recs = _records()
    a, b = Store(tmp_path / "s", fmt), Store(tmp_path / "s")
    a.append(recs[:3])
    assert len(b.load()) == 3 and len(b.records()) == 3  # b has read (and cached) three
    a.append(recs[3:5])
    a.set_run_ids({recs[0].key: "run-x"})
    assert len(b.load()) == 5 and b.records()[0]["mlflow_run_id"] == "run-x"


def _append_worker(store: str, lo: int, hi: int) -> None:
    recs = _records()
    st = Store(store)  # both workers may create the store at once
    for r in recs[lo:hi]:
        st.append([r])
    st.append(recs[lo:hi])  # all again: duplicates only


def test_two_processes_appending_at_once_lose_nothing(fmt, tmp_path):
    store = tmp_path / "c"
    if fmt != "sqlite":
        Store(store, fmt)
    code = "import sys; from tests.test_store import _append_worker as w; w(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(store), str(lo), str(hi)], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True) for lo, hi in ((0, 25), (15, 40))]  # fmt: skip
    for p in procs:
        _, e = p.communicate(timeout=300)
        assert p.returncode == 0, e
    st = Store(store)
    assert st.fmt == fmt and st.validate() == []
    assert sorted(st.keys()) == sorted(r.key for r in _records())


def _endless_worker(store: str) -> None:
    st = Store(store)
    for r in _records():
        st.append([r])
    time.sleep(60)  # the test kills it before this ends


def test_a_writer_killed_mid_append_leaves_a_sound_store(fmt, tmp_path):
    """kill -9 while appending one record after another: every finished append is there, nothing else."""
    store = tmp_path / "k"
    Store(store, fmt)
    code = "import sys; from tests.test_store import _endless_worker as w; w(sys.argv[1])"
    p = subprocess.Popen([sys.executable, "-c", code, str(store)], cwd=ROOT)
    t0 = time.time()
    while time.time() - t0 < 120 and len(Store(store).keys()) < 8:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    st = Store(store)
    assert st.validate() == []
    got = [r.key for r in st.records()]
    assert 8 <= len(got) and got == [r.key for r in _records()][: len(got)]  # a prefix, in order
    assert len(st.append(_records()).added) == len(_records()) - len(got)  # and it goes on


def test_a_newer_schema_version_is_refused(fmt, tmp_path):
    st = Store(tmp_path / "s", fmt)
    st.append(_records()[:2])
    if fmt == "sqlite":
        _sql(st.table, ("UPDATE meta SET value = '99' WHERE name = 'schema_version'",))
    else:
        (st.root / "STORE.json").write_text(json.dumps({"schema_version": 99, "format": fmt}))
    before = _digest(st.root)
    with pytest.raises(StoreError, match="schema version 99") as e:
        Store(tmp_path / "s").append(_records()[2:3])
    assert "upgrade mqpredict" in e.value.hint and _digest(st.root) == before
    _fails(mq("data", "list", "--store", st.root), "schema version 99", "upgrade mqpredict")


def test_a_store_that_lost_its_store_json(fmt, tmp_path):
    """SQLite: the database is taken over as it is; CSV/Parquet: an error naming the table (never a new empty
    store hiding it, never a guessed version)."""
    st = Store(tmp_path / "s", fmt)
    st.append(_records()[:3])
    st.close()
    (st.root / "STORE.json").unlink()
    if fmt == "sqlite":
        assert len(Store(st.root).records()) == 3 and json.loads((st.root / "STORE.json").read_text())["format"] == "sqlite"
    else:
        with pytest.raises(StoreError, match=f"holds records.{fmt} but no STORE.json") as e:
            Store(st.root)
        assert '"format"' in e.value.hint and not (st.root / "STORE.json").exists()
    (st.root / "STORE.json").write_text("{not json")
    with pytest.raises(StoreError, match="STORE.json is unreadable"):
        Store(st.root)


# ------------------------------------------------------------------------------- SQLite
def test_a_corrupted_database_is_one_line_naming_it(tmp_path):
    st = Store(tmp_path / "s")
    st.append(_records()[:3])
    st.close()
    data = st.table.read_bytes()
    st.table.write_bytes(b"not a database, just bytes " * 200)
    before = _digest(st.root)
    with pytest.raises(StoreError, match="records.sqlite is not a readable records database"):
        Store(tmp_path / "s").append(_records()[3:4])
    _fails(mq("data", "list", "--store", st.root), "records.sqlite", "not a readable records database")
    _fails(mq("data", "import", SHIPPED / "records.csv", "--store", st.root), "records.sqlite")
    assert _digest(st.root) == before
    st.table.write_bytes(data[: len(data) // 2])  # truncated
    _fails(mq("data", "list", "--store", st.root), "records.sqlite")
    st.table.unlink()
    _fails(mq("data", "list", "--store", st.root), "records.sqlite is missing")


def test_a_database_edited_by_hand(tmp_path):
    st = Store(tmp_path / "s")
    recs = _records()[:6]
    st.append(recs)
    _sql(st.table, ("UPDATE records SET kld_mean = 'abc' WHERE key = ?", (recs[2].key,)))
    with pytest.raises(StoreError, match=r"records.sqlite row 3: kld_mean='abc'"):
        Store(st.root).records()
    _sql(st.table, ("UPDATE records SET kld_mean = 0.5, status = 'maybe' WHERE key = ?", (recs[2].key,)),
         ("UPDATE records SET config = 'default=Q9_X' WHERE key = ?", (recs[4].key,)))
    with pytest.raises(StoreError, match="status='maybe'"):
        Store(st.root).load()
    problems = Store(st.root).validate()
    assert any(p.startswith(f"row 3 (key {recs[2].key}): status='maybe'") for p in problems)
    assert any(p.startswith("row 5") and "Q9_X" in p for p in problems)
    p = mq("data", "validate", "--store", st.root)
    assert p.returncode == 1 and "row 3" in p.stderr and "Q9_X" in p.stderr


def test_an_older_database_is_read_upgraded_and_upgraded_by_its_next_write(tmp_path):
    """A schema-1 database (no scoring column) reads as scoring=windows; its next append makes it version 2."""
    st = Store(tmp_path / "s")
    recs = _records()[:4]
    st.append(recs[:3])
    _sql(st.table, ("ALTER TABLE records DROP COLUMN scoring",), ("UPDATE records SET schema_version = 1",),
         ("UPDATE meta SET value = '1' WHERE name = 'schema_version'",))
    old = Store(tmp_path / "s")
    assert old.version == 1
    assert [r.values for r in old.records()] == [normalized(r).values for r in recs[:3]]  # windows, version 2
    assert old.validate() == []
    old.append(recs[3:])
    version, scoring = _sql(st.table, ("SELECT value FROM meta WHERE name = 'schema_version'",),
                            ("SELECT DISTINCT scoring FROM records",))
    assert version == [("2",)] and scoring == [("windows",)]
    assert Store(tmp_path / "s").version == 2 and len(Store(tmp_path / "s").records()) == 4


# ------------------------------------------------------------------------------- CSV kept, and migrated
def test_the_shipped_csv_store_keeps_working(tmp_path):
    """The shipped dataset's CSV store is read as it is, appended to in CSV (as schema 2), and stays CSV."""
    st_dir = tmp_path / "shipped"
    shutil.copytree(SHIPPED, st_dir)
    st = Store(st_dir)
    assert st.fmt == "csv" and st.version in (1, 2) and st.table.name == "records.csv"
    recs = st.records()
    new = recs[0].replace(key="0" * 20, config="preset=Q4_K_M")
    assert len(st.append([new]).added) == 1
    assert json.loads((st_dir / "STORE.json").read_text()) == {"schema_version": 2, "format": "csv"}
    assert (st_dir / "records.csv").read_text().count("\n") == len(recs) + 2 and not (st_dir / "records.sqlite").exists()
    p = mq("data", "import", SHIPPED / "records.csv", "--store", tmp_path / "new", "--json")
    assert p.returncode == 0, p.stderr
    new_st = Store(tmp_path / "new")
    assert new_st.fmt == "sqlite" and [r.values for r in new_st.records()] == [r.values for r in recs]


def test_migrate_a_csv_store_to_sqlite(tmp_path):
    st_dir = tmp_path / "shipped"
    shutil.copytree(SHIPPED, st_dir)
    want = [r.values for r in Store(st_dir).records()]
    stale = Store(st_dir)  # a writer that opened it as CSV before the migration
    p = mq("data", "migrate", st_dir)
    assert p.returncode == 0, p.stderr
    said = p.stderr.strip()
    assert len(said.splitlines()) == 1 and f"{len(want)} records migrated from csv to SQLite" in said
    assert not [f for f in os.listdir(st_dir) if f.endswith((".part", "-wal", "-shm"))]  # one database file
    st = Store(st_dir)
    assert st.fmt == "sqlite" and st.version == 2 and json.loads((st_dir / "STORE.json").read_text()) == {"format": "sqlite"}
    clear_cache()
    assert [r.values for r in st.records()] == want and st.validate() == []
    assert (st_dir / "records.csv.migrated").exists() and not (st_dir / "records.csv").exists()
    with pytest.raises(StoreError, match="was migrated to sqlite while this process ran"):
        stale.append([_records()[0].replace(key="1" * 20)])
    doc = json.loads(mq("data", "migrate", "--store", st_dir, "--json").stdout)
    assert doc["kept"] is None and doc["records"] == len(want)  # once: nothing more to do


def test_a_bad_row_stops_the_migration_before_anything_is_written(tmp_path):
    st = Store(tmp_path / "c", "csv")
    st.append(_records()[:5])
    lines = (st.root / "records.csv").read_text().splitlines()
    lines[3] = lines[3].replace(",ok,", ",maybe,")
    (st.root / "records.csv").write_text("\n".join(lines) + "\n")
    before = _digest(st.root)
    _fails(mq("data", "migrate", st.root), "records.csv row 4", "status='maybe'")
    assert _digest(st.root) == before


def test_bench_store_times_both_formats_side_by_side():
    p = mq("bench", "store", "--records", 60, "--repeats", 1, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["n_records"] == 60 and set(doc["formats"]) == {"sqlite", "csv"}
    for f in doc["formats"].values():
        assert all(f[k] > 0 for k in ("append_s", "append_warm_s", "load_s", "load_again_s", "table_bytes"))
    assert doc["append_ratio_csv_to_sqlite"] == doc["formats"]["csv"]["append_s"] / doc["formats"]["sqlite"]["append_s"]
    _fails(mq("bench", "store", "--records", 1), "--records")
