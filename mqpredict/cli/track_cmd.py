"""``mqpredict track …``: the MLflow side of the records."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from mqpredict.cli.common import ExperimentOpt, JsonOpt, TrackingUriOpt, emit_json, err, make_tracker, progress_bar
from mqpredict.cli.data_cmd import StoreOpt, _store
from mqpredict.errors import MqError

app = typer.Typer(help="MLflow tracking of records (the embedded sqlite store or a tracking server).",
                  no_args_is_help=True)  # fmt: skip


@app.command()
def sync(store: StoreOpt = None, tracking_uri: TrackingUriOpt = None, experiment: ExperimentOpt = None,
         json: JsonOpt = False) -> None:  # fmt: skip
    """Log to MLflow every record that has no run yet (e.g. measured while the server was down).

    A run already in MLflow for a record (found by its record-key tag) is reused, never duplicated; the
    records then keep their run ids.
    """
    from mqpredict.tracking import sync as do_sync

    st = _store(store, create=False)
    tracker = make_tracker(False, tracking_uri, experiment)
    with progress_bar(not json) as progress:
        doc = do_sync(st, tracker, progress)
    doc = {"store": str(st.root), "tracking_uri": tracker.uri, **doc}
    if json:
        emit_json(doc)
    else:
        err.print(f"{doc['missing']} record(s) without a run: logged {doc['logged']}, found already logged "
                  f"{doc['already_logged']}; store updated for {doc['updated']}", highlight=False)  # fmt: skip
    if doc["offline"]:
        raise MqError(f"MLflow at {tracker.uri} is not reachable ({doc['offline']})", "try again when it is up")


def compare(
    names: Annotated[list[str], typer.Argument(help="Experiment names or campaign run ids (two or more).")],
    tracking_uri: TrackingUriOpt = None,
    plot: Annotated[Path, typer.Option("--plot", help="Where to write the overlaid Pareto plot.")] = Path("out/compare.png"),
    json: JsonOpt = False,
) -> None:
    """Compare experiments or campaign runs from MLflow: best measured config per size band, wins found,
    confirmations spent, surrogate accuracy, and an overlaid Pareto plot (works against a server too)."""
    from rich.table import Table

    from mqpredict.cli.common import out
    from mqpredict.compare import compare as do_compare
    from mqpredict.compare import plot as do_plot
    from mqpredict.tracking import default_uri

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    items = do_compare(names, uri)
    png = do_plot(plot, items)
    if json:
        emit_json([{**it.to_json(), "plot": str(png)} for it in items])
        return
    t = Table(title="comparison", show_edge=False)
    t.add_column("")
    for it in items:
        t.add_column(it.name, justify="right")
    mae = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
    t.add_row("campaigns", *[str(it.campaigns) for it in items])
    t.add_row("measurements", *[str(it.runs) for it in items])
    t.add_row("confirmations", *[str(it.confirmations) for it in items])
    t.add_row("wins (re-confirmed)", *[str(it.wins) for it in items])
    t.add_row("surrogate MAE (ln KLD)", *[mae(it.surrogate_mae_ln) for it in items])
    bands = sorted({b for it in items for b in it.best_by_band}, key=lambda b: float(b.lstrip("≥").split("–")[0]))
    for b in bands:
        cells = []
        for it in items:
            x = it.best_by_band.get(b)
            cells.append("" if x is None else f"{x['kld_mean']:.4f} ({x['config'].removeprefix('preset=')[:28]})")
        t.add_row(f"best KLD {b}", *cells)
    out.print(t)
    out.print(f"plot: {png}", highlight=False)
