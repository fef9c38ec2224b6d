"""``mqpredict track …``: the MLflow side of the records."""

from __future__ import annotations

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
