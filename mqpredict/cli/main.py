"""The ``mqpredict`` command: a thin typer layer over the library (one sub-module per area)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape

from mqpredict import __version__
from mqpredict.cli import (
    allocate_cmd, base_cmd, bench_cmd, campaign_cmd, data_cmd, imatrix_cmd, measure_cmd, model_cmds, surrogate_cmd,
    track_cmd,
)  # fmt: skip
from mqpredict.cli.common import State, err
from mqpredict.errors import MqError

app = typer.Typer(
    name="mqpredict",
    help="Find better mixed-precision (hybrid) GGUF quantizations for llama.cpp by learning from real KLD "
    "measurements. Start with `mqpredict demo`, or `mqpredict inspect MODEL.gguf`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        print(f"mqpredict {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and llama.cpp's own log on stderr.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    State.debug = debug
    if debug:
        from mqpredict.llama import runtime

        runtime.set_verbose(True)


model_cmds.register(app)
imatrix_cmd.register(app)
allocate_cmd.register(app)
measure_cmd.register(app)
app.command()(data_cmd.seed)
surrogate_cmd.register(app)
campaign_cmd.register(app)
app.add_typer(data_cmd.app, name="data")
app.add_typer(track_cmd.app, name="track")
app.command()(track_cmd.compare)
app.add_typer(base_cmd.app, name="base")
app.add_typer(bench_cmd.app, name="bench")


def main() -> None:
    """Console-script entry: user errors become one line on stderr and a non-zero exit."""
    try:
        app()
    except MqError as e:
        if State.debug:
            raise
        hint = f" [dim]— {escape(e.hint)}[/]" if e.hint else ""
        err.print(f"[bold red]error:[/] {escape(e.message)}{hint}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted: nothing half-written was kept")
        sys.exit(130)


if __name__ == "__main__":
    main()
