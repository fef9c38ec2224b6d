"""``mqpredict bench …``: benchmarks that print ratios measured side by side in one run."""

from __future__ import annotations

import typer

app = typer.Typer(help="Benchmarks (ratios measured side by side in one run; never timed unit tests).",
                  no_args_is_help=True)  # fmt: skip
