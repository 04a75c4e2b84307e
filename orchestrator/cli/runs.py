"""The commands that read what MLflow recorded: runs, runs upload."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
    from orchestrator.tracking import recent_runs

    with exit_on_error():
        rows = recent_runs(tracking_uri, experiment, limit)
    table(rows, empty="no runs")


def runs_upload(
    file: Annotated[Path, typer.Argument(help="A run's mlflow_pending.jsonl.")],
) -> None:
    """Send the reports a run kept while its MLflow server was down."""
    from orchestrator.tracking import upload_pending

    if not file.is_file():
        fail(f"error: {file}: no such file")
    with exit_on_error(file):
        sent = upload_pending(file)
    typer.echo(f"uploaded {sent} report(s) from {file}")
