"""Named points where ``mqpredict bench faults`` can stop a process for sure, and a trace of them.

A point is a phase (``build``, ``measure``, ``store``, ``mlflow``, ``report``, ``propose``) and a label
naming what is being done there (a record key, a file, a window). Outside the fault benchmark the
environment names nothing and :func:`point` returns at once.

* ``$MQPREDICT_FAULT_TRACE=FILE``: every point reached is appended to FILE, one ``phase:label`` a line
  (the timeline of an uninterrupted run, from which the benchmark draws its kill moments).
* ``$MQPREDICT_FAULT_PAUSE=phase:label``: on reaching that point the process writes it to
  ``$MQPREDICT_FAULT_PAUSED`` and sleeps there until it is killed, so a kill -9 lands inside that
  phase, at that step, for sure — not somewhere near it.
"""

from __future__ import annotations

import os
import time

TRACE = "MQPREDICT_FAULT_TRACE"
PAUSE = "MQPREDICT_FAULT_PAUSE"
PAUSED = "MQPREDICT_FAULT_PAUSED"
PHASES = ("build", "measure", "store", "mlflow", "report", "propose")

_trace = os.environ.get(TRACE) or None
_pause = os.environ.get(PAUSE) or None


def point(phase: str, label: str) -> None:
    """Mark that the process is at ``phase:label`` (traced and/or paused there when asked)."""
    if _trace is None and _pause is None:
        return
    name = f"{phase}:{label}"
    if _trace is not None:
        with open(_trace, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    if name == _pause:
        paused = os.environ[PAUSED]
        with open(paused + ".tmp", "w", encoding="utf-8") as f:
            f.write(name + "\n")
        os.replace(paused + ".tmp", paused)
        while True:  # until the benchmark kills this process
            time.sleep(3600)
