"""Benchmark: a campaign killed with SIGKILL at random moments of every phase and resumed each time,
against the same campaign run without interruption.

1. **Reference**: a small campaign on the tiny test model (local executor, synchronous, fixed seed, one
   thread, no imatrix) runs uninterrupted and records the timeline of its fault points
   (:mod:`mqpredict.util.faults`: building, measuring, appending to the store, logging to MLflow,
   writing the report, proposing).
2. **Kill moments**: ``kills`` points are drawn from that timeline with the seed — every phase gets its
   share, the points within a phase are random — and sorted in time.
3. **Faulted run**: the same campaign again in fresh folders, with a fresh cache (so cache files, too, are
   written under fire). Each process is paused at the next drawn point and killed there with SIGKILL
   (its whole process group), then the campaign is resumed (``campaign resume``; ``campaign run`` again
   when the kill came before the campaign folder existed); a last resume runs to the end.
4. **End states**: both stores are synced to MLflow (``track sync``) and compared
   (:func:`mqpredict.bench.endstate.compare`).

Runs are real llama.cpp runs (in-process engine); nothing is mocked. The same labels name the same steps
in both runs because the campaign is deterministic for a seed; a drawn point the faulted run never
reaches is reported as ``missed``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mqpredict.errors import MqError
from mqpredict.util import faults
from mqpredict.util.paths import DATASETS

CHILD_TIMEOUT = 1800.0  # seconds one campaign process may take before the benchmark gives up
EXPERIMENT = "faults"


@dataclass(frozen=True)
class Plan:
    """The campaign every run of the benchmark performs."""

    kills: int = 20
    seed: int = 0
    budget: int = 4
    batch: int = 2
    ctx: int = 128
    tokens: int = 256
    types: str = "Q8_0,Q6_K,Q4_K,Q3_K"


@dataclass
class Kill:
    point: str  # phase:label
    landed: bool
    seconds: float  # the killed process's life
    command: str  # run or resume


@dataclass(frozen=True)
class Side:
    """One run's folders: model and corpus are shared, everything written is its own."""

    root: Path

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def out(self) -> Path:
        return self.root / "campaign"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


def draw(trace: list[str], kills: int, seed: int) -> list[str]:
    """``kills`` distinct points of ``trace`` (labels in time order; first occurrences count), every phase
    getting its share (phases in random order take the remainder), random within a phase, sorted in time."""
    rng = np.random.default_rng(seed)
    labels = list(dict.fromkeys(trace))
    by_phase: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_phase.setdefault(label.split(":", 1)[0], []).append(i)
    phases = [p for p in faults.PHASES if p in by_phase] + sorted(p for p in by_phase if p not in faults.PHASES)
    order = [phases[i] for i in rng.permutation(len(phases))]
    share = {p: kills // len(order) + (1 if j < kills % len(order) else 0) for j, p in enumerate(order)}
    picked: set[int] = set()
    for p in order:
        n = min(share[p], len(by_phase[p]))
        picked |= {int(i) for i in rng.choice(by_phase[p], n, replace=False)}
    rest = [i for i in range(len(labels)) if i not in picked]
    if len(picked) < kills and rest:  # a phase with fewer points than its share: the others make up for it
        picked |= {int(i) for i in rng.choice(rest, min(kills - len(picked), len(rest)), replace=False)}
    return [labels[i] for i in sorted(picked)]


def _cli() -> list[str]:
    return [sys.executable, "-m", "mqpredict.cli.main"]


def _run_args(plan: Plan, base: Path, corpus: Path, side: Side) -> list[str]:
    return ["campaign", "run", str(base), "--corpus", str(corpus), "--ctx", str(plan.ctx), "--tokens", str(plan.tokens),
            "--budget", str(plan.budget), "--batch", str(plan.batch), "--seed", str(plan.seed), "--types", plan.types,
            "--no-imatrix", "--scoring", "windows", "--threads", "1", "--out", str(side.out), "--store", str(side.store),
            "--tracking-uri", side.uri, "--experiment", EXPERIMENT, "--json"]  # fmt: skip


def _resume_args(side: Side) -> list[str]:
    return ["campaign", "resume", str(side.out), "--store", str(side.store), "--threads", "1",
            "--tracking-uri", side.uri, "--experiment", EXPERIMENT, "--json"]  # fmt: skip


def _env(side: Side, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (faults.TRACE, faults.PAUSE, faults.PAUSED)}
    env.update(MQPREDICT_CACHE=str(side.cache), MQPREDICT_NO_PROGRESS="1", **extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _child(args: list[str], env: dict[str, str], log: Path, paused: Path | None = None) -> tuple[bool, int, str]:
    """Run one CLI process; with ``paused``, kill its process group (SIGKILL) as soon as it pauses at its
    point. Returns (killed, exit code, stdout)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if paused is not None:
        paused.unlink(missing_ok=True)
    with open(log, "w") as err, tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen(args, stdout=out, stderr=err, env=env, start_new_session=True)
        t0 = time.monotonic()
        try:
            while p.poll() is None:
                if paused is not None and paused.exists():
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(60)
                    return True, p.returncode, ""
                if time.monotonic() - t0 > CHILD_TIMEOUT:
                    raise MqError(f"a campaign process ran for more than {CHILD_TIMEOUT:.0f} s", f"see {log}")
                time.sleep(0.05)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(60)
        out.seek(0)
        return False, p.returncode, out.read()


def _failed(what: str, log: Path) -> MqError:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    return MqError(f"{what} failed: {lines[-1][:300] if lines else '(no output)'}", f"see {log}")


def _sync(side: Side) -> dict:
    log = side.logs / "sync.err"
    _killed, rc, out = _child([*_cli(), "track", "sync", "--store", str(side.store), "--tracking-uri", side.uri,
                               "--experiment", EXPERIMENT, "--json"], _env(side), log)  # fmt: skip
    if rc != 0:
        raise _failed("track sync", log)
    return json.loads(out)


def run(plan: Plan, work: Path | None = None, say: Callable[[str], None] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        choose: Callable[[list[str], int, int], list[str]] = draw) -> dict:  # fmt: skip
    """The whole benchmark; returns its figures (see the module doc and endstate.compare). ``choose``
    picks the kill points from the reference timeline (default :func:`draw`; a test may aim at one)."""
    from mqpredict.base.testmodel import write_test_model
    from mqpredict.bench.endstate import compare

    say = say or (lambda s: None)
    progress = progress or (lambda *a: None)
    t_all = time.monotonic()
    root = Path(work) if work else Path(tempfile.mkdtemp(prefix="mqpredict-faults-"))
    if root.exists() and any(root.iterdir()):
        raise MqError(f"{root} is not empty", "give an empty or new folder to --work")
    root.mkdir(parents=True, exist_ok=True)
    base = write_test_model(root / "tiny.gguf", seed=0)
    corpus = DATASETS / "corpus" / "corpus.txt"
    ref, got = Side(root / "reference"), Side(root / "faulted")

    say("reference: the campaign without interruption, tracing its fault points")
    trace = root / "reference.trace"
    t0 = time.monotonic()
    _k, rc, out = _child([*_cli(), *_run_args(plan, base, corpus, ref)], _env(ref, **{faults.TRACE: str(trace)}),
                         ref.logs / "run.err")  # fmt: skip
    if rc != 0:
        raise _failed("the reference campaign", ref.logs / "run.err")
    ref_doc, ref_seconds = json.loads(out), time.monotonic() - t0
    timeline = trace.read_text().splitlines()
    points = choose(timeline, plan.kills, plan.seed)
    say(f"reference: {ref_seconds:.0f} s, {len(timeline)} fault points reached; {len(points)} kill points drawn")

    t0 = time.monotonic()
    paused = root / "paused"
    kills: list[Kill] = []
    got_doc = None
    for i, pt in enumerate([*points, None]):
        progress("kills", i, len(points))
        started = (got.out / "campaign.json").exists()
        args = _resume_args(got) if started else _run_args(plan, base, corpus, got)
        env = _env(got, **({faults.PAUSE: pt, faults.PAUSED: str(paused)} if pt else {}))
        log = got.logs / (f"{i + 1:02d}-{pt.split(':', 1)[0]}.err" if pt else "last.err")
        t1 = time.monotonic()
        killed, rc, out = _child([*_cli(), *args], env, log, paused if pt else None)
        if pt is not None:
            kills.append(Kill(pt, killed, time.monotonic() - t1, "resume" if started else "run"))
            say(f"kill {i + 1}/{len(points)} at {pt}: " + ("landed" if killed else "not reached (the campaign finished)"))
        if not killed:
            if rc != 0:
                raise _failed(f"the campaign after {sum(k.landed for k in kills)} kill(s)", log)
            got_doc = json.loads(out)
            if pt is not None:  # finished before this point: later points are out of reach too
                kills += [Kill(p, False, 0.0, "") for p in points[i + 1 :]]
                break
    progress("kills", len(points), len(points))
    faulted_seconds = time.monotonic() - t0

    say("syncing both stores to MLflow and comparing the end states")
    syncs = {"reference": _sync(ref), "faulted": _sync(got)}
    figures = compare(ref.store, ref.out, ref.uri, got.store, got.out, got.uri, EXPERIMENT)
    landed = [k for k in kills if k.landed]
    by_phase = {p: sum(k.point.startswith(p + ":") for k in landed) for p in faults.PHASES}
    doc = {
        "kills": len(landed), "planned": len(points), "missed": len(points) - len(landed), **figures,
        "confirmations": {"reference": ref_doc["confirmations"], "faulted": got_doc["confirmations"] if got_doc else None},
        "wins": {"reference": ref_doc["wins"], "faulted": got_doc["wins"] if got_doc else None},
        "kills_by_phase": by_phase, "timeline_points": len(timeline),
        "timeline_by_phase": {p: sum(x.startswith(p + ":") for x in dict.fromkeys(timeline)) for p in faults.PHASES},
        "synced": syncs, "plan": asdict(plan), "kill_points": [asdict(k) for k in kills],
        "seconds": {"reference": ref_seconds, "faulted": faulted_seconds, "total": time.monotonic() - t_all},
    }  # fmt: skip
    doc["ok"] = bool(doc["kills"] == plan.kills and not doc["missed"] and doc["clean"] and got_doc is not None
                     and doc["confirmations"]["reference"] == doc["confirmations"]["faulted"])  # fmt: skip
    if doc["ok"] and work is None:
        shutil.rmtree(root, ignore_errors=True)
    else:
        doc["work"] = str(root)
    return doc
