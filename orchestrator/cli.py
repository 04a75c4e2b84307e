"""The `orch` command line: thin commands, each parses, calls one API function, prints."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
import yaml

from orchestrator import __version__
from orchestrator.load import SpecError, load_workload
from orchestrator.spec import WorkloadSpec, workload_schema

if TYPE_CHECKING:
    from orchestrator.jobs import Cluster

T = TypeVar("T")

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
    """Train a workload on this machine (or on --address), resuming a run of the same name.

    A workload with a tune section runs its sweep (like orch tune), continuing one of that name.
    """
    from orchestrator.run import RunError, TrainingFailed, run_workload

    spec = _load(file, overrides)
    if spec.tune is not None:
        _sweep(file, spec, address, name, None, verbose, not no_tracking)
        return
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


@app.command()
def tune(
    file: Annotated[Path, typer.Argument(help="Workload file with a tune section.")],
    overrides: SetOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the interrupted sweep of this name.")
    ] = False,
    name: Annotated[
        str | None, typer.Option(help="Sweep name (default: the workload name).")
    ] = None,
    address: AddressOption = None,
    verbose: VerboseOption = False,
    no_tracking: Annotated[
        bool, typer.Option("--no-tracking", help="Do not record the sweep in MLflow.")
    ] = False,
) -> None:
    """Run a workload's hyperparameter sweep: one Ray Train run per trial, with Ray Tune."""
    spec = _load(file, overrides)
    if spec.tune is None:
        typer.secho(
            f"error: {file}: no tune section to sweep; add one (see README) or use orch run",
            fg="red",
            err=True,
        )
        raise typer.Exit(INVALID_INPUT)
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
    from orchestrator.errors import RunError, TrainingFailed
    from orchestrator.tune import run_sweep, summary_lines

    try:
        result = run_sweep(
            spec,
            address=address,
            name=name,
            resume=resume,
            verbose=verbose,
            tracking=tracking,
            log=typer.echo,
        )
    except RunError as error:
        typer.secho(f"error: {file}: {error}", fg="red", err=True)
        raise typer.Exit(INVALID_INPUT) from None
    except TrainingFailed as error:
        typer.secho(f"sweep failed: {error}", fg="red", err=True)
        typer.secho("rerun with --verbose for Ray's logs; --resume continues it", err=True)
        raise typer.Exit(1) from None
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


# --------------------------------------------------------------------------- cluster jobs
ClusterAddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray dashboard URL (http://HEAD:8265); default: $ORCH_ADDRESS, else $RAY_ADDRESS.",
    ),
]
JobArgument = Annotated[str, typer.Argument(help="Job id, as printed by orch submit.")]


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="Workload file.")],
    overrides: SetOption = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray dashboard URL (http://HEAD:8265); default: $ORCH_ADDRESS, $RAY_ADDRESS, "
            "then the workload's cluster.address."
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="Run name (default: the workload name); the same name resumes."),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream the job's logs until it ends.")
    ] = False,
    allow_insecure: Annotated[
        bool,
        typer.Option(
            "--allow-insecure", help="Submit even to a cluster whose Jobs API needs no token."
        ),
    ] = False,
    no_fit_check: Annotated[
        bool,
        typer.Option(
            "--no-fit-check", help="Submit even if the cluster's nodes cannot hold the workers."
        ),
    ] = False,
    no_tracking: Annotated[
        bool, typer.Option("--no-tracking", help="Do not record this run in MLflow.")
    ] = False,
) -> None:
    """Run a workload on a Ray cluster as a Ray job (validated and fit-checked here first)."""
    from orchestrator.jobs import JobsError
    from orchestrator.jobs import submit as submit_job

    spec = _load(file, overrides)
    try:
        job = submit_job(
            spec,
            address=address,
            name=name,
            allow_insecure=allow_insecure,
            fit_check=not no_fit_check,
            tracking=not no_tracking,
            log=typer.echo,
        )
    except JobsError as error:
        typer.secho(f"error: {file}: {error}", fg="red", err=True)
        raise typer.Exit(INVALID_INPUT) from None
    for note in job.notes:
        typer.secho(f"warning: {note}", fg="yellow", err=True)
    typer.echo(f"submitted {job.job_id}")
    typer.echo(f"  dashboard: {job.dashboard}")
    if job.mlflow_run_id:
        typer.echo(f"  MLflow run: {job.mlflow_run_id}")
    if not follow:
        typer.echo(f"  follow with: orch logs {job.job_id} --follow --address {job.cluster.url}")
        return
    _follow(job.cluster, job.job_id)


@app.command()
def status(job_id: JobArgument, address: ClusterAddressOption = None) -> None:
    """A job's status, and why it waits when it cannot run yet."""
    from orchestrator.jobs import job_status

    cluster = _cluster(address)
    state = _jobs_call(job_status, cluster, job_id)
    typer.echo(f"{state.job_id}: {state.status}")
    typer.echo(f"  workload: {state.workload} (run {state.run})")
    if state.waiting:
        typer.secho(f"  {state.waiting}", fg="yellow")
    elif state.message:  # Ray appends the last logs to a failure: `orch logs` shows them
        typer.echo(f"  {state.message.splitlines()[0]}")
    if state.duration_s is not None:
        typer.echo(
            f"  running for {state.duration_s:.0f} s"
            if not state.finished
            else f"  took {state.duration_s:.0f} s"
        )
    if state.mlflow_run_id:
        typer.echo(f"  MLflow run: {state.mlflow_run_id}")
    typer.echo(f"  dashboard: {cluster.job_url(job_id)}")


@app.command()
def logs(
    job_id: JobArgument,
    address: ClusterAddressOption = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")
    ] = False,
) -> None:
    """A job's output (orch's progress lines); --follow streams it and exits with the job's
    outcome: 0 succeeded, 1 failed or stopped."""
    from orchestrator.jobs import job_status

    cluster = _cluster(address)
    if follow:
        _follow(cluster, job_id)
        return
    state = _jobs_call(job_status, cluster, job_id)
    text = cluster.jobs.get_job_logs(job_id)
    typer.echo(text, nl=bool(text) and not text.endswith("\n"))
    if state.waiting:
        typer.secho(f"[orch] {state.waiting}", fg="yellow", err=True)


@app.command()
def stop(job_id: JobArgument, address: ClusterAddressOption = None) -> None:
    """Stop a running job; its checkpoints stay, and submitting the run again resumes it."""
    from orchestrator.jobs import stop_job

    cluster = _cluster(address)
    state = _jobs_call(stop_job, cluster, job_id)
    typer.echo(f"{job_id}: {state.status}")


@app.command("list")
def list_(address: ClusterAddressOption = None) -> None:
    """The cluster's jobs, newest first: id, workload, status, start, duration."""
    from orchestrator.jobs import list_jobs

    rows = _jobs_call(list_jobs, _cluster(address))
    if not rows:
        typer.echo("no jobs")
        return
    _table(rows)


@app.command("job-run", hidden=True)
def job_run(
    name: Annotated[str, typer.Option(help="Run name.")],
    no_tracking: Annotated[bool, typer.Option("--no-tracking")] = False,
    verbose: VerboseOption = False,
) -> None:
    """The entrypoint of a submitted job: run the resolved workload orch submit sent along."""
    import os
    import tempfile

    from orchestrator.jobs.upload import WORKLOAD_ENV

    text = os.environ.get(WORKLOAD_ENV)
    if not text:
        typer.secho(f"error: ${WORKLOAD_ENV} is not set; use orch submit", fg="red", err=True)
        raise typer.Exit(INVALID_INPUT)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "workload.yaml"
        path.write_text(text)
        run(
            file=path,
            overrides=None,
            address="auto",
            name=name,
            verbose=verbose,
            no_tracking=no_tracking,
        )


def _cluster(address: str | None) -> Cluster:
    from orchestrator.jobs import JobsError, connect

    try:
        return connect(address, None, allow_insecure=True)  # reading is not submitting
    except JobsError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(INVALID_INPUT) from None


def _jobs_call(fn: Callable[..., T], *args: Any) -> T:
    from orchestrator.jobs import JobsError

    try:
        return fn(*args)
    except JobsError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(INVALID_INPUT) from None


def _follow(cluster: Cluster, job_id: str) -> None:
    from orchestrator.jobs import follow_logs

    try:
        state = _jobs_call(
            follow_logs,
            cluster,
            job_id,
            lambda chunk: typer.echo(chunk, nl=False),
            lambda reason: typer.secho(f"[orch] {reason}", fg="yellow", err=True),
        )
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; {job_id} keeps running (orch stop {job_id} stops it)")
        raise typer.Exit(130) from None
    typer.echo(f"{job_id}: {state.status}")
    if state.status != "SUCCEEDED":
        if state.message:
            typer.echo(f"  {state.message.splitlines()[0]}")
        raise typer.Exit(1)


def _table(rows: list[dict[str, str]]) -> None:
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    typer.echo("  ".join(k.ljust(w) for k, w in widths.items()).rstrip())
    for row in rows:
        typer.echo("  ".join(row[k].ljust(w) for k, w in widths.items()).rstrip())


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
    _table(rows)


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
