"""The `orch` command line: thin commands, each parses, calls one API function, prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
import yaml

from orchestrator import __version__
from orchestrator.load import SpecError, load_workload
from orchestrator.spec import WorkloadSpec, workload_schema

app = typer.Typer(
    name="orch",
    help="Run declarative training workloads on Ray: validate, run, submit, tune.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

INVALID_INPUT = 2

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a field before validation, e.g. --set train.optimizer.lr=3e-4 (repeatable).",
    ),
]


AddressOption = Annotated[
    str | None, typer.Option(help="Ray address; default: start Ray on this machine.")
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's logs.")]


def _load(file: Path, overrides: list[str] | None) -> WorkloadSpec:
    """Load a workload or exit 2 with every problem."""
    try:
        return load_workload(file, overrides or [])
    except SpecError as error:
        _fail(error)


def _fail(error: SpecError) -> NoReturn:
    for problem in error.problems:
        typer.secho(f"error: {problem}", fg="red", err=True)
    raise typer.Exit(INVALID_INPUT)


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


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Workload files to check.")],
    overrides: SetOption = None,
) -> None:
    """Check workload files; exit 0 if all are valid, else 2 with every error."""
    failed = 0
    for path in files:
        try:
            spec = load_workload(path, overrides or [])
        except SpecError as error:
            failed += 1
            for problem in error.problems:
                typer.secho(f"error: {problem}", fg="red", err=True)
            continue
        typer.echo(f"ok: {path} ({spec.name}, {spec.model.kind})")
    if failed:
        typer.secho(f"{failed} of {len(files)} workload(s) invalid", fg="red", err=True)
        raise typer.Exit(INVALID_INPUT)


@app.command()
def show(
    file: Annotated[Path, typer.Argument(help="Workload file.")],
    overrides: SetOption = None,
) -> None:
    """Print the fully resolved workload (extends, --set and defaults applied) as YAML."""
    spec = _load(file, overrides)
    typer.echo(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), nl=False)


data_app = typer.Typer(help="Prepare datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(
    file: Annotated[Path, typer.Argument(help="Workload file whose data section to prepare.")],
    overrides: SetOption = None,
    address: AddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Tokenize/convert a workload's raw data into cached Parquet shards (reused when unchanged)."""
    from orchestrator.data import DataError, prepare

    spec = _load(file, overrides)
    try:
        prepared = prepare(spec.data, log=typer.echo, ray_address=address, verbose=verbose)
    except DataError as error:
        typer.secho(f"error: {file}: data: {error}", fg="red", err=True)
        raise typer.Exit(INVALID_INPUT) from None
    splits = prepared.manifest["splits"]
    typer.echo(
        f"{prepared.root or spec.data.train}: {splits['train']['rows']} train rows in "
        f"{len(splits['train']['shards'])} shard(s), {splits['eval']['rows']} eval rows"
    )


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="Workload file.")],
    overrides: SetOption = None,
    address: AddressOption = None,
    name: Annotated[
        str | None,
        typer.Option(help="Run name (default: the workload name); the same name resumes."),
    ] = None,
    verbose: VerboseOption = False,
    no_tracking: Annotated[
        bool, typer.Option("--no-tracking", help="Do not record this run in MLflow.")
    ] = False,
) -> None:
    """Train a workload on this machine (or on --address), resuming a run of the same name."""
    from orchestrator.run import RunError, TrainingFailed, run_workload

    spec = _load(file, overrides)
    progress = _Progress()
    try:
        result = run_workload(
            spec,
            address=address,
            name=name,
            verbose=verbose,
            tracking=not no_tracking,
            log=progress.note,
            on_progress=progress.show,
        )
    except RunError as error:
        progress.end()
        typer.secho(f"error: {file}: {error}", fg="red", err=True)
        raise typer.Exit(INVALID_INPUT) from None
    except TrainingFailed as error:
        progress.end()
        typer.secho(f"training failed: {error}", fg="red", err=True)
        typer.secho("rerun with --verbose for Ray's logs; checkpoints are kept", err=True)
        raise typer.Exit(1) from None
    progress.end()
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


class _Progress:
    """One live line on a terminal, one line per report otherwise."""

    def __init__(self) -> None:
        self.live = sys.stdout.isatty()
        self.open = False

    def note(self, text: str) -> None:
        self.end()
        typer.echo(text)

    def show(self, event: dict) -> None:
        step, total = event.get("step", 0), event.get("total_steps", 0)
        parts = [f"step {step}/{total}"]
        if "loss" in event:
            parts.append(f"loss {event['loss']:.4f}")
        if "samples_per_s" in event:
            parts.append(f"{event['samples_per_s']:.1f} samples/s")
        parts += [f"{k} {v:.4g}" for k, v in event.items() if k in ("eval_loss", "eval_accuracy")]
        if total and event.get("step_time_s"):
            eta = int((total - step) * event["step_time_s"])
            parts.append(f"ETA {eta // 60}:{eta % 60:02d}")
        line = " | ".join(parts)
        if self.live:
            typer.echo("\r" + line.ljust(100), nl=False)
            self.open = True
        else:
            typer.echo(line)

    def end(self) -> None:
        if self.open:
            typer.echo()
            self.open = False


runs_app = typer.Typer(help="Recorded runs (MLflow).", invoke_without_command=True)
app.add_typer(runs_app, name="runs")
TrackingUriOption = Annotated[
    str | None,
    typer.Option(help="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else ./mlflow.db."),
]


@runs_app.callback()
def runs(
    ctx: typer.Context,
    experiment: Annotated[str | None, typer.Option(help="Only this experiment.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many runs to show.")] = 20,
    tracking_uri: TrackingUriOption = None,
) -> None:
    """A table of recent runs: id, workload, status, key metrics, duration."""
    if ctx.invoked_subcommand is not None:
        return
    from orchestrator.tracking import TrackingError, recent_runs

    try:
        rows = recent_runs(tracking_uri, experiment, limit)
    except TrackingError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(INVALID_INPUT) from None
    if not rows:
        typer.echo("no runs")
        return
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    typer.echo("  ".join(k.ljust(w) for k, w in widths.items()).rstrip())
    for row in rows:
        typer.echo("  ".join(row[k].ljust(w) for k, w in widths.items()).rstrip())


@runs_app.command("upload")
def runs_upload(
    file: Annotated[Path, typer.Argument(help="A run's mlflow_pending.jsonl.")],
) -> None:
    """Send the reports a run kept while its MLflow server was down."""
    from orchestrator.tracking import upload_pending

    if not file.is_file():
        typer.secho(f"error: {file}: no such file", fg="red", err=True)
        raise typer.Exit(INVALID_INPUT)
    typer.echo(f"uploaded {upload_pending(file)} report(s) from {file}")


@app.command()
def schema() -> None:
    """Print the JSON Schema of workload files (for editor validation and completion)."""
    typer.echo(json.dumps(workload_schema(), indent=2))


def main() -> None:
    app()
