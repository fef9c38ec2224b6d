"""One unit of measuring work and what came back from it — the same on every executor.

A :class:`Job` is a build + measure of one config on one token slice: a plain measurement (seeds,
held-out presets) or a staged confirmation against a :class:`~mqpredict.search.confirm.Reference`.
:func:`run_job` runs it on an engine and never raises for llama.cpp's own failures: they come back
as an error the driver records as ``failed``. Bad input (a base missing on a node) is raised: it is
the cluster's set-up that is wrong, not the config.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from mqpredict.errors import LlamaError
from mqpredict.llama.engine import Engine, Measurement, load_scores
from mqpredict.measure.corpus import EvalSpec
from mqpredict.measure.kld import TokenScores
from mqpredict.quant.config import Config

if TYPE_CHECKING:
    from mqpredict.search.confirm import Outcome, Reference


class JobKind(StrEnum):
    measure = "measure"  # the whole slice, one run
    confirm = "confirm"  # staged: may stop after the first stage (a partial measurement)


@dataclass(frozen=True)
class Job:
    id: int  # the driver's step number: results are stored under it
    kind: JobKind
    config: Config
    spec: EvalSpec
    reference: Reference | None = None  # what a staged confirmation is judged against (confirm jobs)
    fraction: float = 1.0
    z: float = 2.0


@dataclass(frozen=True)
class JobResult:
    job: Job
    outcome: Outcome | None  # None when the job failed
    error: str | None = None  # llama.cpp's reason, or why the cluster gave up on the job
    scores: TokenScores | None = None  # per-token scores, carried back when the worker's disk is not the driver's
    worker: str = ""  # host:pid that ran it
    seconds: float = 0.0  # wall time on the worker

    @property
    def measurement(self) -> Measurement | None:
        return self.outcome.measurement if self.outcome is not None else None


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_job(engine: Engine, job: Job, carry_scores: bool = False) -> JobResult:
    """Run ``job`` on ``engine``; ``carry_scores`` puts the per-token scores into the result."""
    from mqpredict.search.confirm import Outcome, confirm

    t0 = time.perf_counter()
    try:
        if job.kind == JobKind.confirm:
            o = confirm(engine, job.config, job.spec, job.reference, job.fraction, job.z)
        else:
            m = engine.measure(job.config, spec=job.spec)
            o = Outcome(m, True, None, None, m.forward_tokens)
    except LlamaError as e:
        return JobResult(job, None, e.message, worker=worker_name(), seconds=time.perf_counter() - t0)
    scores = None
    if carry_scores and o.measurement.per_token_path:
        scores = load_scores(o.measurement.per_token_path)
    return JobResult(job, o, None, scores, worker_name(), time.perf_counter() - t0)


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
    spec = result.job.spec.part(m.chunk_offset, m.n_chunks)
    path = engine.per_token_path(m.types_key, spec)
    save_scores(path, result.scores)
    local = dataclasses.replace(m, per_token_path=str(path))
    return dataclasses.replace(result, outcome=dataclasses.replace(result.outcome, measurement=local), scores=None)
