"""The command that exports a finished run's model: export."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from orchestrator import api
from orchestrator.cli.errors import exit_on_error
from orchestrator.spec import DEFAULT_TOLERANCE, EXPORT_FORMATS

__all__ = ["export"]

# typer lists an Enum's values as the allowed ones and refuses others with exit code 2.
FormatChoice = Enum("FormatChoice", {name: name for name in EXPORT_FORMATS}, type=str)  # type: ignore[misc]


def export(
    run_dir: Annotated[
        str,
        typer.Argument(
            help="A finished run's directory (orch_runs/<name>, or s3://bucket/runs/<name>) "
            "or its model/."
        ),
    ],
    formats: Annotated[
        list[FormatChoice],
        typer.Option("--format", "-f", help="Format to export to (repeatable)."),
    ],
    tolerance: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Refuse an export whose outputs differ from eager PyTorch's by more than this.",
        ),
    ] = DEFAULT_TOLERANCE,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            help="MLflow store of the run; default: $MLFLOW_TRACKING_URI, else ./mlflow.db."
        ),
    ] = None,
    no_tracking: Annotated[
        bool, typer.Option("--no-tracking", help="Do not log the export to the run's MLflow run.")
    ] = False,
) -> None:
    """Export a finished run's fp32 model to ONNX or TorchScript, beside it in model/, checked
    against eager PyTorch on the run's eval batches."""
    with exit_on_error():  # every export error names its file
        exported = api.export(
            run_dir,
            [f.value for f in formats],
            tolerance=tolerance,
            tracking=not no_tracking,
            tracking_uri=tracking_uri,
            log=typer.echo,
        )
    for note in exported.notes:
        typer.echo(note)
