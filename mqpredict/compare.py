"""Compare experiments or campaign runs from MLflow (an edge module, like tracking.py: it reads through the
MLflow search API, so it works on the embedded sqlite store and on a team's tracking server alike).

Each compared item is an experiment name (every campaign in it) or a campaign's parent run id. For each:
the best measured config per bpw band, the wins found (runs tagged ``nonlinear_win=yes``), the
confirmations spent (proposed and probe measurements), the surrogate's accuracy on them (mean absolute
error of ln KLD, predicted vs measured) and the points for an overlaid Pareto plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from mqpredict.errors import InputError
from mqpredict.tracking import _retry
from mqpredict.util.figures import save_figure

#: bpw bands of the comparison table (upper edges)
BANDS = (3.0, 4.0, 5.0, 6.0, 7.0, 9.0, 17.0)


@dataclass
class Compared:
    name: str
    runs: int = 0  # measurement runs
    campaigns: int = 0
    confirmations: int = 0
    wins: int = 0
    surrogate_mae_ln: float | None = None
    best_by_band: dict[str, dict] = field(default_factory=dict)
    points: list[tuple[float, float, str]] = field(default_factory=list)  # (bpw, kld_mean, source)

    def to_json(self) -> dict:
        return {"name": self.name, "runs": self.runs, "campaigns": self.campaigns, "confirmations": self.confirmations,
                "wins": self.wins, "surrogate_mae_ln": self.surrogate_mae_ln, "best_by_band": self.best_by_band}  # fmt: skip


def _band(bpw: float) -> str:
    lo = 0.0
    for hi in BANDS:
        if bpw < hi:
            return f"{lo:g}–{hi:g} bpw"
        lo = hi
    return f"≥{BANDS[-1]:g} bpw"


def _summarise(name: str, parents: list, children: list) -> Compared:
    c = Compared(name, runs=len(children), campaigns=len(parents))
    errs = []
    offsets = [int(r.data.params["chunk_offset"]) for r in children if "chunk_offset" in r.data.params]
    search_offset = min(offsets) if offsets else 0  # held-out slices come after the search slice
    for r in children:
        m, t, p = r.data.metrics, r.data.tags, r.data.params
        if "kld_mean" not in m or "bpw" not in m or t.get("status") == "failed":
            continue
        source = t.get("source", p.get("source", ""))
        if source in ("proposed", "probe", "allocator") and t.get("slice", "search") == "search":
            c.confirmations += 1
        if t.get("nonlinear_win") == "yes" and t.get("slice") == "search":
            c.wins += 1  # the search-slice run of a re-confirmed win (its held-out run is the evidence)
        if "pred_error_ln" in m:
            errs.append(abs(m["pred_error_ln"]))
        if t.get("status") == "partial":
            continue
        if t.get("slice", "search") != "search" or int(p.get("chunk_offset", search_offset)) != search_offset:
            continue
        c.points.append((m["bpw"], m["kld_mean"], source))
        b = _band(m["bpw"])
        best = c.best_by_band.get(b)
        if best is None or m["kld_mean"] < best["kld_mean"]:
            c.best_by_band[b] = {"config": p.get("config", r.info.run_name), "bpw": m["bpw"], "kld_mean": m["kld_mean"],
                                 "source": source}  # fmt: skip
    c.best_by_band = dict(sorted(c.best_by_band.items(), key=lambda kv: kv[1]["bpw"]))
    c.surrogate_mae_ln = sum(errs) / len(errs) if errs else None
    return c


def compare(names: list[str], uri: str) -> list[Compared]:
    """One :class:`Compared` per experiment name or campaign run id."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    out = []
    for name in names:
        exp = _retry(lambda: client.get_experiment_by_name(name), "reading experiments")
        if exp is not None:
            runs = _retry(lambda: client.search_runs([exp.experiment_id], max_results=50000), "searching runs")
            parents = [r for r in runs if r.data.tags.get("mqpredict.kind") == "campaign"]
            ids = {r.info.run_id for r in parents}
            children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in ids] if parents else \
                [r for r in runs if r.data.tags.get("mqpredict.kind") == "measurement"]  # fmt: skip
            out.append(_summarise(name, parents, children))
            continue
        try:
            run = _retry(lambda: client.get_run(name), "reading a run")
        except MlflowException:
            raise InputError(f"{name!r} is neither an experiment nor a run in {uri}",
                             "list them with `mlflow experiments search` or the MLflow UI; give --tracking-uri for a server") from None  # fmt: skip
        children = _retry(lambda: client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{name}'",
                                                     max_results=50000), "searching runs")  # fmt: skip
        out.append(_summarise(run.info.run_name or name, [run], children))
    return out


def plot(path: Path, items: list[Compared]) -> Path:
    """The measured points and Pareto fronts of every compared item, overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    for i, it in enumerate(items):
        color = f"C{i % 10}"
        pts = sorted(it.points)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, alpha=0.5, color=color)
        front, best = [], math.inf
        for b, k, _ in pts:
            if k < best:
                front.append((b, k))
                best = k
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=color, label=f"{it.name} ({it.wins} wins)")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("mean KLD")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return path
