"""MLflow at the edge: every measurement, seed, training and campaign as runs. The core never imports mlflow.

* **Where**: ``--tracking-uri`` or ``$MLFLOW_TRACKING_URI`` (a team's tracking server), else the
  embedded default, a sqlite store at ``experiments/mlflow.db`` of this project (an absolute path, not
  relative to wherever the command runs), artifacts in ``experiments/mlartifacts``.
* **Which experiment**: ``--experiment NAME``, else one per base model (its family, plus the
  truncation for truncated variants, plus the model id for synthetic models).
* **Runs**: a parent run per command (seed, measure, campaign, training) and a nested run per
  measurement; a resumed campaign continues its parent run, and a record logged again (its process was
  killed before the record was stored) completes the run already tagged with its key — one run per
  record and per campaign, however often they were interrupted. Params are written once (model id and descriptors, corpus, ctx, engine and llama.cpp
  version, per-group types, config, source); metrics are the size, bpw and every KLD statistic; the
  run is tagged with the record key, and the record keeps the run id.
* **Failure**: if the tracking store cannot be reached (connection refused or lost, a timeout, a sqlite
  file locked past the retries or that cannot be opened, a server answering 503/504), a warning says so
  once, measurements still land in the records store, and ``mqpredict track sync`` logs what is missing
  later, without duplicates (runs are found again by their record-key tag). Any other failure is not
  "offline": an error MLflow reports (a deleted experiment, a refused request) stops the command with
  one line naming the tracking URI; an exception of ours is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mqpredict.errors import MqError
from mqpredict.records.schema import Record
from mqpredict.util import faults
from mqpredict.util.paths import PROJECT_ROOT

EXPERIMENTS = PROJECT_ROOT / "experiments"
STAT_METRICS = ("size_bytes", "bpw", "n_tokens", "kld_mean", "kld_mean_err", "kld_median", "kld_p90", "kld_p95",
                "kld_p99", "kld_p999", "kld_max", "same_top_p", "same_top_p_err", "dp_mean", "dp_rms", "ppl",
                "ppl_err", "ppl_base", "ln_ppl_ratio", "ln_ppl_ratio_err")  # fmt: skip
MODEL_PARAMS = ("model_id", "model_name", "family", "synthetic", "architecture", "n_params", "n_layers", "n_embd",
                "n_ff", "n_head", "n_head_kv", "n_expert", "n_vocab", "tied_embeddings", "base_origin")  # fmt: skip
RUN_PARAMS = ("config", "effective_config", "types_key", "source", "corpus", "ctx", "n_batch", "chunk_offset",
              "n_chunks", "scoring", "imatrix_id", "imatrix_corpus", "engine", "kld_source", "llama_version", "build",
              "provenance_file", "provenance_url")  # fmt: skip
RECORD_TAG = "mqpredict.record_key"
RESUME_TAG = "mqpredict.resume_key"  # names a parent run a later process continues (a campaign's id)


def default_uri() -> str:
    return f"sqlite:///{EXPERIMENTS / 'mlflow.db'}"


def experiment_name(record_or_values) -> str:
    """The default experiment of a base model: its family (+ truncation; + id for synthetic models)."""
    v = record_or_values.values if isinstance(record_or_values, Record) else record_or_values
    name = v["family"]
    m = re.search(r"\+first(\d+)of(\d+)", v.get("base_origin") or "")
    if m:
        name += f"-first{m.group(1)}of{m.group(2)}"
    if v.get("synthetic"):
        name += f"-{v['model_id'][:6]}"
    return name


class Tracker:
    """No tracking (``--no-track``): every call is a no-op returning None."""

    enabled = False

    @contextmanager
    def parent(self, kind: str, model: dict, params: dict | None = None, resume: str | None = None) -> Iterator[str | None]:
        yield None

    def log_record(self, record: Record, step: int | None = None, metrics: dict | None = None,
                   tags: dict | None = None) -> str | None:  # fmt: skip
        return None

    def set_tags(self, run_id: str | None, tags: dict) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, folder: str | None = None) -> None:
        pass


_SQLITE_UNREACHABLE = ("database is locked", "database is busy", "unable to open database file")
_UNAVAILABLE_CODES = ("TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED")


def unreachable(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it was raised from) means the tracking store cannot be reached now:
    a connection refused or lost, a timeout, retries used up on a server that kept answering 5xx, a sqlite
    file locked past the retries or that cannot be opened, a server's 503/504. Only then does tracking go
    offline."""
    import requests.exceptions as rq

    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, (ConnectionError, TimeoutError, rq.ConnectionError, rq.Timeout, rq.RetryError)):
            return True
        if type(x).__name__ == "OperationalError":  # sqlite3's, or sqlalchemy's around it
            return any(s in str(x) for s in _SQLITE_UNREACHABLE)
        if getattr(x, "error_code", None) in _UNAVAILABLE_CODES and x.__cause__ is None and x.__context__ is None:
            return True  # a server's own 503/504
        todo += [x.__cause__, x.__context__]
    return False


def _retry(fn: Callable, what: str, attempts: int = 12):
    """Retry sqlite's 'database is locked' (concurrent writers); other errors go up at once."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - mlflow raises many types; only this message is retried
            if "database is locked" not in str(e) or i == attempts - 1:
                raise
            time.sleep(min(0.1 * 2**i, 3.0))
    raise RuntimeError(what)  # unreachable


class MlflowTracker(Tracker):
    enabled = True

    def __init__(self, uri: str | None = None, experiment: str | None = None, warn=warnings.warn) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a dead server should fail fast
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        # MLflow writes "View run … at …" links to stdout for server URIs: stdout is for results (--json)
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
        self.experiment = experiment
        self.warn = warn
        self.offline: str | None = None  # why logging stopped
        self._client = None
        self._parent: str | None = None
        self._experiment_ids: dict[str, str] = {}
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------------------- plumbing
    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _guard(self, fn: Callable, what: str):
        """Run an MLflow call. If the tracking store cannot be reached, go offline (warn once) and return
        None: measurements go on and ``track sync`` logs them later. An error MLflow reports is raised as an
        MqError naming the URI; any other exception is a bug and is raised as it is."""
        from mlflow.exceptions import MlflowException

        if self.offline:
            return None
        try:
            return _retry(fn, what)
        except Exception as e:
            if not unreachable(e):
                if isinstance(e, MlflowException):
                    raise MqError(f"MLflow at {self.uri} refused {what}: {_first_line(e)}",
                                  "fix the tracking store (or --experiment), or run with --no-track; records "
                                  "measured so far are stored, `mqpredict track sync` logs them later") from e  # fmt: skip
                raise
            self.offline = f"{type(e).__name__}: {_first_line(e)}"
            self.warn(f"MLflow tracking at {self.uri} failed while {what} ({self.offline}); records are still stored, "
                      f"run `mqpredict track sync` later to log them", stacklevel=3)  # fmt: skip
            return None

    def experiment_id(self, name: str) -> str:
        if name not in self._experiment_ids:
            def get_or_create():
                exp = self.client.get_experiment_by_name(name)
                if exp is not None:
                    return exp.experiment_id
                loc = None
                if self.uri.startswith("sqlite:///"):
                    loc = (EXPERIMENTS / "mlartifacts").as_uri() if self.uri == default_uri() else \
                        (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
                try:
                    return self.client.create_experiment(name, artifact_location=loc)
                except Exception:  # noqa: BLE001 - created meanwhile by another process
                    exp = self.client.get_experiment_by_name(name)
                    if exp is None:
                        raise
                    return exp.experiment_id

            self._experiment_ids[name] = _retry(get_or_create, "creating the experiment")
        return self._experiment_ids[name]

    # ------------------------------------------------------------------------------- runs
    @contextmanager
    def parent(self, kind: str, model: dict, params: dict | None = None, resume: str | None = None) -> Iterator[str | None]:
        """A parent run for one command on one model (seed, measure, campaign, training). ``resume`` names
        the run across processes (a campaign's id): a later process with the same name continues that run
        (params already there are kept; one it sets otherwise is tagged ``resumed.<param>``)."""
        from mlflow.entities import Param, RunTag

        name = self.experiment or experiment_name(model)

        def start():
            eid = self.experiment_id(name)
            found = self.client.search_runs([eid], f"tags.`{RESUME_TAG}` = '{resume}'", max_results=1) if resume else []
            if found:
                run, before = found[0], found[0].data.params
                self.client.update_run(run.info.run_id, status="RUNNING")
            else:
                tags = {"mqpredict.kind": kind, **({RESUME_TAG: resume} if resume else {})}
                run, before = self.client.create_run(eid, run_name=f"{kind} {time.strftime('%Y-%m-%d %H:%M')}", tags=tags), {}
            faults.point("mlflow", f"parent-{kind}")
            ps = {k: _s(v) for k, v in {**{k: model[k] for k in MODEL_PARAMS if k in model}, **(params or {})}.items()
                  if v is not None}  # fmt: skip
            self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in ps.items() if k not in before],
                                  tags=[RunTag("mqpredict.model_id", str(model.get("model_id")))]
                                  + [RunTag(f"resumed.{k}", v) for k, v in ps.items() if before.get(k, v) != v])  # fmt: skip
            return run.info.run_id

        run_id = self._guard(start, f"starting the {kind} run")
        self._parent = run_id
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self._parent = None
            if run_id:
                self._guard(lambda: self.client.set_terminated(run_id, status), f"closing the {kind} run")

    def log_record(self, record: Record, step: int | None = None, metrics: dict | None = None,
                   tags: dict | None = None) -> str | None:  # fmt: skip
        """A nested run for one measurement (or a top-level one when no parent is open); ``metrics`` and
        ``tags`` add what the caller knows beyond the record (a campaign: predicted KLD, win yes/no)."""
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        v = record.values
        name = self.experiment or experiment_name(record)
        parent = self._parent
        extra_metrics, extra_tags = metrics, tags

        def log():
            tags = {RECORD_TAG: record.key, "mqpredict.kind": "measurement", "source": v["source"],
                    "status": v["status"]}  # fmt: skip
            tags.update({k: _s(x) for k, x in (extra_tags or {}).items()})
            eid = self.experiment_id(name)
            # the run of this record, if a process logged it and was killed before the record was stored
            found = self.client.search_runs([eid], f"tags.`{RECORD_TAG}` = '{record.key}'", max_results=1)
            if found:
                rid, before = found[0].info.run_id, found[0].data.params
            else:
                if parent:
                    tags[MLFLOW_PARENT_RUN_ID] = parent
                rid, before = self.client.create_run(eid, run_name=_short(v["config"]), tags=tags).info.run_id, {}
            faults.point("mlflow", f"{record.key}:created")
            now = int(time.time() * 1000)
            params = {**{k: v[k] for k in MODEL_PARAMS + RUN_PARAMS if v.get(k) is not None},
                      **{f"types.{g}": ",".join(f"{t}:{share:.3g}" for t, share in mix.items())
                         for g, mix in (v.get("fractions") or {}).items()}}  # fmt: skip
            metrics = [Metric(k, float(v[k]), now, step or 0) for k in STAT_METRICS if v.get(k) is not None]
            metrics += [Metric(k, float(x), now, step or 0) for k, x in (extra_metrics or {}).items() if x is not None]
            self.client.log_batch(rid, metrics=metrics, params=[Param(k, _s(x)) for k, x in params.items() if k not in before],
                                  tags=[RunTag(k, x) for k, x in tags.items()] if found else [])  # fmt: skip
            faults.point("mlflow", f"{record.key}:logged")
            self.client.set_terminated(rid, "FINISHED" if v["status"] != "failed" else "FAILED")
            return rid

        return self._guard(log, f"logging {_short(v['config'])}")

    def set_tags(self, run_id: str | None, tags: dict) -> None:
        """Tags learnt after a run was logged (a campaign's survivors). A run this tracking store does not
        hold (its record was logged to another store) is left alone."""
        from mlflow.exceptions import MlflowException

        def tag():
            try:
                for k, x in tags.items():
                    self.client.set_tag(run_id, k, _s(x))
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise

        if run_id:
            self._guard(tag, "tagging a run")

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric

        if not self._parent:
            return
        rid, now = self._parent, int(time.time() * 1000)
        faults.point("mlflow", f"metrics@{'end' if step is None else step}")
        self._guard(lambda: self.client.log_batch(rid, metrics=[Metric(k, float(x), now, step or 0)
                                                                for k, x in metrics.items() if x is not None]),
                    "logging metrics")  # fmt: skip

    def log_artifact(self, path: str | os.PathLike, folder: str | None = None) -> None:
        """Upload a file to the open parent run (into ``folder`` of its artifacts, if given)."""
        if self._parent:
            rid = self._parent
            faults.point("mlflow", f"artifact-{folder or ''}/{Path(path).name}")
            self._guard(lambda: self.client.log_artifact(rid, str(path), folder), f"uploading {Path(path).name}")

    def find_run(self, record: Record) -> str | None:
        """The run already logged for this record (by its record-key tag), if any."""
        name = self.experiment or experiment_name(record)

        def search():
            runs = self.client.search_runs([self.experiment_id(name)], filter_string=f"tags.`{RECORD_TAG}` = '{record.key}'",
                                           max_results=1)  # fmt: skip
            return runs[0].info.run_id if runs else None

        return self._guard(search, "looking for logged runs")


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _s(v) -> str:
    return str(v)[:6000]


def _short(config: str, n: int = 80) -> str:
    return config if len(config) <= n else config[: n - 1] + "…"


def make_tracker(enabled: bool = True, uri: str | None = None, experiment: str | None = None) -> Tracker:
    return MlflowTracker(uri, experiment) if enabled else Tracker()


def sync(store, tracker: MlflowTracker, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Log the store's records that have no MLflow run yet; a run already logged (found by its
    record-key tag) is reused, so nothing is logged twice."""
    progress = progress or (lambda *a: None)
    todo = [r for r in store.records() if not r["mlflow_run_id"]]
    found, logged, ids = 0, 0, {}
    for i, r in enumerate(todo):
        progress("sync", i, len(todo))
        rid = tracker.find_run(r)
        if rid:
            found += 1
        else:
            rid = tracker.log_record(r)
            logged += rid is not None
        if tracker.offline:
            break
        ids[r.key] = rid
    progress("sync", len(todo), len(todo))
    updated = store.set_run_ids({k: v for k, v in ids.items() if v})
    return {"missing": len(todo), "logged": logged, "already_logged": found, "updated": updated,
            "offline": tracker.offline}
