"""The arguments and options that several commands share, each defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = [
    "ClusterAddressOption",
    "FollowOption",
    "JobArgument",
    "NoTrackingOption",
    "RayAddressOption",
    "RunNameOption",
    "SetOption",
    "SmokeDirOption",
    "SmokeOption",
    "TrackOption",
    "VerboseOption",
    "WorkloadArgument",
]

WorkloadArgument = Annotated[Path, typer.Argument(help="Workload file.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a field before validation, e.g. --set train.optimizer.lr=3e-4 (repeatable).",
    ),
]
RunNameOption = Annotated[
    str | None,
    typer.Option(help="Run name (default: the workload name); the same name resumes."),
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's logs.")]
NoTrackingOption = Annotated[
    bool, typer.Option("--no-tracking", help="Do not record this run or sweep in MLflow.")
]

# Where to train: a Ray address for `orch run` and `orch tune`...
RayAddressOption = Annotated[
    str | None, typer.Option(help="Ray address; default: start Ray on this machine.")
]
# ...and a cluster's dashboard for the job commands.
ClusterAddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray dashboard URL (http://HEAD:8265); default: $ORCH_ADDRESS, else $RAY_ADDRESS.",
    ),
]
JobArgument = Annotated[str, typer.Argument(help="Job id, as printed by orch submit.")]
FollowOption = Annotated[
    bool, typer.Option("--follow", "-f", help="Stream the job's logs until it ends.")
]

# Smoke runs: any workload, shrunk to this machine (orchestrator.smoketest).
SmokeOption = Annotated[
    bool,
    typer.Option(
        "--smoke",
        help="Shrink the workload to this machine and run it through every stage in a few "
        "steps: data, training, evaluation, a checkpoint, a resume, the export.",
    ),
]
SmokeDirOption = Annotated[
    Path | None,
    typer.Option(help="Where a smoke run keeps its runs, data and MLflow (default .orch/smoke)."),
]
TrackOption = Annotated[
    bool,
    typer.Option(
        "--track", help="With --smoke: record the smoke run in an MLflow store in --smoke-dir."
    ),
]
