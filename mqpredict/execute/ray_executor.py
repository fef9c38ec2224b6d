"""Measurements as Ray tasks: ``--executor ray --address auto|HOST:PORT``.

Each job is one Ray task with its resources declared (``num_cpus`` = the engine's threads, ``num_gpus``,
``memory``), so Ray places it on a node that has them and runs as many at once as the cluster holds.
The driver stays the single writer of the records store and MLflow: a task returns its measurement and
per-token scores, and the driver stores them. What a staged confirmation is judged against (a decision's
:class:`~mqpredict.search.confirm.Reference`: the line and the per-token vectors of the measured configs;
any argument whose class sets ``OBJECT_STORE``)
goes into Ray's object store once per decision (``ray.put``); its tasks carry only the handle.

Faults. A worker (or its node) that dies mid-task makes Ray run the task again elsewhere, at most
``retries`` more times; after that the job comes back as an error and the campaign records it as
``failed`` and goes on. llama.cpp's own failures come back as errors at once (no retry: they would fail
again). If the driver dies, Ray cancels its tasks; ``campaign resume`` submits again only what the
store does not hold.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from mqpredict.errors import InputError
from mqpredict.execute.executor import Executor
from mqpredict.execute.job import Job, JobResult, land, run_job, worker_name
from mqpredict.execute.worker import EngineRecipe, engine_for
from mqpredict.llama.engine import Engine

SHIP_LIMIT = 256 * 2**20  # files up to this size also travel through the object store


@dataclass(frozen=True)
class Resources:
    """What one measurement task asks of a node."""

    cpus: float = 1
    gpus: float = 0
    memory: int | None = None  # bytes (Ray's scheduling hint; it does not limit the process)

    def fits(self, node: dict) -> int:
        """How many such tasks a node's resources hold at once."""
        n = int(node.get("CPU", 0) // self.cpus) if self.cpus else 10**6
        if self.gpus:
            n = min(n, int(node.get("GPU", 0) // self.gpus))
        if self.memory:
            n = min(n, int(node.get("memory", 0) // self.memory))
        return n


def _remote_call(recipe: EngineRecipe, fn, args: tuple, *shared):
    """The task body, on a worker: ``fn(engine, *args, *shared)`` on this recipe's warm engine (``shared``:
    object-store references, which Ray resolves before the call). Errors meant for the user (a base missing
    on this node, a corpus too short) come back as values, never retried as crashes."""
    import ray

    from mqpredict.errors import MqError

    try:
        return ("ok", fn(engine_for(recipe, fetch=ray.get), *args, *shared))
    except MqError as e:
        return (type(e).__name__, e.message, e.hint, worker_name())


@dataclass(frozen=True)
class _InStore:
    """Stands in a job's arguments for one that travels through the object store (resolved on the worker)."""


def _shared(arg) -> bool:
    """Arguments put in the object store once (a decision's reference: the line and per-token vectors, the
    same object for every job of that decision) rather than pickled into every task: their class says so."""
    return bool(getattr(type(arg), "OBJECT_STORE", False))


def _measure(engine, job: Job, *shared) -> JobResult:
    """A job on a worker, its shared arguments (if any) from the object store: its per-token scores travel
    back with the result, the shared arguments do not (the driver has them)."""
    it = iter(shared)
    full = dataclasses.replace(job, args=tuple(next(it) if isinstance(a, _InStore) else a for a in job.args))
    return dataclasses.replace(run_job(engine, full, carry_scores=True), job=job)


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, engine: Engine, address: str = "auto", resources: Resources = Resources(), retries: int = 2,
                 synchronous: bool = False, batch: int = 1, ship_limit: int = SHIP_LIMIT,
                 prefer_shipped: bool = False, llama_bin: str | None = None) -> None:  # fmt: skip
        import ray

        self.engine, self.resources, self.retries = engine, resources, retries
        self.synchronous, self.batch, self.address = synchronous, batch, address
        if not ray.is_initialized():
            _check_reachable(address)
            try:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise InputError(f"cannot reach a Ray cluster at {address!r}: {e}",
                                 "start one first (`ray start --head` on one node, `ray start --address HEAD:6379` "
                                 "on the others) and pass --address HEAD:6379, or use --executor local") from None  # fmt: skip
            self._own_connection = True
        else:
            self._own_connection = False
        from mqpredict.execute.worker import Shipment

        def ship(path) -> Shipment:
            size = os.path.getsize(path)
            return Shipment.of(path, ray.put(Path(path).read_bytes()) if size <= ship_limit else None)

        llama_bin = llama_bin or getattr(engine, "llama_bin", None)
        kld = getattr(engine, "kld_source", None)
        self.recipe = EngineRecipe(engine.name, ship(engine.model.path), ship(engine.corpus.path), engine.spec,
                                   max(1, int(resources.cpus)), str(llama_bin) if llama_bin else None,
                                   kld.value if kld is not None else "logits", prefer_shipped,
                                   ship(engine.imatrix.path) if engine.imatrix is not None else None)  # fmt: skip
        opts = {"num_cpus": resources.cpus, "num_gpus": resources.gpus, "max_retries": retries, "retry_exceptions": False}
        if resources.memory:
            opts["memory"] = resources.memory
        task = ray.remote(_remote_call)
        self._measure = task.options(name="mqpredict.measure", **opts)
        self._call = task.options(name="mqpredict.call", **opts)
        self._pending: OrderedDict = OrderedDict()  # object ref → (job, submitted at)
        self.overhead = 0.0  # driver seconds spent submitting and landing results
        self.waited = 0.0  # driver seconds blocked waiting for a result
        self.tasks = 0
        self.reference_puts = 0  # references put in the object store (one per decision, not one per task)
        self._reference: tuple[object, object] | None = None  # the last one put, and its object ref
        self._described: dict = {}
        self.describe()
        if self._cluster_slots() == 0:
            raise InputError(f"no node of the Ray cluster at {address} has room for one task ({resources})",
                             "lower --task-cpus/--task-gpus/--task-memory or add nodes")  # fmt: skip

    # -------------------------------------------------------------- the contract
    def slots(self) -> int:
        return self.batch if self.synchronous else self._cluster_slots()

    def _cluster_slots(self) -> int:
        """How many tasks the cluster's live nodes hold at once."""
        import ray

        return sum(self.resources.fits(n["Resources"]) for n in ray.nodes() if n.get("Alive"))

    def submit(self, job: Job) -> None:
        t0 = time.perf_counter()
        shared = [a for a in job.args if _shared(a)]
        if not shared:
            ref = self._measure.remote(self.recipe, _measure, (job,))
        else:  # the reference (per-token vectors) goes in the object store once; each task carries its handle
            stripped = dataclasses.replace(job, args=tuple(_InStore() if _shared(a) else a for a in job.args))
            ref = self._measure.remote(self.recipe, _measure, (stripped,), *map(self._put_reference, shared))
        self._pending[ref] = (job, time.time())
        self.tasks += 1
        self.overhead += time.perf_counter() - t0

    def _put_reference(self, reference):
        """The object-store handle of ``reference``: put once, when a decision makes a new one (the campaign
        builds one Reference per decision and hands it to every job of that decision). Only the last is
        kept here; Ray frees an older one when its last task is done."""
        import ray

        if self._reference is None or self._reference[0] is not reference:
            self._reference = (reference, ray.put(reference))
            self.reference_puts += 1
        return self._reference[1]

    def wait(self) -> JobResult:
        import ray

        if not self._pending:
            raise RuntimeError("wait() with no job pending")
        t0 = time.perf_counter()
        if self.synchronous:
            ref = next(iter(self._pending))
        else:
            [ref], _ = ray.wait(list(self._pending), num_returns=1)
        job, _t = self._pending.pop(ref)
        try:
            got = ray.get(ref)
        except ray.exceptions.RayError as e:  # the worker died on every try (or the task was lost)
            why = str(e).strip().splitlines()[0][:300]
            return JobResult(job, None, f"the Ray task failed {self.retries + 1} time(s): {type(e).__name__}: {why}")
        finally:
            self.waited += time.perf_counter() - t0
        t0 = time.perf_counter()
        res = land(dataclasses.replace(self._unwrap(got), job=job), self.engine)  # the job as submitted
        self.overhead += time.perf_counter() - t0
        return res

    @property
    def pending(self) -> int:
        return len(self._pending)

    def call(self, fn, *args):
        import ray

        from mqpredict import errors

        t0 = time.perf_counter()
        try:
            got = ray.get(self._call.remote(self.recipe, fn, args))
        except ray.exceptions.RayError as e:
            raise errors.LlamaError(f"the Ray task {getattr(fn, '__name__', fn)} failed {self.retries + 1} time(s): "
                                    f"{type(e).__name__}", "see `ray status` and the workers' logs") from None  # fmt: skip
        finally:
            self.waited += time.perf_counter() - t0
        return self._unwrap(got)

    def _unwrap(self, got: tuple):
        """A task's value, or its user-facing error raised here (the campaign stops: nothing else is submitted)."""
        from mqpredict import errors

        if got[0] == "ok":
            return got[1]
        self.cancel()
        kind, message, hint, where = got
        raise getattr(errors, kind, errors.MqError)(f"worker {where}: {message}", hint)

    def cancel(self) -> None:
        import ray

        for ref in list(self._pending):
            ray.cancel(ref, force=True)
        self._pending.clear()

    def close(self) -> None:
        import ray

        if self._pending:
            self.cancel()
        if self._own_connection and ray.is_initialized():
            ray.shutdown()

    def describe(self) -> dict:
        import ray

        if not ray.is_initialized():  # after close(): what it was when last connected
            return self._described
        self._described = {"executor": self.name, "ray_address": self.address,
                "ray_nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
                "ray_slots": self._cluster_slots(), "task_cpus": self.resources.cpus,
                "task_gpus": self.resources.gpus, "task_retries": self.retries,
                "mode": "synchronous" if self.synchronous else "asynchronous"}  # fmt: skip
        return self._described



def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HEAD:PORT that accepts no connection fails here at once (Ray itself would retry for minutes)."""
    import socket

    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except ValueError:
        raise InputError(f"--address {address!r} is not HOST:PORT", "e.g. --address 10.0.0.5:6379, or auto") from None
    except OSError as e:
        raise InputError(f"no Ray cluster answers at {address} ({e.strerror or e})",
                         "start one (`ray start --head --port 6379`) or check the address; "
                         "`ray status` on the head node shows it") from None  # fmt: skip
