"""MLflow tracking with real MLflow: the sqlite store, and a real `mlflow server` on 127.0.0.1 that is
killed mid-seed (records still land; `track sync` logs them later, never twice)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mqpredict.records.store import Store
from tests.conftest import MQ, mq

SMALL = ["--ctx", "128", "--tokens", "256"]


def _runs(uri: str, experiment: str | None = None):
    import mlflow

    mlflow.set_tracking_uri(uri)
    kw = {"experiment_names": [experiment]} if experiment else {"search_all_experiments": True}
    return mlflow.search_runs(**kw)


def test_seed_logs_parent_and_nested_runs_to_sqlite(tiny, tmp_path):
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    p = mq("seed", tiny, "--no-imatrix", "--store", tmp_path / "s", *SMALL, "--tracking-uri", uri, "--experiment", "exp-a", "--json")
    assert p.returncode == 0, p.stderr
    json.loads(p.stdout)  # stdout stays one JSON document; MLflow's own logging goes to stderr
    runs = _runs(uri, "exp-a")
    nested = runs[runs["tags.mlflow.parentRunId"].notna()]
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert len(parents) == 1 and len(nested) == 16
    assert (parents["tags.mqpredict.kind"] == "seed").all() and parents["params.model_id"].notna().all()
    assert nested["metrics.kld_mean"].notna().all() and nested["metrics.size_bytes"].notna().all()
    assert nested["params.config"].str.startswith("preset=").all() and "params.types.ffn_down" in nested
    recs = {r.key: r for r in Store(tmp_path / "s").records()}
    by_key = dict(zip(nested["tags.mqpredict.record_key"], nested["run_id"]))
    assert by_key == {k: r["mlflow_run_id"] for k, r in recs.items()}  # the record keeps the run, the run the record


def test_default_store_is_the_projects_and_no_track_logs_nothing(tiny, tmp_path):
    from mqpredict.tracking import default_uri
    from mqpredict.util.paths import PROJECT_ROOT

    assert default_uri() == f"sqlite:///{PROJECT_ROOT / 'experiments' / 'mlflow.db'}"
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    p = mq("measure", tiny, "-c", "Q8_0", *SMALL, "--no-track", "--tracking-uri", uri, "--json")
    assert p.returncode == 0 and not (tmp_path / "none.db").exists()
    p = mq("measure", tiny, "-c", "Q8_0", *SMALL, "--tracking-uri", uri, "--experiment", "m", "--json")
    assert json.loads(p.stdout)[0]["mlflow_run_id"] and len(_runs(uri, "m")) == 2  # parent + the measurement


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `mlflow server` bound to 127.0.0.1, bounded in time, always stopped."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.proc = root, _free_port(), None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> None:
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
               f"sqlite:///{self.root / 'server.db'}", "--default-artifact-root", str(self.root / "art"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        self.kill()
        pytest.fail(f"mlflow server did not come up within {timeout} s")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    try:
        yield s
    finally:
        s.kill()


def test_server_killed_mid_campaign_then_sync_and_compare(tiny, tmp_path, server):
    server.start()
    store = tmp_path / "store"
    env = dict(os.environ, MQPREDICT_NO_PROGRESS="1")
    p = subprocess.Popen([*MQ, "campaign", "run", str(tiny), "--store", str(store), "--ctx", "128", "--tokens", "512", "--no-imatrix",
                          "--budget", "3", "--batch", "3", "--out", str(tmp_path / "camp"),
                          "--tracking-uri", server.uri, "--experiment", "team"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    t0 = time.time()
    while time.time() - t0 < 300:  # wait until some measurements are logged to the server
        if (store / "STORE.json").exists() and sum(bool(r["mlflow_run_id"]) for r in Store(store).records()) >= 2:
            break
        time.sleep(0.1)
    server.kill()  # the tracking server dies mid-campaign
    _, errs = p.communicate(timeout=900)
    assert p.returncode == 0, errs
    assert "warning" in errs.lower() and "track sync" in errs
    assert (tmp_path / "camp" / "survivors.md").exists()  # the campaign finished its work and its report
    recs = Store(store).records()
    proposed = [r for r in recs if (r["provenance_file"] or "").startswith("campaign:")]
    assert 1 <= len(proposed) <= 3 and len(recs) >= 14  # every measurement landed in the records store
    missing = [r for r in recs if not r["mlflow_run_id"]]
    assert 0 < len(missing) < len(recs)

    server.start()  # back up, same backend store
    synced = mq("track", "sync", "--store", store, "--tracking-uri", server.uri, "--experiment", "team", "--json")
    assert synced.returncode == 0, synced.stderr
    doc = json.loads(synced.stdout)
    assert doc["missing"] == len(missing) and doc["logged"] + doc["already_logged"] == len(missing)
    again = json.loads(mq("track", "sync", "--store", store, "--tracking-uri", server.uri, "--experiment", "team",
                          "--json").stdout)  # fmt: skip
    assert again["missing"] == 0
    runs = _runs(server.uri, "team")
    keys = runs["tags.mqpredict.record_key"].dropna()
    assert len(keys) == len(recs) and keys.is_unique  # every record once in MLflow, none twice
    assert all(r["mlflow_run_id"] for r in Store(store).records())
    # compare reads the server through the search API
    cmp = mq("compare", "team", "--tracking-uri", server.uri, "--plot", tmp_path / "c.png", "--json")
    assert cmp.returncode == 0, cmp.stderr
    (row,) = json.loads(cmp.stdout)
    assert row["name"] == "team" and row["campaigns"] == 1 and row["best_by_band"]


def test_sync_against_a_dead_server_fails_cleanly(tiny, tmp_path):
    store = tmp_path / "s"
    mq("seed", tiny, "--no-imatrix", "--store", store, *SMALL, "--no-track", check=True)
    p = mq("track", "sync", "--store", store, "--tracking-uri", f"http://127.0.0.1:{_free_port()}", timeout=300)
    assert p.returncode != 0 and "not reachable" in p.stderr and "Traceback" not in p.stderr
    assert not any(r["mlflow_run_id"] for r in Store(store).records())


def test_only_an_unreachable_tracking_store_is_offline(tmp_path):
    """The classifier on real failures: a refused connection, a locked sqlite file → offline; an error MLflow
    reports or any other exception → not offline."""
    import sqlite3

    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from mqpredict.tracking import unreachable

    try:
        requests.get(f"http://127.0.0.1:{_free_port()}/", timeout=5)
    except requests.RequestException as e:
        refused = e
    try:
        try:
            requests.get(f"http://127.0.0.1:{_free_port()}/", timeout=5)
        except Exception as e:  # noqa: BLE001 - what MLflow's REST client does with it
            raise MlflowException(f"API request failed with exception {e}")
    except MlflowException as e:
        wrapped = e
    db = tmp_path / "x.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        sqlite3.connect(db, timeout=0.05).execute("CREATE TABLE t (x)")
    except sqlite3.OperationalError as e:
        locked = e
    holder.execute("ROLLBACK")
    assert unreachable(refused) and unreachable(wrapped) and unreachable(locked)
    assert not unreachable(MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE))
    assert not unreachable(ValueError("could not convert string to float: 'abc'"))
    assert not unreachable(sqlite3.OperationalError("no such table: runs"))


@pytest.fixture
def record(tiny, corpus, spec, tmp_path):
    """One real record (Q8_0 of the tiny model, measured here), not logged anywhere."""
    from mqpredict.llama.inprocess import InProcessEngine
    from mqpredict.quant.config import Config
    from mqpredict.records.schema import Source
    from mqpredict.workflows.seed import Candidate, seed

    store = Store(tmp_path / "one")
    with InProcessEngine(tiny, corpus, spec, threads=1) as eng:
        seed(eng, store, [Candidate(Config.parse("Q8_0"), Source.preset)])
    return store.records()[0]


def test_tracking_goes_offline_on_a_dead_server_and_surfaces_anything_else(record, tmp_path):
    import mlflow

    from mqpredict.errors import MqError
    from mqpredict.tracking import MlflowTracker

    rec = record
    said = []
    dead = MlflowTracker(f"http://127.0.0.1:{_free_port()}", "x", warn=lambda m, **kw: said.append(m))
    assert dead.log_record(rec) is None and dead.offline and len(said) == 1 and "track sync" in said[0]
    assert dead.log_record(rec) is None and len(said) == 1  # offline: warned once, nothing tried again

    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    t = MlflowTracker(uri, "kept", warn=lambda m, **kw: said.append(m))
    with t.parent("campaign", rec.values, {"campaign_id": "c1"}):
        with pytest.raises(ValueError):  # a bug of ours (a metric that is no number) keeps its traceback
            t.log_metrics({"hypervolume": "abc"})
        assert t.log_record(rec)
    assert t.offline is None
    client = mlflow.MlflowClient(uri)
    client.delete_experiment(client.get_experiment_by_name("kept").experiment_id)
    gone = MlflowTracker(uri, "kept", warn=lambda m, **kw: said.append(m))
    with pytest.raises(MqError, match="refused") as e:  # the experiment was deleted in the UI: MLflow says so
        gone.log_record(rec)
    assert uri in e.value.message and gone.offline is None and len(said) == 1


def test_a_record_logged_again_completes_its_run_and_a_resumed_campaign_keeps_its_parent(record, tmp_path):
    """What a kill -9 leaves in MLflow: a run tagged with a record's key but never completed (the process died
    before storing the record), and a campaign's parent run left RUNNING. Logging the record again (the
    resumed campaign measures it again) completes that run instead of adding a second; a resumed campaign
    continues its parent run (found by the campaign id) instead of starting another."""
    import mlflow

    from mqpredict.tracking import RECORD_TAG, MlflowTracker

    rec = record
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    client = mlflow.MlflowClient(uri)
    t = MlflowTracker(uri, "exp")
    with t.parent("campaign", rec.values, {"campaign_id": "c1", "setting.budget": 4}, resume="c1") as first:
        pass
    eid = client.get_experiment_by_name("exp").experiment_id
    client.update_run(first, status="RUNNING")  # as a killed process leaves it
    half = client.create_run(eid, tags={RECORD_TAG: rec.key, "mqpredict.kind": "measurement"}).info.run_id

    t2 = MlflowTracker(uri, "exp")
    with t2.parent("campaign", rec.values, {"campaign_id": "c1", "setting.budget": 6}, resume="c1") as again:
        rid = t2.log_record(rec, 1, {"kld_pred": 0.1}, {"campaign_id": "c1"})
        assert t2.log_record(rec) == rid  # logged a third time: still that run
    assert again == first and rid == half
    runs = client.search_runs([eid])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    parent = client.get_run(first).data
    assert parent.params["setting.budget"] == "4" and parent.tags["resumed.setting.budget"] == "6"
    done = client.get_run(rid).data
    assert done.metrics["kld_mean"] == pytest.approx(rec["kld_mean"]) and done.params["config"] == rec["config"]
    assert done.tags["campaign_id"] == "c1" and done.tags["status"] == rec["status"]
    with t2.parent("seed", rec.values) as other:  # a run without a resume name is always a new one
        pass
    assert other not in (first, rid)
