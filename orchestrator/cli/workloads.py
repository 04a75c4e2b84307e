"""The commands that work on this machine: validate, show, schema, data prepare, run, tune."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from orchestrator import api
from orchestrator.cli.errors import error_lines, exit_on_error, exit_on_stop, fail, print_error
from orchestrator.cli.options import (
    NoTrackingOption,
    RayAddressOption,
    RunNameOption,
    SetOption,
    SmokeDirOption,
    SmokeOption,
    TrackOption,
    VerboseOption,
    WorkloadArgument,
)
from orchestrator.cli.output import Progress
from orchestrator.load import SpecError
from orchestrator.masking import mask, public_yaml
from orchestrator.spec import WorkloadSpec

__all__ = ["data_prepare", "load_spec", "run", "schema", "show", "tune", "validate"]


def load_spec(file: Path, overrides: list[str] | None) -> WorkloadSpec:
    """Load a workload or exit 2 with every problem."""
    with exit_on_error():
        return api.validate(file, overrides or [])


def validate(
    files: Annotated[list[Path], typer.Argument(help="Workload files to check.")],
    overrides: SetOption = None,
) -> None:
    """Check workload files; exit 0 if all are valid, else 2 with every error."""
    failed = 0
    for path in files:
        try:
            spec = api.validate(path, overrides or [])
        except SpecError as error:  # reported, and the next file is checked all the same
            failed += 1
            print_error(*error_lines(error))
            continue
        typer.echo(f"ok: {path} ({spec.name}, {spec.model.kind})")
    if failed:
        fail(f"{failed} of {len(files)} workload(s) invalid")


def show(file: WorkloadArgument, overrides: SetOption = None) -> None:
    """Print the fully resolved workload (extends, --set and defaults applied) as YAML, with
    env var values and credentials masked."""
    spec = load_spec(file, overrides)
    typer.echo(public_yaml(spec), nl=False)


def schema() -> None:
    """Print the JSON Schema of workload files (for editor validation and completion)."""
    typer.echo(json.dumps(api.schema(), indent=2))


def data_prepare(
    file: Annotated[Path, typer.Argument(help="Workload file whose data section to prepare.")],
    overrides: SetOption = None,
    address: RayAddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Tokenize/convert a workload's raw data into cached Parquet shards (reused when unchanged)."""
    spec = load_spec(file, overrides)
    with exit_on_error(f"{file}: data"):
        prepared = api.prepare(spec, address=address, verbose=verbose, log=typer.echo)
    splits = prepared.manifest["splits"]
    typer.echo(
        f"{prepared.root or spec.data.train}: {splits['train']['rows']} train rows in "
        f"{len(splits['train']['shards'])} shard(s), {splits['eval']['rows']} eval rows"
    )


def run(
    file: WorkloadArgument,
    overrides: SetOption = None,
    address: RayAddressOption = None,
    name: RunNameOption = None,
    verbose: VerboseOption = False,
    no_tracking: NoTrackingOption = False,
    smoke: SmokeOption = False,
    smoke_dir: SmokeDirOption = None,
    track: TrackOption = False,
) -> None:
    """Train a workload on this machine (or on --address), resuming a run of the same name.

    A workload with a tune section runs its sweep (like orch tune), continuing one of that name;
    one with a cv section, its k-fold cross-validation (one run per fold, then mean +- std).
    With --smoke, any workload (a cluster's too) runs shrunk to this machine, as a check.
    """
    _smoke_options_need_smoke(smoke, smoke_dir, track)
    spec = load_spec(file, overrides)
    if smoke:
        _smoke(file, spec, address, name, smoke_dir, track, verbose)
        return
    if spec.tune is not None:
        _sweep(file, spec, address, name, None, verbose, not no_tracking)
        return
    if spec.cv is not None:
        _cross_validate(file, spec, address, name, verbose, not no_tracking)
        return
    hint = "rerun with --verbose for Ray's logs; checkpoints are kept"
    stopped = "the checkpoints are kept: run it again to resume"
    # The progress line ends before an error is printed.
    with exit_on_stop(stopped), exit_on_error(file, hint=hint), Progress() as progress:
        result = api.run(
            spec,
            address=address,
            name=name,
            verbose=verbose,
            tracking=not no_tracking,
            log=progress.note,
            on_progress=progress.show,
        )
    m = result.metrics
    typer.echo(f"done: {result.name} in {result.seconds:.0f} s, step {m.get('step', '?')}")
    shown = {k: v for k, v in m.items() if k == "loss" or k.startswith("eval_")}
    if shown:
        typer.echo("  " + "  ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    typer.echo(f"  run directory: {result.path}")
    if result.model_dir:
        typer.echo(f"  model: {result.model_dir} (orchestrator.models.load_exported)")
    if result.mlflow_run_id:
        typer.echo(f"  MLflow run: {result.mlflow_run_id}")
    for note in result.notes:
        typer.echo(f"  {note}")


def tune(
    file: Annotated[Path, typer.Argument(help="Workload file with a tune section.")],
    overrides: SetOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the interrupted sweep of this name.")
    ] = False,
    name: Annotated[
        str | None, typer.Option(help="Sweep name (default: the workload name).")
    ] = None,
    address: RayAddressOption = None,
    verbose: VerboseOption = False,
    no_tracking: NoTrackingOption = False,
    smoke: SmokeOption = False,
    smoke_dir: SmokeDirOption = None,
    track: TrackOption = False,
) -> None:
    """Run a workload's hyperparameter sweep: one Ray Train run per trial, with Ray Tune."""
    _smoke_options_need_smoke(smoke, smoke_dir, track)
    spec = load_spec(file, overrides)
    if spec.tune is None:
        fail(f"error: {file}: no tune section to sweep; add one (see README) or use orch run")
    if smoke:
        _smoke(file, spec, address, name, smoke_dir, track, verbose)
        return
    _sweep(file, spec, address, name, resume, verbose, not no_tracking)


def _sweep(
    file: Path,
    spec: WorkloadSpec,
    address: str | None,
    name: str | None,
    resume: bool | None,
    verbose: bool,
    tracking: bool,
) -> None:
    from orchestrator.sweeps import summary_lines

    hint = "rerun with --verbose for Ray's logs; --resume continues it"
    with exit_on_stop(), exit_on_error(file, failed="sweep failed", hint=hint):
        result = api.tune(
            spec,
            address=address,
            name=name,
            resume=resume,
            verbose=verbose,
            tracking=tracking,
            log=typer.echo,
        )
    typer.echo(f"done: sweep {result.name}, {len(result.trials)} trials in {result.seconds:.0f} s")
    for line in summary_lines(result):
        typer.echo(f"  {line}")
    if result.best is not None:
        typer.echo(f"best: trial {result.best.trial_id}, {result.metric} {result.best.metric:.4g}")
    typer.echo(f"  best workload: {result.best_workload} (orch run it)")
    if result.model_dir:
        typer.echo(f"  best model: {result.model_dir}")
    typer.echo(f"  sweep directory: {result.path}")
    if result.mlflow_run_id:
        typer.echo(f"  MLflow run: {result.mlflow_run_id} (one nested run per trial)")
    for note in result.notes:
        typer.echo(f"  {note}")


def _cross_validate(
    file: Path,
    spec: WorkloadSpec,
    address: str | None,
    name: str | None,
    verbose: bool,
    tracking: bool,
) -> None:
    from orchestrator.sweeps.cv import cv_lines

    hint = "rerun with --verbose for Ray's logs; running it again retries the failed folds"
    with exit_on_stop(), exit_on_error(file, failed="cross-validation failed", hint=hint):
        result = api.cross_validate(
            spec, address=address, name=name, verbose=verbose, tracking=tracking, log=typer.echo
        )
    typer.echo(
        f"done: {len(result.folds)}-fold cross-validation {result.name} in {result.seconds:.0f} s"
    )
    for line in cv_lines(result):
        typer.echo(f"  {line}")
    typer.echo(f"cv {result.metric}: {result.mean:.4g} +- {result.std:.4g} (mean +- std)")
    typer.echo(f"  cross-validation directory: {result.path}")
    if result.mlflow_run_id:
        typer.echo(f"  MLflow run: {result.mlflow_run_id} (one nested run per fold)")
    for note in result.notes:
        typer.echo(f"  {note}")


def _smoke_options_need_smoke(smoke: bool, smoke_dir: Path | None, track: bool) -> None:
    if not smoke and (smoke_dir is not None or track):
        fail("error: --smoke-dir and --track only apply to a smoke run; add --smoke")


def _smoke(
    file: Path,
    spec: WorkloadSpec,
    address: str | None,
    name: str | None,
    workdir: Path | None,
    track: bool,
    verbose: bool,
) -> None:
    if address is not None or name is not None:
        # A smoke run is this machine's, under its own directory and the workload's name.
        fail(f"error: {file}: --smoke runs on this machine; drop --address and --name")
    hint = "rerun with --verbose for Ray's logs"
    with exit_on_error(file, failed="smoke run failed", hint=hint), Progress() as progress:
        result = api.smoke(
            spec,
            workdir=workdir,
            track=track,
            verbose=verbose,
            log=progress.note,
            on_progress=progress.show,
        )
    typer.echo(f"smoke run of {result.name} passed in {result.seconds:.0f} s:")
    for stage in result.stages:
        typer.echo(f"  {stage.name}: {stage.detail}")
    if result.generated:
        typer.secho(
            f"  trained on GENERATED data: {', '.join(mask(g.uri) for g in result.generated)} "
            "could not be reached",
            fg="yellow",
        )
    typer.echo(f"  smoke directory: {result.workdir}")
