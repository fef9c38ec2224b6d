"""Executors: one contract suite for local and Ray, then campaigns on a real local Ray cluster
(a head + 2 worker nodes on 127.0.0.1, started here, stopped at the end): the synchronous mode gives the
local path's records, a worker node killed mid-campaign costs nothing, a failing llama.cpp on a worker is
recorded as failed, and a killed driver resumes without measuring anything twice."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS, MQ, mq
from mqpredict.errors import InputError
from mqpredict.execute.executor import LocalExecutor
from mqpredict.execute.job import Job, measure
from mqpredict.execute.worker import Shipment
from mqpredict.llama.engine import load_scores
from mqpredict.measure.corpus import EvalSpec
from mqpredict.quant.config import Config
from mqpredict.records.store import Store

SPEC = EvalSpec(ctx=128, n_chunks=2)
CONFIGS = ["default=Q8_0", "default=Q4_0", "default=Q4_K,ffn_down=Q2_K"]
CAMPAIGN = ["--corpus", CORPUS, "--ctx", 128, "--tokens", 512, "--no-imatrix", "--no-track", "--json"]  # the imatrix path is
# the same on any executor (tests/test_imatrix.py, test_campaign.py); without it a seed is 16 presets, not 27


@pytest.fixture(scope="module")
def cluster():
    """Head (no CPUs: it runs no tasks) + 2 one-CPU worker nodes on 127.0.0.1; always stopped."""
    from mqpredict.execute.local_cluster import LOOPBACK_ENV, LocalCluster

    old = {k: os.environ.get(k) for k in LOOPBACK_ENV}
    c = LocalCluster(workers=2, cpus=1, start_timeout=120)
    try:
        yield c
    finally:
        c.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def engine(tiny):
    from mqpredict.llama.inprocess import InProcessEngine

    with InProcessEngine(tiny, CORPUS, SPEC, threads=1) as e:
        yield e


@pytest.fixture(params=["local", "ray-sync", "ray-async"])
def executor(request, engine):
    if request.param == "local":
        yield LocalExecutor(engine, batch=2)
        return
    from mqpredict.execute.ray_executor import RayExecutor

    c = request.getfixturevalue("cluster")
    ex = RayExecutor(engine, c.address, synchronous=request.param == "ray-sync", batch=2)
    try:
        yield ex
    finally:
        ex.close()


def _jobs():
    return [Job(i, measure, (Config.parse(c), SPEC)) for i, c in enumerate(CONFIGS)]


# ------------------------------------------------------------------------------- the contract
def test_every_job_comes_back_once_with_the_local_engines_numbers(executor, engine):
    """Whatever runs them, the results are the local engine's, and per-token scores land on this disk."""
    assert executor.free() == executor.slots() >= 1
    for j in _jobs():
        executor.submit(j)
    assert executor.pending == 3
    results = list(executor.drain())
    assert executor.pending == 0
    assert sorted(r.job.id for r in results) == [0, 1, 2]
    if executor.synchronous:
        assert [r.job.id for r in results] == [0, 1, 2]  # submission order
    for r in results:
        assert r.error is None and r.measurement is not None
        m = r.measurement
        local = engine.measure(r.job.args[0], spec=SPEC)
        assert (m.types_key, m.size_bytes, m.stats.kld_mean) == (local.types_key, local.size_bytes, local.stats.kld_mean)
        assert Path(m.per_token_path).exists()
        assert np.array_equal(load_scores(m.per_token_path).kld, load_scores(local.per_token_path).kld)
        assert r.worker


def test_synchronous_executors_take_a_new_batch_only_when_empty(executor):
    executor.submit(_jobs()[0])
    if executor.synchronous:
        assert executor.free() == 0
    else:
        assert executor.free() == executor.slots() - 1
    list(executor.drain())
    assert executor.free() == executor.slots()


def _reference(engine, presets, spec=SPEC):
    """A decision's reference as the campaign builds it: the presets' line and their per-token vectors."""
    from mqpredict.search.confirm import Reference
    from mqpredict.pareto import Line, Point

    ms = {c: engine.measure(Config.parse(c), spec=spec) for c in presets}
    line = Line.from_presets(Point(m.bpw, m.stats.kld_mean, c) for c, m in ms.items())
    vectors = {c: load_scores(m.per_token_path).kld.astype(np.float64) for c, m in ms.items()}
    return Reference(line, vectors, [(m.bpw, c) for c, m in ms.items()], spec.scored_per_chunk)


def test_confirmations_share_one_reference_put_once(executor, engine):
    """Staged confirmations judged against one reference give the local outcomes; Ray puts each decision's
    reference in its object store once, whatever the number of tasks judged against it."""
    from mqpredict.search.confirm import confirm

    wide = EvalSpec(ctx=128, n_chunks=8)  # a first stage of 4 windows: enough for a t test to stop one early
    first, second = (_reference(engine, ["default=Q8_0", "default=Q4_0"], wide) for _ in range(2))  # two decisions
    configs = ["default=Q4_1", "default=Q5_0", "default=Q4_K,ffn_down=Q6_K"]  # the first stops early
    for i, c in enumerate(configs):
        executor.submit(Job(i, confirm, (Config.parse(c), wide, first, 0.5)))
    results = list(executor.drain())
    executor.submit(Job(3, confirm, (Config.parse(configs[0]), wide, second, 0.5)))
    results += list(executor.drain())
    for r in results:
        assert r.error is None and r.job.args[2] is (first if r.job.id < 3 else second)  # the job as submitted
        local = confirm(engine, r.job.args[0], wide, r.job.args[2], 0.5)
        o = r.value
        assert (o.complete, o.reason, o.forward_tokens) == (local.complete, local.reason, local.forward_tokens)
        assert (o.margin.diff, o.margin.se) == (local.margin.diff, local.margin.se)
    assert any(not r.value.complete for r in results) and any(r.value.complete for r in results)
    if executor.name == "ray":
        assert executor.reference_puts == 2


def test_prepare_names_a_corpus_too_short(executor):
    with pytest.raises(InputError, match="token"):
        executor.prepare([EvalSpec(ctx=128, n_chunks=10_000)])


# ------------------------------------------------------------------------------- Ray specifics
def test_a_base_missing_on_a_worker_is_a_clear_error(cluster, engine):
    """A node that cannot see the base (no shared path, nothing in the object store) names the file and the fix."""
    from mqpredict.execute.ray_executor import RayExecutor

    with RayExecutor(engine, cluster.address, ship_limit=0) as ex:
        missing = dataclasses.replace(ex.recipe.base, path="/nonexistent/shared/tiny.gguf", handle=None)
        ex.recipe = dataclasses.replace(ex.recipe, base=missing)
        ex.submit(_jobs()[0])
        with pytest.raises(InputError, match="/nonexistent/shared/tiny.gguf is missing") as e:
            ex.wait()
        assert "shared" in e.value.message or "object store" in e.value.message


def test_the_object_store_copy_is_written_once_per_node_and_checked(tiny, tmp_path):
    """A shipped file lands in the worker's cache under its sha256; a copy with other bytes is refused."""
    data = tiny.read_bytes()
    s = Shipment.of(tiny, handle="ref")
    got = s.local(fetch=lambda h: data, prefer_handle=True)
    assert got != tiny and got.read_bytes() == data and s.sha256[:16] in str(got)
    assert s.local(fetch=lambda h: b"never fetched", prefer_handle=True) == got  # already there
    got.unlink()
    with pytest.raises(InputError, match="does not match its sha256"):
        s.local(fetch=lambda h: data[:-1] + b"x", prefer_handle=True)
    assert not got.exists()


# ------------------------------------------------------------------------------- campaigns on Ray
def _mine(store: Path):
    recs = Store(store).load()
    return recs, recs[recs["provenance_file"].fillna("").str.startswith("campaign:")]


def _json(p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout)


MEASURED = ["config", "types_key", "status", "chunk_offset", "n_chunks", "size_bytes", "kld_mean", "source"]


def test_synchronous_ray_gives_the_same_records_as_local(tiny, cluster, tmp_path):
    runs = {}
    for name, extra in (("local", []), ("ray", ["--executor", "ray", "--address", cluster.address, "--sync"])):
        d = tmp_path / name
        doc = _json(mq("campaign", "run", tiny, *CAMPAIGN, "--budget", 4, "--batch", 2, "--seed", 3, "--out", d / "out",
                       "--store", d / "store", *extra, timeout=900))  # fmt: skip
        recs, mine = _mine(d / "store")
        runs[name] = (doc, recs.sort_values(["chunk_offset", "types_key"])[MEASURED].reset_index(drop=True))
    assert runs["ray"][0]["executor"]["executor"] == "ray" and runs["ray"][0]["executor"]["mode"] == "synchronous"
    assert runs["local"][0]["confirmations"] == runs["ray"][0]["confirmations"] >= 2
    assert runs["local"][1].equals(runs["ray"][1])


def _wait_for_record(store: Path, p: subprocess.Popen, deadline: float) -> None:
    while time.time() < deadline:
        if (store / "STORE.json").exists() and any((r["provenance_file"] or "").startswith("campaign:")
                                                   for r in Store(store).records()):
            return
        assert p.poll() is None, p.stderr.read()[-4000:]
        time.sleep(0.2)
    raise AssertionError("no campaign record within the deadline")


def _tool_dir(tmp_path: Path, perplexity: str = "", quantize: str = "") -> Path:
    """The real llama.cpp tools behind shell wrappers that first run the given lines (--llama-bin DIR)."""
    import stat

    from mqpredict.llama.tools import find_tool

    d = tmp_path / "bin"
    d.mkdir()
    for name, pre in (("llama-perplexity", perplexity), ("llama-quantize", quantize)):
        f = d / name
        f.write_text(f'#!/usr/bin/env bash\n{pre}\nexec "{find_tool(name)}" "$@"\n')
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return d


@pytest.mark.parametrize("retries", [2, 0])
def test_a_worker_killed_mid_campaign(tiny, cluster, tmp_path, retries):
    """Asynchronous, tools engine on the workers, base and corpus through the object store. Once the
    campaign is confirming, llama-perplexity is made to pause 5 s (so a kill lands mid-task for sure) and
    the node of the worker running it is killed. With retries the task runs again on the other node and
    costs nothing; with none it is recorded `failed` (the cluster's reason) and the campaign goes on.
    Either way it completes with every record once."""
    out, store, ctl = tmp_path / "out", tmp_path / "store", tmp_path / "ctl"
    ctl.mkdir()
    pause = f'if [ -e "{ctl}/slow" ]; then echo $PPID > "{ctl}/running.tmp"; mv "{ctl}/running.tmp" "{ctl}/running"; sleep 5; fi'
    bin_dir = _tool_dir(tmp_path, perplexity=pause)
    args = ["campaign", "run", tiny, *CAMPAIGN, "--budget", 5, "--batch", 2, "--out", out, "--store", store,
            "--engine", "tools", "--llama-bin", bin_dir, "--executor", "ray", "--address", cluster.address,
            "--ship", "object-store", "--retries", retries]  # fmt: skip
    p = subprocess.Popen([*MQ, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
    try:
        _wait_for_record(store, p, time.time() + 1200)
        (ctl / "slow").touch()
        deadline = time.time() + 300
        while not (ctl / "running").exists():  # a worker is inside llama-perplexity now, for 5 s
            assert p.poll() is None and time.time() < deadline, "no measurement started"
            time.sleep(0.05)
        (ctl / "slow").unlink()
        cluster.kill_worker(cluster.node_of(int((ctl / "running").read_text())))
        stdout, stderr = p.communicate(timeout=900)
    finally:
        if p.poll() is None:
            p.kill()
        cluster.add_worker()  # the next tests get their two workers back
    assert p.returncode == 0, stderr[-4000:]
    assert stdout.strip(), stderr[-4000:]
    doc = json.loads(stdout)
    assert doc["executor"]["mode"] == "asynchronous"
    recs, mine = _mine(store)
    assert len(mine) == doc["confirmations"] == 5
    lost = mine[mine["status"] == "failed"]
    if retries:
        assert lost.empty, lost["status_reason"].tolist()
    else:
        assert len(lost) == 1 and lost["status_reason"].str.contains("Ray task failed 1 time").all()
    assert mine.groupby("chunk_offset")["types_key"].apply(lambda s: s.is_unique).all()  # nothing measured twice
    assert recs["key"].is_unique and recs[recs["source"] == "preset"]["types_key"].groupby(recs["chunk_offset"]).apply(
        lambda s: s.is_unique).all()  # fmt: skip
    assert (out / "survivors.md").exists()


def test_a_failing_llama_cpp_on_a_worker_is_recorded_failed(tiny, cluster, tmp_path):
    """The tools engine on the workers with --llama-bin (a llama-quantize that fails on every hybrid):
    each proposal comes back as a `failed` record with llama.cpp's reason; the campaign ends with its report."""
    fail = 'if [[ " $* " == *" --pure "* ]]; then echo "llama_model_quantize: failed to quantize: out of disk" >&2; exit 1; fi'
    bin_dir = _tool_dir(tmp_path, quantize=fail)
    store = tmp_path / "store"
    doc = _json(mq("campaign", "run", tiny, *CAMPAIGN, "--budget", 2, "--batch", 2, "--engine", "tools", "--llama-bin",
                   bin_dir, "--out", tmp_path / "out", "--store", store, "--executor", "ray", "--address",
                   cluster.address, timeout=900))  # fmt: skip
    recs, mine = _mine(store)
    assert len(mine) == doc["confirmations"] == 2
    assert (mine["status"] == "failed").all() and mine["status_reason"].str.contains("out of disk").all()
    assert (recs[recs["source"] == "preset"]["status"] == "ok").all()
    assert (tmp_path / "out" / "survivors.md").exists()


def test_a_killed_driver_resumes_on_ray_without_measuring_twice(tiny, cluster, tmp_path):
    out, store = tmp_path / "out", tmp_path / "store"
    ray_args = ["--executor", "ray", "--address", cluster.address]
    args = ["campaign", "run", tiny, *CAMPAIGN, "--budget", 4, "--batch", 2, "--out", out, "--store", store, *ray_args]
    p = subprocess.Popen([*MQ, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ)
    try:
        _wait_for_record(store, p, time.time() + 1200)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    before, mine_before = _mine(store)
    assert len(mine_before) >= 1
    doc = _json(mq("campaign", "resume", out, "--store", store, "--no-track", "--json", *ray_args, timeout=900))
    after, mine = _mine(store)
    assert len(mine) == doc["confirmations"] == 4
    assert set(before["key"]) <= set(after["key"])  # nothing lost
    assert mine.groupby("chunk_offset")["types_key"].apply(lambda s: s.is_unique).all()
    assert after["key"].is_unique


def test_bench_scale_times_one_and_two_workers_on_the_same_budget(tiny):
    """`bench scale` on the tiny model: both cluster sizes run the same budget; ratio and overheads reported."""
    doc = _json(mq("bench", "scale", tiny, "--corpus", CORPUS, "--ctx", 128, "--tokens", 512, "--budget", 2,
                   "--batch", 2, "--json", timeout=900))  # fmt: skip
    runs = {r["workers"]: r for r in doc["runs"]}
    assert set(runs) == {1, 2}
    assert runs[1]["confirmations"] == runs[2]["confirmations"] == 2
    assert runs[1]["tasks"] >= 2 + 3 and all(r["wall_s"] > r["waited_s"] > 0 for r in runs.values())
    assert doc["speedup_vs_1"]["2"] == pytest.approx(runs[1]["wall_s"] / runs[2]["wall_s"])
    assert all(r["submit_land_ms_per_task"] > 0 and r["driver_busy_s_per_task"] > 0 for r in runs.values())


def test_no_cluster_at_the_address_is_a_clear_error_at_once(tiny, tmp_path):
    t0 = time.time()
    p = mq("campaign", "run", tiny, *CAMPAIGN, "--out", tmp_path / "out", "--store", tmp_path / "store",
           "--executor", "ray", "--address", "127.0.0.1:1", timeout=120)  # fmt: skip
    assert p.returncode != 0 and "no Ray cluster answers at 127.0.0.1:1" in p.stderr and "Traceback" not in p.stderr
    assert time.time() - t0 < 60 and not (tmp_path / "out" / "campaign.json").exists()
