"""The commands that read what MLflow recorded: runs, runs upload."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator import api
from orchestrator.cli.errors import exit_on_error, fail
from orchestrator.cli.output import table

__all__ = ["runs", "runs_upload"]


def runs(
    ctx: typer.Context,
    experiment: Annotated[str | None, typer.Option(help="Only this experiment.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many runs to show.")] = 20,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else ./mlflow.db."),
    ] = None,
) -> None:
    """A table of recent runs: id, workload, status, key metrics, duration."""
    if ctx.invoked_subcommand is not None:
        return
    with exit_on_error():
        rows = api.runs(tracking_uri=tracking_uri, experiment=experiment, limit=limit)
    table(rows, empty="no runs")


def runs_upload(
    file: Annotated[Path, typer.Argument(help="A run's mlflow_pending.jsonl.")],
) -> None:
    """Send the reports a run kept while its MLflow server was down."""
    if not file.is_file():
        fail(f"error: {file}: no such file")
    with exit_on_error(file):
        sent = api.upload_runs(file)
    typer.echo(f"uploaded {sent} report(s) from {file}")
