"""Benchmark: one campaign, same base/corpus/budget/seed, on a local Ray cluster of 1 and then N workers.

Each worker node offers one task slot (``task_cpus`` CPUs; llama.cpp runs that many threads). Before any
timing an untimed warm-up campaign fills the disk caches every run shares (base log-probabilities, pure
quantizations), so no run pays a one-off cost the other does not. Then each configuration runs on a fresh
cluster with a fresh store and its wall time is measured; runs alternate (1, N, 1, N …) when repeated.

Reported per run: wall time, tasks (seeds + confirmations), and the driver's overhead per task —
``submit+land`` (sending the task, saving its per-token scores, checking it) and ``driver busy`` (wall
time not spent waiting for a result: surrogate fits, store appends, the report, divided by tasks).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mqpredict.measure.corpus import EvalSpec


@dataclass(frozen=True)
class ScaleRun:
    workers: int
    wall_s: float
    tasks: int
    confirmations: int
    waited_s: float
    submit_land_ms_per_task: float
    driver_busy_s_per_task: float


@dataclass
class ScaleResult:
    model: str
    budget: int
    ctx: int
    n_chunks: int
    task_cpus: int
    warmup_s: float
    runs: list[ScaleRun] = field(default_factory=list)

    def median_wall(self, workers: int) -> float:
        return statistics.median(r.wall_s for r in self.runs if r.workers == workers)

    def speedup(self, workers: int) -> float:
        return self.median_wall(1) / self.median_wall(workers)

    def to_json(self) -> dict:
        counts = sorted({r.workers for r in self.runs})
        return {**{k: v for k, v in asdict(self).items() if k != "runs"}, "runs": [asdict(r) for r in self.runs],
                "median_wall_s": {str(n): self.median_wall(n) for n in counts},
                "speedup_vs_1": {str(n): self.speedup(n) for n in counts}}  # fmt: skip


def _campaign(base: Path, corpus: Path, spec: EvalSpec, workers: int, budget: int, batch: int, seed: int,
              task_cpus: int, say) -> ScaleRun:  # fmt: skip
    from mqpredict.execute.local_cluster import LocalCluster
    from mqpredict.execute.ray_executor import RayExecutor, Resources
    from mqpredict.llama.inprocess import InProcessEngine
    from mqpredict.records.store import Store
    from mqpredict.workflows.campaign import Campaign, Settings
    from mqpredict.tracking import Tracker

    with tempfile.TemporaryDirectory(prefix="mqpredict-scale-") as tmp, LocalCluster(workers, task_cpus) as cluster, \
            InProcessEngine(base, corpus, spec, threads=task_cpus) as engine:  # fmt: skip
        ex = RayExecutor(engine, cluster.address, Resources(cpus=task_cpus), synchronous=False, batch=batch)
        try:
            c = Campaign.start(engine, Store(Path(tmp) / "store"), Path(tmp) / "out", Settings(budget=budget, batch=batch, seed=seed),
                               tracker=Tracker(), say=say, executor=ex)  # fmt: skip
            t0 = time.perf_counter()
            res = c.run()
            wall = time.perf_counter() - t0
        finally:
            ex.close()
        return ScaleRun(workers, wall, ex.tasks, res.spent, ex.waited, 1000 * ex.overhead / max(1, ex.tasks),
                        (wall - ex.waited) / max(1, ex.tasks))  # fmt: skip


def run(base: Path, corpus: Path, spec: EvalSpec, workers: int = 2, budget: int = 8, batch: int = 2, seed: int = 0,
        repeats: int = 1, task_cpus: int = 1, say=None) -> ScaleResult:  # fmt: skip
    say = say or (lambda s: None)
    result = ScaleResult(Path(base).name, budget, spec.ctx, spec.n_chunks, task_cpus, 0.0)
    say(f"warm-up campaign on {workers} workers (untimed: fills the shared caches)")
    t0 = time.perf_counter()
    _campaign(base, corpus, spec, workers, budget, batch, seed, task_cpus, lambda s: None)
    result.warmup_s = time.perf_counter() - t0
    for i in range(repeats):
        for n in (1, workers) if i % 2 == 0 else (workers, 1):
            say(f"run {i + 1}/{repeats}: {n} worker(s)")
            r = _campaign(base, corpus, spec, n, budget, batch, seed, task_cpus, lambda s: None)
            say(f"  {r.wall_s:.1f} s wall · {r.tasks} tasks · driver busy {r.driver_busy_s_per_task:.2f} s/task")
            result.runs.append(r)
    return result
