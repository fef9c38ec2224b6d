"""Executors by name: what ``--executor local|ray`` and its options build."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from mqpredict.errors import InputError
from mqpredict.execute.executor import Executor, LocalExecutor
from mqpredict.llama.engine import Engine


class ExecutorName(StrEnum):
    local = "local"
    ray = "ray"


class Ship(StrEnum):
    """How the base and the corpus reach Ray workers."""

    auto = "auto"  # the shared path when a node sees the same bytes there, else the object store (small files)
    path = "path"  # shared filesystem only
    object_store = "object-store"  # always the object-store copy (nodes whose paths hold other files)


@dataclass(frozen=True)
class ExecutorOptions:
    kind: ExecutorName = ExecutorName.local
    address: str = "auto"
    task_cpus: float = 1
    task_gpus: float = 0
    task_memory: int | None = None
    retries: int = 2
    synchronous: bool = False
    ship: Ship = Ship.auto
    llama_bin: str | None = None  # the workers' llama.cpp build (tools engine), when not the driver's path

    def build(self, engine: Engine, batch: int) -> Executor:
        if self.kind == ExecutorName.local:
            return LocalExecutor(engine, batch)
        if self.task_cpus <= 0 or self.task_gpus < 0 or self.retries < 0:
            raise InputError("--task-cpus must be > 0, --task-gpus and --retries >= 0")
        from mqpredict.execute.ray_executor import SHIP_LIMIT, RayExecutor, Resources

        limit = 0 if self.ship == Ship.path else (2**62 if self.ship == Ship.object_store else SHIP_LIMIT)
        return RayExecutor(engine, self.address, Resources(self.task_cpus, self.task_gpus, self.task_memory),
                           self.retries, self.synchronous, batch, limit, self.ship == Ship.object_store,
                           self.llama_bin)  # fmt: skip
