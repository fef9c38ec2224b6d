"""One unit of work and what came back from it — the same on every executor.

A :class:`Job` is a function and its payload: ``fn(engine, *args)`` run on a worker's engine under the
driver's step number. The executor knows nothing of what the function decides: a plain measurement is
:func:`measure` (here), a staged confirmation is the search's own function, passed in by the driver.
Functions must be importable module-level functions (Ray sends them by reference).

:func:`run_job` runs a job on an engine and never raises for llama.cpp's own failures: they come back as
an error the driver records as ``failed``. Bad input (a base missing on a node) is raised: it is the
cluster's set-up that is wrong, not the config. A job's value is a
:class:`~mqpredict.llama.engine.Measurement` or a frozen dataclass with a ``measurement`` field; its
per-token scores travel back with it when the worker's disk is not the driver's (:func:`land`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mqpredict.errors import LlamaError
from mqpredict.llama.engine import Engine, Measurement, load_scores
from mqpredict.measure.corpus import EvalSpec, Scoring
from mqpredict.measure.kld import TokenScores
from mqpredict.quant.config import Config


@dataclass(frozen=True)
class Job:
    id: int  # the driver's step number: results are stored under it
    fn: Callable[..., Any]  # fn(engine, *args) → a Measurement, or a dataclass with a ``measurement`` field
    args: tuple = ()


@dataclass(frozen=True)
class JobResult:
    job: Job
    value: Any  # what the job's function returned; None when the job failed
    error: str | None = None  # llama.cpp's reason, or why the cluster gave up on the job
    scores: TokenScores | None = None  # per-token scores, carried back when the worker's disk is not the driver's
    worker: str = ""  # host:pid that ran it
    seconds: float = 0.0  # wall time on the worker

    @property
    def measurement(self) -> Measurement | None:
        return _measurement_of(self.value)


def _measurement_of(value: Any) -> Measurement | None:
    if value is None or isinstance(value, Measurement):
        return value
    return getattr(value, "measurement", None)


def measure(engine: Engine, config: Config, spec: EvalSpec) -> Measurement:
    """The plain job: build ``config`` and measure it on the whole of ``spec``."""
    return engine.measure(config, spec=spec)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_job(engine: Engine, job: Job, carry_scores: bool = False) -> JobResult:
    """Run ``job`` on ``engine``; ``carry_scores`` puts the per-token scores into the result."""
    t0 = time.perf_counter()
    try:
        value = job.fn(engine, *job.args)
    except LlamaError as e:
        return JobResult(job, None, e.message, worker=worker_name(), seconds=time.perf_counter() - t0)
    scores = None
    m = _measurement_of(value)
    if carry_scores and m is not None and m.per_token_path:
        scores = load_scores(m.per_token_path)
    return JobResult(job, value, None, scores, worker_name(), time.perf_counter() - t0)


def land(result: JobResult, engine: Engine) -> JobResult:
    """A result from another machine made local: its per-token scores saved where ``engine`` keeps them
    (the driver's cache), and checked to come from the same llama.cpp build and base as the driver's."""
    from mqpredict.errors import InputError
    from mqpredict.llama.engine import save_scores

    m = result.measurement
    if m is None:
        return result
    if m.build != engine.build_id() or m.base != engine.base_sha:
        what = "llama.cpp build" if m.build != engine.build_id() else "base model file"
        raise InputError(f"worker {result.worker} measured {m.config} with another {what} than the driver's "
                         f"({m.build}/{m.base[:12]} vs {engine.build_id()}/{engine.base_sha[:12]})",
                         "install the same mqpredict + llama.cpp build on every node and point every node "
                         "at the same base file")  # fmt: skip
    if result.scores is None:
        return result
    spec = EvalSpec(m.ctx, m.n_chunks, m.chunk_offset, scoring=Scoring(m.scoring))  # where the driver keeps them
    path = engine.per_token_path(m.types_key, spec)
    save_scores(path, result.scores)
    local = dataclasses.replace(m, per_token_path=str(path))
    value = local if isinstance(result.value, Measurement) else dataclasses.replace(result.value, measurement=local)
    return dataclasses.replace(result, value=value, scores=None)
