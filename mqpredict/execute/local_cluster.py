"""A throw-away Ray cluster on this machine: a head and N worker nodes, all on 127.0.0.1.

For the tests and ``mqpredict bench scale``. The head runs no tasks (0 CPUs), so every measurement runs
on a worker node; each worker node offers ``cpus`` CPUs. Everything binds to the loopback interface and
is stopped on ``close()`` (or when this process exits).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

#: Ray swaps 127.0.0.1 for the machine's routable address unless told this machine is its own cluster
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class LocalCluster:
    def __init__(self, workers: int = 2, cpus: int = 1, object_store_mb: int = 80, start_timeout: float = 120) -> None:
        os.environ.update(LOOPBACK_ENV)  # inherited by the nodes, their workers and any driver started from here
        from ray.cluster_utils import Cluster

        node = {"node_ip_address": "127.0.0.1", "object_store_memory": object_store_mb * 2**20}
        t0 = time.monotonic()
        self._cluster = Cluster(initialize_head=True,
                                head_node_args={"num_cpus": 0, "include_dashboard": False, **node})  # fmt: skip
        self._node = node
        self.cpus = cpus
        self.workers = [self._cluster.add_node(num_cpus=cpus, **node) for _ in range(workers)]
        self._cluster.wait_for_nodes(timeout=max(1.0, start_timeout - (time.monotonic() - t0)))

    @property
    def address(self) -> str:
        return self._cluster.address

    def add_worker(self):
        w = self._cluster.add_node(num_cpus=self.cpus, **self._node)
        self.workers.append(w)
        return w

    def _workers_of(self, i: int) -> list[int]:
        """Pids of the worker processes of node ``i`` (the children of its raylet)."""
        raylet = self.workers[i].all_processes["raylet"][0].process.pid
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == raylet:
                found.append(int(d.name))
        return found

    def node_of(self, pid: int) -> int:
        """Index of the worker node whose worker process ``pid`` is."""
        for i in range(len(self.workers)):
            if pid in self._workers_of(i):
                return i
        raise LookupError(f"process {pid} is no worker of this cluster")

    def kill_worker(self, i: int = 0) -> None:
        """The worker node ``i`` dies at once: every worker process on it (SIGKILL, mid-task), then its raylet.

        (Killing only the raylet is not enough: a worker busy in llama.cpp would finish its task and hand
        the result straight to the driver.)"""
        for pid in self._workers_of(i):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        w = self.workers.pop(i)
        self._cluster.remove_node(w, allow_graceful=False)

    def close(self) -> None:
        self._cluster.shutdown()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
