"""The fault campaign: kill -9 at drawn points of every phase, resume, nothing lost (a small version of
`mqpredict bench faults --kills 20`, whose figure the README states)."""

from __future__ import annotations

import json

from conftest import mq
from mqpredict.bench.faults import draw


def test_kill_points_cover_every_phase_in_time_order():
    trace = [f"{p}:{i}" for i in range(30) for p in ("build", "measure", "store", "mlflow")] + ["report:a", "report:b"]
    trace += ["measure:0", "propose:x"]  # a repeated point counts once, at its first time
    got = draw(trace, 12, seed=3)
    assert len(got) == len(set(got)) == 12
    assert got == sorted(got, key=trace.index)  # in time order
    n = {p: [g.split(":")[0] for g in got].count(p) for p in ("build", "measure", "store", "mlflow", "report", "propose")}
    assert all(n[p] >= 2 for p in ("build", "measure", "store", "mlflow")) and n["report"] == 2 and n["propose"] == 1
    assert sum(n.values()) == 12  # the share propose could not take went elsewhere
    assert draw(trace, 12, seed=3) == got and draw(trace, 12, seed=4) != got


def test_a_campaign_killed_three_times_ends_as_if_never_interrupted(tmp_path):
    doc = json.loads(mq("bench", "faults", "--kills", 3, "--budget", 2, "--work", tmp_path / "w", "--json",
                        check=True, timeout=3600).stdout)  # fmt: skip
    assert doc["kills"] == 3 and doc["missed"] == 0 and sum(doc["kills_by_phase"].values()) == 3
    assert len([p for p, n in doc["kills_by_phase"].items() if n]) == 3  # three kills, three phases
    assert doc["records"] == doc["reference_records"] > 16  # presets + confirmations + held-out
    assert doc["lost"] == doc["duplicated"] == doc["extra"] == doc["differing"] == 0
    assert doc["per_token_checked"] == doc["records"] and doc["per_token_bad"] == 0
    assert doc["mlflow_runs"] == doc["records"] and doc["mlflow_duplicated"] == doc["mlflow_missing"] == 0
    assert doc["mlflow_campaign_runs"] == 1 and doc["mlflow_unfinished"] == 0
    assert doc["report_identical"] and doc["confirmations"]["faulted"] == doc["confirmations"]["reference"]
    assert doc["ok"]


def test_a_kill_inside_a_batch_finishes_that_batch_as_it_was_asked(tmp_path):
    """Killed while the second config of the first batch is measured (the first one stored), the resumed
    campaign measures that second config — not a new proposal from the records it has now — and killed
    while writing the batch journal or re-confirming on held-out tokens it goes on the same way."""
    from mqpredict.bench.faults import Plan, run

    def aim(timeline: list[str], kills: int, seed: int) -> list[str]:
        first = next(i for i, x in enumerate(timeline) if x.startswith("propose:batch@"))
        second = [x for x in timeline if x.startswith("propose:")][1]  # the second proposal of that batch
        tk = second.split(":", 1)[1]
        inside = next(x for x in timeline[first:] if x.startswith(f"measure:{tk}@"))
        n = int(next(x for x in timeline if x.startswith("measure:base-") and "-o0-" in x).split("-n")[1].split("@")[0].split("-")[0])
        heldout = next((i for i, x in enumerate(timeline) if x.startswith("measure:") and not x.startswith("measure:base")
                        and "@" in x and int(x.rsplit("@", 1)[1]) >= n), None)  # the held-out slice's first window
        if heldout is None:  # no candidate win to re-confirm in this run: the last record logged instead
            heldout = max(i for i, x in enumerate(timeline) if x.startswith("mlflow:") and x.endswith(":created"))
        held = next(x for x in timeline[heldout:] if x.startswith("mlflow:") and x.endswith(":created"))
        return [timeline[first], inside, held]

    doc = run(Plan(kills=3, budget=3), tmp_path / "w", choose=aim)
    assert doc["kills"] == 3 and doc["missed"] == 0, doc["kill_points"]
    assert doc["lost"] == doc["extra"] == doc["differing"] == doc["duplicated"] == 0, doc["examples"]
    assert doc["report_identical"] and doc["ok"]
