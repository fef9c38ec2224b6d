"""The executor contract: where a campaign's measurements run.

The driver (the campaign) submits :class:`~mqpredict.execute.job.Job` s and takes results back one at a
time; it alone writes the records store and MLflow, so nothing an executor does can break their
guarantees. Two implementations share one test suite (``tests/test_execute.py``):

* :class:`LocalExecutor` — the default: jobs run one after another in this process, on the driver's engine.
* :class:`~mqpredict.execute.ray_executor.RayExecutor` — each job is a Ray task with declared resources.

``synchronous`` executors hand results back in submission order and the campaign asks for a new batch
only when the last one is complete — the same sequence of records whatever runs the jobs.
Asynchronous ones hand back whichever job finishes first, and the campaign refits and asks for more
as soon as a worker is free.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque

from mqpredict.execute.job import Job, JobResult, run_job
from mqpredict.llama.engine import Engine
from mqpredict.measure.corpus import EvalSpec


class Executor(ABC):
    name: str = "executor"
    synchronous: bool = True

    @abstractmethod
    def slots(self) -> int:
        """How many jobs can run at once now."""

    @abstractmethod
    def submit(self, job: Job) -> None: ...

    @abstractmethod
    def wait(self) -> JobResult:
        """The next finished job (synchronous executors: the oldest submitted); blocks until there is one."""

    @property
    @abstractmethod
    def pending(self) -> int:
        """Jobs submitted and not yet handed back."""

    def free(self) -> int:
        """How many more jobs to submit now: synchronous executors take a new batch only when empty."""
        if self.synchronous:
            return self.slots() if self.pending == 0 else 0
        return max(0, self.slots() - self.pending)

    @abstractmethod
    def call(self, fn, *args):
        """``fn(engine, *args)`` once, on a worker's engine (one-off work such as the weight-error table);
        its errors (InputError, LlamaError) are raised here."""

    def prepare(self, specs: list[EvalSpec]) -> None:
        """Check the corpus covers ``specs`` and warm the base log-probabilities (raises InputError); the
        slice reaching furthest first, so that an engine whose base runs from window 0 runs it once."""
        for s in sorted(specs, key=lambda s: -s.end):
            self.call(warm, s)

    def drain(self):
        """Every pending result, in the order ``wait`` gives them."""
        while self.pending:
            yield self.wait()

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        """Parameters worth logging (MLflow)."""
        return {"executor": self.name}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalExecutor(Executor):
    """Jobs run in this process on the driver's engine, one after another, when their result is asked for."""

    name = "local"
    synchronous = True

    def __init__(self, engine: Engine, batch: int = 1) -> None:
        self.engine = engine
        self.batch = batch
        self._queue: deque[Job] = deque()

    def slots(self) -> int:
        return self.batch

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    def wait(self) -> JobResult:
        if not self._queue:
            raise RuntimeError("wait() with no job pending")
        job = self._queue.popleft()
        return run_job(self.engine, job)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def call(self, fn, *args):
        return fn(self.engine, *args)


def warm(engine: Engine, spec: EvalSpec) -> None:
    engine.base_logprobs(spec)
