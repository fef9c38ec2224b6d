"""Two end states of the same campaign compared: records, per-token files, MLflow runs, the report.

Used by ``mqpredict bench faults`` (a run killed many times vs one never interrupted). Records are the
same when their keys are the same and their measured values are equal (volatile fields — timestamp, run
id, provenance — aside); the report is the same when the survivors table, its Markdown and the recipes are
equal byte for byte once the campaign id (which differs by construction) is masked.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from mqpredict.records.schema import Record
from mqpredict.records.store import Store
from mqpredict.tracking import RECORD_TAG


def duplicated(records: list[Record]) -> int:
    """Measurements beyond the first of one file on one slice (same types, window offset and corpus)."""
    c = Counter((r["model_id"], r["corpus"], r["ctx"], r["chunk_offset"], r["types_key"], r["build"]) for r in records)
    return sum(n - 1 for n in c.values())


def per_token_problems(store: Path, records: list[Record], reference: dict[str, Record], ref_store: Path) -> list[str]:
    """Every per-token file that is missing, unreadable, of the wrong length, not matching its record's
    mean KLD, or different from the reference run's vector of the same record."""
    bad = []
    for r in records:
        want = reference.get(r.key)
        p = r["per_token_path"]
        if not p:
            if want is not None and want["per_token_path"]:
                bad.append(f"{r.key}: no per-token file (the reference has one)")
            continue
        try:
            v = np.load(store / p, allow_pickle=False)
            with np.load(store / p.replace(".kld.npy", ".scores.npz"), allow_pickle=False) as z:
                lengths = {len(z[k]) for k in z.files}
        except (OSError, ValueError, KeyError) as e:
            bad.append(f"{r.key}: {p} unreadable ({type(e).__name__})")
            continue
        if len(v) != r["n_tokens"] or lengths != {len(v)}:
            bad.append(f"{r.key}: {p} holds {len(v)} tokens, the record {r['n_tokens']}")
        elif not math.isclose(float(np.mean(v, dtype=np.float64)), r["kld_mean"], rel_tol=1e-5, abs_tol=1e-9):
            bad.append(f"{r.key}: {p} averages {np.mean(v):.6g}, the record says {r['kld_mean']:.6g}")
        elif want is not None and want["per_token_path"]:
            if not np.array_equal(v, np.load(ref_store / want["per_token_path"], allow_pickle=False)):
                bad.append(f"{r.key}: {p} differs from the reference run's vector")
    return bad


def mlflow_figures(uri: str, experiment: str, records: list[Record]) -> dict:
    """Measurement runs against records: each record once, by its key tag, and the run its record names."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=50000) if exp is not None else []
    measured = [r for r in runs if r.data.tags.get("mqpredict.kind") == "measurement"]
    tags = Counter(r.data.tags.get(RECORD_TAG) for r in measured)
    ids = {r.info.run_id: r.data.tags.get(RECORD_TAG) for r in measured}
    keys = {r.key for r in records}
    return {
        "mlflow_runs": len(measured),
        "mlflow_duplicated": sum(n - 1 for n in tags.values()),
        "mlflow_missing": sum(1 for k in keys if k not in tags),
        "mlflow_orphans": sum(1 for k in tags if k not in keys),
        "mlflow_mismatched": sum(1 for r in records if ids.get(r["mlflow_run_id"]) != r.key),
        "mlflow_unfinished": sum(1 for r in runs if r.info.status == "RUNNING"),
        "mlflow_campaign_runs": sum(1 for r in runs if r.data.tags.get("mqpredict.kind") == "campaign"),
    }


def _masked(path: Path, campaign_id: str) -> bytes | None:
    return path.read_bytes().replace(campaign_id.encode(), b"<campaign>") if path.exists() else None


def report_differences(ref_out: Path, got_out: Path) -> list[str]:
    """Report files that differ (campaign ids masked): the survivors table, its Markdown, every recipe."""
    import json

    ids = [json.loads((o / "campaign.json").read_text())["id"] for o in (ref_out, got_out)]
    names = ["survivors.csv", "survivors.md"]
    names += sorted({str(p.relative_to(o)) for o in (ref_out, got_out) for p in (o / "recipes").glob("*")})
    return [n for n in names if _masked(ref_out / n, ids[0]) != _masked(got_out / n, ids[1])
            or not (got_out / n).exists()]  # fmt: skip


def compare(ref_store: Path, ref_out: Path, ref_uri: str, got_store: Path, got_out: Path, got_uri: str,
            experiment: str) -> dict:  # fmt: skip
    """The figures of ``bench faults``: lost, duplicated, extra and differing records, per-token problems,
    MLflow runs against records (both runs), report files that differ; ``clean`` when all are zero."""
    ref = {r.key: r for r in Store(ref_store, create=False).records()}
    got_list = Store(got_store, create=False).records()
    got = {r.key: r for r in got_list}
    lost = sorted(set(ref) - set(got))
    extra = sorted(set(got) - set(ref))
    differing = sorted(k for k in set(ref) & set(got) if ref[k].measured() != got[k].measured())
    pt = per_token_problems(got_store, got_list, ref, ref_store)
    ml = mlflow_figures(got_uri, experiment, got_list)
    ml_ref = mlflow_figures(ref_uri, experiment, list(ref.values()))
    rep = report_differences(ref_out, got_out)
    ml_bad = ml["mlflow_duplicated"] + ml["mlflow_missing"] + ml["mlflow_orphans"] + ml["mlflow_mismatched"]
    out = {
        "records": len(got), "reference_records": len(ref), "lost": len(lost), "duplicated": duplicated(got_list),
        "extra": len(extra), "differing": len(differing), "per_token_checked": sum(bool(r["per_token_path"]) for r in got_list),
        "per_token_bad": len(pt), **ml, "reference_mlflow": ml_ref,
        "report_identical": not rep, "report_differences": rep,
        "examples": {"lost": lost[:3], "extra": extra[:3], "differing": differing[:3], "per_token": pt[:3]},
    }  # fmt: skip
    out["clean"] = not (lost or extra or differing or pt or rep or out["duplicated"] or ml_bad
                        or ml["mlflow_unfinished"] or ml["mlflow_campaign_runs"] != 1)  # fmt: skip
    return out
