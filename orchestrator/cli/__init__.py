"""The `orch` command line: thin commands, each parses, calls one API function, prints.

The commands live by what they work on (workloads.py: this machine, jobs.py: a Ray cluster,
runs.py: MLflow); errors.py maps exceptions to exit codes. This module is their table.
"""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator import __version__
from orchestrator.cli.export import export
from orchestrator.cli.jobs import job_run, list_jobs, logs, status, stop, submit
from orchestrator.cli.runs import runs, runs_upload
from orchestrator.cli.workloads import data_prepare, run, schema, show, tune, validate

__all__ = ["app", "main"]

app = typer.Typer(
    name="orch",
    help="Run declarative training workloads on Ray: validate, run, submit, tune.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"orch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Run declarative training workloads on Ray: validate, run, submit, tune."""


# `orch --help` lists the commands in this order.
for command in (validate, show, run, tune, submit, status, logs, stop):
    app.command()(command)
app.command("list")(list_jobs)
app.command("job-run", hidden=True)(job_run)
app.command()(schema)
app.command()(export)

data_app = typer.Typer(help="Prepare datasets.", no_args_is_help=True)
data_app.command("prepare")(data_prepare)
app.add_typer(data_app, name="data")

runs_app = typer.Typer(help="Recorded runs (MLflow).", invoke_without_command=True)
runs_app.callback()(runs)
runs_app.command("upload")(runs_upload)
app.add_typer(runs_app, name="runs")


def main() -> None:
    app()
