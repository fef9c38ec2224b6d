"""The campaign on a real tiny model: paired margins, staged confirmations, the loop, resume after
kill -9, the report and its manifests, compare from MLflow."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import CORPUS, MQ, mq
from mqpredict.llama.engine import load_scores
from mqpredict.measure.corpus import EvalSpec
from mqpredict.quant.config import Config
from mqpredict.records.store import Store
from mqpredict.report.budget import Budget, kv_cache_bytes, run_memory
from mqpredict.report.survivors import Entry, Rules, pareto, select
from mqpredict.search.confirm import Reference, confirm, stage_specs
from mqpredict.pareto import Line, Point, hypervolume
from mqpredict.search.paired import Paired, against, holm, margin_to_line


def _json(p: subprocess.CompletedProcess):
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


# ----------------------------------------------------------------------------------- pure logic
def test_paired_margin_is_the_line_margin_with_a_smaller_error(engines):
    eng = engines["inprocess", "tiny"]
    m = {c: eng.measure(Config.parse(c)) for c in ("Q8_0", "Q6_K", "Q4_K_M", "default=Q5_0,ffn_down=Q6_K")}
    v = {c: load_scores(x.per_token_path).kld.astype(float) for c, x in m.items()}
    pts = [Point(m[c].bpw, m[c].stats.kld_mean, c) for c in ("Q8_0", "Q6_K", "Q4_K_M")]
    line = Line.from_presets(pts)
    h = m["default=Q5_0,ffn_down=Q6_K"]
    p = margin_to_line(v["default=Q5_0,ffn_down=Q6_K"], h.bpw, line, v)
    assert p.diff == pytest.approx(line.margin(Point(h.bpw, h.stats.kld_mean)), abs=1e-5)
    # the unpaired error of the same difference (each run's own relative error, added in quadrature)
    unpaired = math.hypot(h.stats.kld_mean_err / h.stats.kld_mean, m["Q6_K"].stats.kld_mean_err / m["Q6_K"].stats.kld_mean)
    assert 0 < p.se < unpaired
    same = against(v["Q8_0"], v["Q8_0"])
    assert same.diff == 0 and same.se == 0


def test_paired_decisions_use_t_quantiles_over_windows():
    # 8 windows: 7 degrees of freedom, one-sided 5% needs 1.895 errors; 2 windows (df 1) need 6.31
    assert Paired(-0.2, 0.1, 800, 8).below(0.05) and not Paired(-0.18, 0.1, 800, 8).below(0.05)
    assert Paired(0.3, 0.1, 800, 8).above(0.05) and not Paired(0.3, 0.1, 800, 8).below(0.05)
    assert not Paired(0.3, 0.1, 200, 2).above(0.05) and Paired(0.7, 0.1, 200, 2).above(0.05)
    assert not Paired(-5.0, 0.1, 100, 1).below(0.05)  # one window: no error estimate, nothing is significant


def test_the_error_is_a_window_block_error():
    """Tokens of one window move together: the block error sees it, a per-token error would not."""
    rng = np.random.default_rng(0)
    per_window, n_win = 50, 8
    shift = np.repeat(rng.normal(0, 0.3, n_win), per_window)  # a window-level effect the two configs do not share
    base = rng.gamma(2.0, 0.05, per_window * n_win)
    x = base * np.exp(shift)
    p = against(x, base, per_window)
    u = x / x.mean() - base / base.mean()
    per_token = u.std(ddof=1) / math.sqrt(len(u))
    assert p.blocks == n_win and p.df == 7
    assert p.se > 2 * per_token


def test_holm_keeps_the_wins_a_step_down_test_allows():
    t = lambda d: Paired(d, 0.1, 800, 8)  # noqa: E731
    strong, weak, none = t(-1.0), t(-0.21), t(0.0)
    assert holm([("a", strong), ("b", weak), ("c", none)], 0.05) == ["a"]  # b alone would pass at 0.05
    assert Paired(-0.21, 0.1, 800, 8).below(0.05)
    assert holm([("a", strong), ("b", weak)], 0.05) == ["a", "b"]


def test_hypervolume_of_a_staircase():
    assert hypervolume([(1, 1)], (3, 3)) == pytest.approx(4)
    assert hypervolume([(1, 2), (2, 1)], (3, 3)) == pytest.approx(1 * 1 + 1 * 2)
    assert hypervolume([(4, 1)], (3, 3)) == 0  # beyond the reference point


def test_survivor_rules():
    e = lambda n, b, k, win=False: Entry(n, n, n, "proposed", int(b * 1000), b, k, win)  # noqa: E731
    pts = [e("a", 3.0, 0.5), e("b", 3.05, 0.499), e("c", 4.0, 0.2), e("d", 4.5, 0.3), e("w", 4.02, 0.199, True)]
    assert [x.key for x in pareto(pts)] == ["a", "b", "c", "w"]
    cmp = lambda x, y: Paired(math.log(x.kld_mean / y.kld_mean), 0.001, 1000, 8)  # noqa: E731
    got = [x.key for x in select(pts, Rules(spacing_bpw=0.1, min_gain=0.02, alpha=0.05), cmp)]
    assert got == ["a", "w"]  # b: a near-duplicate without a real gain; w (a win) replaces c, its near-duplicate


def test_vram_budget_counts_the_kv_cache():
    desc = {"n_layers": 32, "n_embd": 4096, "n_head": 32, "n_head_kv": 8, "n_vocab": 128256}
    assert kv_cache_bytes(desc, 8192) == 2 * 32 * 8192 * 8 * 128 * 2  # Llama-3-8B: 1 GiB at 8k
    b = Budget(vram_bytes=8 * 10**9, ctx=8192)
    assert b.fits(5 * 10**9, 5.0, desc) and not b.fits(7 * 10**9, 7.0, desc)
    assert run_memory(0, desc, 0) > 0


# ----------------------------------------------------------------------------------- confirmations
def test_staged_confirmation_joins_to_the_full_measurement(engines):
    eng = engines["inprocess", "tiny"]
    spec = EvalSpec(ctx=128, n_chunks=8)
    first, rest = stage_specs(spec, 0.25)
    assert (first.n_chunks, rest.chunk_offset, rest.n_chunks) == (2, 2, 6)
    cfg = Config.parse("default=Q4_0,ffn_down=Q6_K")
    full = eng.measure(cfg, spec=spec)
    ref = Reference(Line(()), {}, [], spec.scored_per_chunk)  # no line: nothing can stop it
    o = confirm(eng, cfg, spec, ref, 0.25)
    assert o.complete and o.forward_tokens == 8 * 128
    assert o.measurement.stats.kld_mean == pytest.approx(full.stats.kld_mean, rel=1e-6)
    assert o.measurement.stats.ppl == pytest.approx(full.stats.ppl, rel=1e-6)
    assert o.measurement.n_chunks == 8


def test_a_hopeless_config_is_stopped_after_the_first_stage(engines):
    eng = engines["inprocess", "tiny"]
    spec = EvalSpec(ctx=128, n_chunks=8)
    m8 = eng.measure(Config.parse("Q8_0"), spec=spec)
    m6 = eng.measure(Config.parse("Q6_K"), spec=spec)
    vec = {"Q8_0": load_scores(m8.per_token_path).kld, "Q6_K": load_scores(m6.per_token_path).kld}
    line = Line.from_presets([Point(m8.bpw, m8.stats.kld_mean, "Q8_0"), Point(m6.bpw, m6.stats.kld_mean, "Q6_K")])
    # Q8_0 everywhere but ffn_down at Q2_K: inside the line's range and far above it
    o = confirm(eng, Config.parse("default=Q8_0,ffn_down=Q2_K"), spec, Reference(line, vec, [], spec.scored_per_chunk))
    assert not o.complete and "above the line" in o.reason
    assert o.measurement.n_chunks == 2 and o.forward_tokens == 2 * 128
    # the policy's default: above the line, but no measured config of at most its size beats it → measured in full
    free = Reference(line, vec, [], spec.scored_per_chunk, above_line_stops=False)
    o = confirm(eng, Config.parse("default=Q8_0,ffn_down=Q2_K"), spec, free)
    assert o.complete and o.measurement.n_chunks == 8 and o.margin.diff > 0
    # … while one that is beaten — Q6_K is smaller and better — stops after its first stage all the same
    assert o.measurement.bpw > m6.bpw
    dominated = Reference(line, vec, [(m6.bpw, "Q6_K")], spec.scored_per_chunk, above_line_stops=False)
    o = confirm(eng, Config.parse("default=Q8_0,ffn_down=Q2_K"), spec, dominated)
    assert not o.complete and "dominated by Q6_K" in o.reason


# ----------------------------------------------------------------------------------- the loop
@pytest.fixture(scope="module")
def campaign(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("campaign")
    doc = _json(mq("campaign", "run", tiny, "--corpus", CORPUS, "--ctx", 128, "--tokens", 512, "--budget", 8, "--batch", 3,
                   "--no-imatrix", "--out", d / "out", "--store", d / "store", "--json", "--vram-ctx", 4096,
                   timeout=1800))  # fmt: skip
    return d, doc


def test_campaign_spends_its_budget_and_records_everything_once(campaign):
    d, doc = campaign
    assert 1 <= doc["confirmations"] <= 8 and doc["budget"] == 8
    recs = Store(d / "store").load()
    mine = recs[recs["provenance_file"].fillna("").str.startswith("campaign:")]
    assert len(mine) == doc["confirmations"]
    search = mine[mine["chunk_offset"] == 0]
    assert search["types_key"].is_unique  # nothing measured twice
    partial = mine[mine["status"] == "partial"]
    assert (partial["n_chunks"] < 8).all() and partial["status_reason"].str.contains("stopped early").all()
    assert set(recs[recs["source"] == "preset"]["config"]) >= {"preset=Q8_0", "preset=Q4_K_M", "preset=Q2_K"}
    preds = [json.loads(x) for x in (d / "out" / "predictions.jsonl").read_text().splitlines()]
    assert {p["types_key"] for p in preds} >= set(search[search["source"] == "proposed"]["types_key"])
    by = {s: {p["types_key"] for p in preds if p["source"] == s} for s in ("warm-start", "allocator")}
    assert len(by["warm-start"]) == 1  # the warm start: the zero-run allocator's answer (budget 8)
    # the allocator's other answers are candidates EHVI weighs; the ones it chose are recorded as the allocator's
    assert set(search[search["source"] == "allocator"]["types_key"]) == (by["warm-start"] | by["allocator"]) & set(search["types_key"])
    assert all(p["kld_lo"] <= p["kld_pred"] <= p["kld_hi"] and p["ei"] > 0 for p in preds if p["source"] == "allocator")


def test_campaign_finds_wins_reconfirms_them_on_held_out_windows_and_reports_them(campaign):
    """The core claim, step by step: candidate wins on the search windows, each re-measured on windows the
    search never saw (right after them), kept by Holm's test there, and reported as wins."""
    d, doc = campaign
    recs = Store(d / "store").load()
    mine = recs[recs["provenance_file"].fillna("").str.startswith("campaign:")]
    search = mine[(mine["chunk_offset"] == 0) & (mine["status"] == "ok")]
    held = mine[mine["chunk_offset"] > 0]
    n_search = int(search["n_chunks"].iloc[0])
    # 1. the search found candidate wins: the campaign re-confirmed some (only candidates are re-confirmed)
    assert len(held) >= 1 and set(held["types_key"]) <= set(search["types_key"])
    # 2. on disjoint held-out windows: right after the search slice, as many of them
    assert (held["chunk_offset"] == n_search).all() and (held["n_chunks"] == n_search).all()
    presets_held = recs[(recs["source"] == "preset") & (recs["chunk_offset"] == n_search)]
    assert len(presets_held) >= 2  # the line is measured again there
    # 3. reported: the survivors' wins are exactly the configs re-confirmed below the line on the held-out
    # windows, each with a negative margin on both slices
    wins = [r for r in doc["survivors"] if r["nonlinear_win"]]
    assert doc["wins"] >= 1 and len(wins) >= 1
    for r in wins:
        assert r["margin_ln"] < 0 and r["heldout_margin_ln"] < 0
    assert {r["config"] for r in wins} <= set(held["config"])


def test_campaign_report_files_and_manifests(campaign, tiny, tmp_path):
    d, doc = campaign
    out = d / "out"
    assert (out / "pareto.png").stat().st_size > 10_000
    table = pd.read_csv(out / "survivors.csv")
    assert len(table) == len(doc["survivors"]) >= 2
    assert "preset=Q8_0" in set(table["config"])  # the largest preset is never dominated
    md = (out / "survivors.md").read_text()
    assert all(n in md for n in table["name"])
    found = {"proposed": "| search |", "allocator": "| allocator |", "preset": "| preset |"}
    assert all(found.get(s, f"| {s} |") in md for s in set(table["source"]))  # who found each: search or a free answer
    name = table.iloc[0]["name"]
    man = json.loads((out / "recipes" / f"{name}.manifest.json").read_text())
    assert man["statistics"]["kld_mean"] == pytest.approx(table.iloc[0]["kld_mean"])
    assert "llama-quantize" in man["rebuild"]["llama_quantize"] and man["tensor_types"]
    built = tmp_path / "rebuilt.gguf"
    im = ["--imatrix", out / "recipes" / man["imatrix"]["file"]] if man["imatrix"] else []  # beside the recipes
    mq("build", tiny, "--config", man["config"], "-o", built, *im, check=True)
    assert built.stat().st_size == man["size_bytes"]  # the manifest's rebuild gives the measured file


def test_report_picks_the_best_survivor_within_a_budget(campaign):
    d, doc = campaign
    rows = doc["survivors"]
    limit = sorted(r["size_bytes"] for r in rows)[len(rows) // 2]
    rep = _json(mq("report", d / "out", "--store", d / "store", "--target-size", str(limit), "--json"))
    fit = [r for r in rep["survivors"] if r["size_bytes"] <= limit]
    assert rep["chosen"]["name"] == min(fit, key=lambda r: r["kld_mean"])["name"]
    assert sum(r["chosen"] for r in rep["survivors"]) == 1


def test_resume_after_kill_9_loses_nothing_and_measures_nothing_twice(tiny, tmp_path):
    out, store = tmp_path / "out", tmp_path / "store"
    args = ["campaign", "run", str(tiny), "--corpus", str(CORPUS), "--ctx", "128", "--tokens", "512", "--budget", "5",
            "--batch", "2", "--out", str(out), "--store", str(store), "--no-track"]  # fmt: skip
    p = subprocess.Popen([*MQ, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:  # wait for the first confirmation to land, then kill -9
            if (store / "STORE.json").exists() and any((r["provenance_file"] or "").startswith("campaign:")
                                                       for r in Store(store).records()):
                break
            assert p.poll() is None, p.stderr.read()
            time.sleep(0.2)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    before = Store(store).load()
    n_before = before["provenance_file"].fillna("").str.startswith("campaign:").sum()
    assert n_before >= 1
    doc = _json(mq("campaign", "resume", out, "--store", store, "--no-track", "--json", timeout=900))
    after = Store(store).load()
    mine = after[after["provenance_file"].fillna("").str.startswith("campaign:")]
    assert len(mine) == doc["confirmations"] <= 5 and len(mine) >= n_before
    assert mine[mine["chunk_offset"] == 0]["types_key"].is_unique
    assert set(before["key"]) <= set(after["key"])  # nothing lost
    assert after[after["source"] == "preset"]["key"].is_unique
    assert (out / "survivors.md").exists()


def test_compare_two_campaigns_from_mlflow(tiny, tmp_path):
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    for name in ("a", "b"):
        mq("campaign", "run", tiny, "--corpus", CORPUS, "--ctx", 128, "--tokens", 512, "--budget", 3, "--batch", 3,
           "--no-imatrix", "--out", tmp_path / name, "--store", tmp_path / f"store-{name}", "--tracking-uri", uri,
           "--experiment", f"exp-{name}", "--seed", 0 if name == "a" else 1, check=True, timeout=900)  # fmt: skip
    rows = _json(mq("compare", "exp-a", "exp-b", "--tracking-uri", uri, "--plot", tmp_path / "cmp.png", "--json"))
    assert [r["name"] for r in rows] == ["exp-a", "exp-b"]
    for r, name in zip(rows, ("a", "b")):
        recs = Store(tmp_path / f"store-{name}").load()
        mine = recs[recs["provenance_file"].fillna("").str.startswith("campaign:") & (recs["chunk_offset"] == 0)]
        assert r["campaigns"] == 1 and r["confirmations"] == len(mine)
        q8 = recs[(recs["config"] == "preset=Q8_0") & (recs["chunk_offset"] == 0)]["kld_mean"].iloc[0]
        top = max(r["best_by_band"].values(), key=lambda x: x["bpw"])
        assert top["kld_mean"] <= q8 + 1e-12
    assert (tmp_path / "cmp.png").stat().st_size > 5_000
    import mlflow

    runs = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("exp-a").experiment_id])
    parent = [r for r in runs if r.data.tags.get("mqpredict.kind") == "campaign"][0]
    assert "hypervolume" in parent.data.metrics and "confirmations" in parent.data.metrics
    arts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(parent.info.run_id)}
    assert {"survivors.md", "survivors.csv", "pareto.png", "recipes", "surrogate"} <= arts
    assert {a.path for a in mlflow.MlflowClient(uri).list_artifacts(parent.info.run_id, "surrogate")} >= {
        "surrogate/kld.txt", "surrogate/metadata.json"}  # LightGBM text + JSON, never pickle
    runs = mlflow.MlflowClient(uri).search_runs([parent.info.experiment_id])  # re-read: tags set at the end
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert any("kld_pred" in r.data.metrics for r in nested)
    tagged = [r.data.tags.get("survivor") for r in nested if r.data.tags.get("slice", "search") == "search"
              and r.data.tags.get("status") == "ok" and r.data.params.get("chunk_offset") == "0"]
    assert "yes" in tagged and set(tagged) <= {"yes", "no"}


def test_report_speed_measures_every_survivor_with_llama_bench(campaign):
    d, _doc = campaign
    rep = _json(mq("report", d / "out", "--store", d / "store", "--speed", "--objective", "speed", "--json", timeout=900))
    rows = rep["survivors"]
    assert all(r["speed_pp_ts"] > 0 and r["speed_tg_ts"] > 0 and r["speed_repeats"] == 5 for r in rows)
    assert rep["chosen"]["name"] == max(rows, key=lambda r: r["speed_tg_ts"])["name"]
    assert "tg tok/s" in (d / "out" / "survivors.md").read_text()
    p = mq("report", d / "out", "--store", d / "store", "--objective", "balanced")
    assert p.returncode != 0 and "--speed" in p.stderr


def test_clone_confirms_a_survivor_on_a_variant(campaign, tiny576, tmp_path):
    from mqpredict.base.testmodel import write_test_model

    d, doc = campaign
    variant = write_test_model(tmp_path / "variant.gguf", seed=4)  # same shapes, other weights: a "fine-tune"
    name = next(r["name"] for r in doc["survivors"] if r["source"] != "preset") if any(
        r["source"] != "preset" for r in doc["survivors"]) else doc["survivors"][0]["name"]  # fmt: skip
    rows = _json(mq("clone", variant, "--from", d / "out", "--store", d / "store", "--survivor", name, "--out",
                    tmp_path / "built", "--json", timeout=900))  # fmt: skip
    (r,) = rows
    src = next(x for x in doc["survivors"] if x["name"] == name)
    assert r["size_bytes"] == src["size_bytes"]  # same layout, same config: the same size
    assert r["kld_mean"] > 0 and r["kld_mean"] != pytest.approx(src["kld_mean"], rel=1e-6)  # measured on the variant
    assert Path(r["gguf"]).stat().st_size == r["size_bytes"]
    p = mq("clone", tiny576, "--from", d / "out", "--store", d / "store")
    assert p.returncode != 0 and "shape" in p.stderr and "Traceback" not in p.stderr


def test_a_failed_llama_run_is_recorded_and_the_campaign_goes_on(tiny, tmp_path):
    """The tools engine with a llama-quantize that fails on every hybrid (--pure builds): each proposal
    becomes a `failed` record with llama.cpp's reason, counts against the budget, and the campaign ends
    with its report."""
    import stat

    from mqpredict.llama.tools import find_tool

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(find_tool("llama-perplexity"), bin_dir / "llama-perplexity")
    q = bin_dir / "llama-quantize"
    q.write_text("#!/usr/bin/env bash\n"
                 'if [[ " $* " == *" --pure "* ]]; then echo "llama_model_quantize: failed to quantize: out of disk" >&2; exit 1; fi\n'
                 f'exec "{find_tool("llama-quantize")}" "$@"\n')  # fmt: skip
    q.chmod(q.stat().st_mode | stat.S_IEXEC)
    store = tmp_path / "store"
    doc = _json(mq("campaign", "run", tiny, "--corpus", CORPUS, "--ctx", 128, "--tokens", 512, "--budget", 2, "--batch", 2,
                   "--no-imatrix", "--engine", "tools", "--llama-bin", bin_dir, "--out", tmp_path / "out", "--store", store, "--no-track",
                   "--json", timeout=900))  # fmt: skip
    recs = Store(store).load()
    mine = recs[recs["provenance_file"].fillna("").str.startswith("campaign:")]
    assert len(mine) == doc["confirmations"] == 2
    assert (mine["status"] == "failed").all() and mine["status_reason"].str.contains("out of disk").all()
    assert (recs[recs["source"] == "preset"]["status"] == "ok").all()
    assert (tmp_path / "out" / "survivors.md").exists()


def test_propose_exports_recipes_for_configs_not_yet_measured(campaign, tiny, tmp_path):
    d, _doc = campaign
    rows = _json(mq("propose", tiny, "--n", 3, "-o", tmp_path / "next", "--store", d / "store", "--corpus", CORPUS,
                    "--ctx", 128, "--tokens", 512, "--json", timeout=600))  # fmt: skip
    assert 1 <= len(rows) <= 3
    measured = set(Store(d / "store").load()["types_key"])
    for r in rows:
        assert r["types_key"] not in measured and r["kld_lo"] <= r["kld_pred"] <= r["kld_hi"]
        assert Path(r["recipe"]).exists() and r["command"].startswith("llama-quantize")
    assert json.loads((tmp_path / "next" / "proposals.json").read_text()) == rows
    p = mq("propose", tiny, "--store", tmp_path / "empty", "--corpus", CORPUS, "-o", tmp_path / "x")
    assert p.returncode != 0 and "seed it first" in p.stderr


# ----------------------------------------------------------------------------------- settings never dropped
def test_state_differences_name_every_setting_that_differs():
    from dataclasses import replace

    from mqpredict.workflows.campaign import Probes, Settings, State

    a = State("id1", "/m/a.gguf", "corpus-1", "/c/a.txt", "inprocess", 128, 4, 0, "m" * 64, "fam", Settings(), "t", "", "")
    same = replace(a, id="id2", created="t2", base="/elsewhere/a.gguf", corpus_path="/x.txt")  # same content elsewhere
    assert a.differences(same) == []
    b = replace(a, n_chunks=8, imatrix_id="abcd", settings=Settings(budget=6, batch=2, seed=1, probes=Probes.no,
                                                                     types=("Q8_0", "Q4_K")))  # fmt: skip
    d = a.differences(b)
    assert d == ["slice (--tokens/--ctx windows) 4 in the folder, 8 asked", "imatrix none in the folder, abcd asked",
                 "budget 20 in the folder, 6 asked", "batch 4 in the folder, 2 asked", "probes auto in the folder, no asked",
                 "types Q8_0,Q6_K,Q5_K,Q5_0,Q4_K,Q4_0,IQ4_NL,IQ4_XS,Q3_K,Q2_K in the folder, Q8_0,Q4_K asked",
                 "seed 0 in the folder, 1 asked"]  # fmt: skip
    other = replace(a, model_id="n" * 64, base="/m/b.gguf")
    assert a.differences(other) == [f"base a.gguf ({'m' * 12}) in the folder, b.gguf ({'n' * 12}) asked"]


SMALL_CAMPAIGN = ["--corpus", CORPUS, "--ctx", 128, "--tokens", 256, "--batch", 2, "--types", "Q8_0,Q6_K,Q4_K,Q3_K",
                  "--no-imatrix", "--no-track", "--threads", 1]  # fmt: skip


def test_campaign_only_seeds_the_chosen_presets_and_the_reference(tiny, tmp_path):
    """--only: a cheap line on a big model — the chosen presets and Q8_0 (the reference) are seeded, no other;
    a preset the seed cannot measure here is refused before anything runs."""
    store = tmp_path / "store"
    doc = _json(mq("campaign", "run", tiny, *SMALL_CAMPAIGN, "--budget", 1, "--only", "Q4_K_M", "--only", "Q6_K",
                   "--out", tmp_path / "out", "--store", store, "--json", timeout=900))  # fmt: skip
    recs = Store(store).load()
    presets = recs[(recs["source"] == "preset") & (recs["chunk_offset"] == 0)]
    assert sorted(presets["config"]) == ["preset=Q4_K_M", "preset=Q6_K", "preset=Q8_0"]
    assert doc["confirmations"] == 1
    state = json.loads((tmp_path / "out" / "campaign.json").read_text())
    assert state["settings"]["presets"] == ["Q4_K_M", "Q6_K"]
    p = mq("campaign", "run", tiny, *SMALL_CAMPAIGN, "--only", "IQ2_XXS", "--out", tmp_path / "o2", "--store", store)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "IQ2_XXS" in p.stderr and "imatrix" in p.stderr
    p = mq("campaign", "run", tiny, *SMALL_CAMPAIGN, "--only", "Q4_K_Z", "--out", tmp_path / "o2", "--store", store)
    assert p.returncode == 2 and "Q4_K_Z" in p.stderr and not (tmp_path / "o2" / "campaign.json").exists()


def test_campaign_run_into_a_folder_with_other_settings_stops_and_force_starts_over(tiny, tmp_path):
    """`campaign run` never continues a campaign with other settings than asked: it names them and the ways on;
    the same settings continue it; --force starts over there, keeping every record of the store — and the new
    campaign does not propose what the old one measured (it would only meet the stored record, again and again)."""
    out, store = tmp_path / "out", tmp_path / "store"
    first = _json(mq("campaign", "run", tiny, *SMALL_CAMPAIGN, "--budget", 2, "--out", out, "--store", store, "--json",
                     timeout=900))  # fmt: skip
    state, before = (out / "campaign.json").read_bytes(), Store(store).load()
    p = mq("campaign", "run", tiny, *SMALL_CAMPAIGN, "--budget", 3, "--seed", 1, "--out", out, "--store", store)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    msg = " ".join(p.stderr.split())
    assert "budget 2 in the folder, 3 asked" in msg and "seed 0 in the folder, 1 asked" in msg
    assert f"campaign resume {out}" in msg and "--force" in msg and "another --out" in msg
    assert "batch" not in msg  # the same batch: not named
    p = mq("campaign", "run", tiny, *SMALL_CAMPAIGN, "--budget", 2, "--tokens", 512, "--out", out, "--store", store)
    assert p.returncode == 2 and "slice" in p.stderr
    assert (out / "campaign.json").read_bytes() == state and Store(store).load()["key"].tolist() == before["key"].tolist()

    again = _json(mq("campaign", "run", tiny, *SMALL_CAMPAIGN, "--budget", 2, "--out", out, "--store", store, "--json",
                     timeout=900))  # the same settings: the same campaign, continued (nothing left to spend)  # fmt: skip
    assert again["campaign_id"] == first["campaign_id"] and again["confirmations"] == first["confirmations"]
    assert len(Store(store).load()) == len(before)

    new = _json(mq("campaign", "run", tiny, *SMALL_CAMPAIGN, "--budget", 3, "--seed", 1, "--force", "--out", out,
                   "--store", store, "--json", timeout=900))  # fmt: skip
    assert new["campaign_id"] != first["campaign_id"] and new["budget"] == 3
    assert json.loads((out / "campaign.json").read_text())["id"] == new["campaign_id"]
    after = Store(store).load()
    assert set(before["key"]) <= set(after["key"])  # --force loses no record
    tag = after["provenance_file"].fillna("")
    old = after[tag == f"campaign:{first['campaign_id']}"]
    mine = after[tag == f"campaign:{new['campaign_id']}"]
    assert len(old) == first["confirmations"] and len(mine) == new["confirmations"] >= 1
    assert not set(mine["types_key"]) & set(old[old["chunk_offset"] == 0]["types_key"])
