"""orch's Python API: one function per `orch` command, with the same arguments and defaults.

The CLI parses, calls exactly one of these, and prints; a team's scripts and tests call them
directly:

    import orchestrator as orch

    result = orch.smoke("workloads/bert_pretrain.yaml")     # orch run FILE --smoke
    run = orch.run("workloads/local/bert_tiny.yaml", ["train.max_steps=20"])
    print(run.metrics["eval_loss"], run.model_dir)

A workload is a path (loaded with `overrides`, as `--set` does) or a WorkloadSpec (then
`overrides` must be empty). Results are typed (RunResult, SweepResult, SmokeResult,
Submission, JobStatus); failures raise orch's own exceptions: SpecError, RunError, DataError,
JobsError and TrackingError for input the caller can fix, TrainingFailed (and SmokeFailed) when
training started and failed, Stopped (a KeyboardInterrupt) when Ctrl-C or SIGTERM stopped a run
or sweep. Nothing here imports Ray or torch until a function needs them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from orchestrator.load import Problem, SpecError, load_workload
from orchestrator.spec import DEFAULT_TOLERANCE, WorkloadSpec, name_problem, workload_schema

if TYPE_CHECKING:
    from orchestrator.data.prepare import PreparedData
    from orchestrator.driver import RunResult
    from orchestrator.exporting import ExportReport
    from orchestrator.jobs import JobStatus, Submission, SubmitPlan
    from orchestrator.smoketest import SmokeResult
    from orchestrator.sweeps.cv import CVResult
    from orchestrator.sweeps.results import SweepResult

__all__ = [
    "Exported",
    "JobLogs",
    "Workload",
    "cross_validate",
    "export",
    "list_jobs",
    "logs",
    "plan_submit",
    "prepare",
    "run",
    "runs",
    "schema",
    "smoke",
    "status",
    "stop",
    "submit",
    "tune",
    "upload_runs",
    "validate",
]

Workload = WorkloadSpec | str | Path
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    """The default `log`: say nothing."""


def validate(workload: Workload, overrides: Iterable[str] = ()) -> WorkloadSpec:
    """The validated workload (`orch validate`, `orch show`); SpecError lists every problem."""
    overrides = list(overrides)
    if isinstance(workload, WorkloadSpec):
        if overrides:
            raise ValueError("overrides apply to a workload file; a WorkloadSpec is final")
        return workload
    return load_workload(workload, overrides)


def _check_name(name: str | None) -> None:
    """Refuse a bad run or sweep name before anything starts: it becomes a directory."""
    if name is not None and (problem := name_problem(name)):
        raise SpecError([Problem("--name", "", problem)])


def schema() -> dict[str, Any]:
    """The JSON Schema of workload files (`orch schema`)."""
    return workload_schema()


def prepare(
    workload: Workload,
    overrides: Iterable[str] = (),
    *,
    address: str | None = None,
    verbose: bool = False,
    log: Log = _quiet,
) -> PreparedData:
    """Prepare (or reuse from the cache) the workload's data (`orch data prepare`)."""
    from orchestrator.data import prepare as prepare_data

    spec = validate(workload, overrides)
    return prepare_data(spec.data, log=log, ray_address=address, verbose=verbose)


def run(
    workload: Workload,
    overrides: Iterable[str] = (),
    *,
    address: str | None = None,
    name: str | None = None,
    verbose: bool = False,
    tracking: bool = True,
    log: Log = _quiet,
    on_progress: Callable[[dict[str, Any]], None] = lambda _: None,
) -> RunResult:
    """Train the workload here (or on the Ray at `address`), resuming a run of the same name
    (`orch run`). A workload with a tune section is a sweep: call `tune`."""
    _check_name(name)  # before importing Ray
    from orchestrator.driver import run_workload
    from orchestrator.errors import RunError

    spec = validate(workload, overrides)
    if spec.tune is not None:
        raise RunError("the workload has a tune section: run its sweep with tune()")
    if spec.cv is not None:
        raise RunError("the workload has a cv section: run it with cross_validate()")
    return run_workload(
        spec,
        address=address,
        name=name,
        verbose=verbose,
        tracking=tracking,
        log=log,
        on_progress=on_progress,
    )


def tune(
    workload: Workload,
    overrides: Iterable[str] = (),
    *,
    address: str | None = None,
    name: str | None = None,
    resume: bool | None = None,
    verbose: bool = False,
    tracking: bool = True,
    log: Log = _quiet,
) -> SweepResult:
    """Run the workload's sweep (`orch tune`); `resume` True continues one, None continues one
    of that name if it exists."""
    _check_name(name)
    from orchestrator.sweeps import run_sweep

    return run_sweep(
        validate(workload, overrides),
        address=address,
        name=name,
        resume=resume,
        verbose=verbose,
        tracking=tracking,
        log=log,
    )


def cross_validate(
    workload: Workload,
    overrides: Iterable[str] = (),
    *,
    address: str | None = None,
    name: str | None = None,
    resume: bool | None = None,
    verbose: bool = False,
    tracking: bool = True,
    log: Log = _quiet,
) -> CVResult:
    """Run the workload's k-fold cross-validation (`orch run` of a workload with a cv
    section): one run per fold, the mean and standard deviation of the metrics across them.
    `resume` as for `tune`; TrainingFailed if a fold did not report its metric."""
    _check_name(name)
    from orchestrator.sweeps.cv import run_cv

    return run_cv(
        validate(workload, overrides),
        address=address,
        name=name,
        resume=resume,
        verbose=verbose,
        tracking=tracking,
        log=log,
    )


def smoke(
    workload: Workload,
    overrides: Iterable[str] = (),
    *,
    workdir: str | Path | None = None,
    track: bool = False,
    verbose: bool = False,
    log: Log = _quiet,
    on_progress: Callable[[dict[str, Any]], None] = lambda _: None,
) -> SmokeResult:
    """Shrink any workload to this machine and run it through every stage (`orch run --smoke`,
    `orch tune --smoke`). Runs, data and MLflow (with `track`) stay under `workdir` (default
    .orch/smoke); SmokeFailed if a stage did not happen."""
    from orchestrator.smoketest import smoke as smoke_run

    return smoke_run(
        validate(workload, overrides),
        workdir=workdir,
        track=track,
        verbose=verbose,
        log=log,
        on_progress=on_progress,
    )


def submit(
    workload: Workload,
    overrides: Iterable[str] = (),
    *,
    address: str | None = None,
    name: str | None = None,
    allow_insecure: bool = False,
    fit_check: bool = True,
    tracking: bool = True,
    log: Log = _quiet,
) -> Submission:
    """Submit the workload to a Ray cluster as a job (`orch submit`)."""
    _check_name(name)
    from orchestrator.jobs import submit as submit_job

    return submit_job(
        validate(workload, overrides),
        address=address,
        name=name,
        allow_insecure=allow_insecure,
        fit_check=fit_check,
        tracking=tracking,
        log=log,
    )


def plan_submit(
    workload: Workload,
    overrides: Iterable[str] = (),
    *,
    name: str | None = None,
    tracking: bool = True,
    working_dir: str | Path | None = None,
) -> SubmitPlan:
    """What `submit` would send, without contacting the cluster (`orch submit --dry-run`): the
    files uploaded and left out (and by which rule), the entrypoint, env var names, resources."""
    _check_name(name)
    from orchestrator.jobs import plan_submit as plan_job

    return plan_job(
        validate(workload, overrides),
        name=name,
        tracking=tracking,
        working_dir=Path(working_dir) if working_dir is not None else None,
    )


def status(job_id: str, *, address: str | None = None) -> JobStatus:
    """A job's status, and why it waits when it cannot run yet (`orch status`)."""
    from orchestrator.jobs import job_status

    return job_status(_cluster(address), job_id)


class JobLogs(NamedTuple):
    status: JobStatus
    text: str  # the logs so far; empty when they were followed (streamed to `on_output`)


def logs(
    job_id: str,
    *,
    address: str | None = None,
    follow: bool = False,
    on_output: Log = _quiet,
    on_notice: Log = _quiet,
) -> JobLogs:
    """A job's logs (`orch logs`); with `follow`, streamed to `on_output` until the job ends,
    with `on_notice` told when and why it waits for resources."""
    from orchestrator.jobs import follow_logs, job_status

    cluster = _cluster(address)
    if follow:
        return JobLogs(follow_logs(cluster, job_id, on_output, on_notice), "")
    state = job_status(cluster, job_id)
    return JobLogs(state, cluster.jobs.get_job_logs(job_id))


def stop(job_id: str, *, address: str | None = None) -> JobStatus:
    """Stop a job (`orch stop`); its checkpoints stay, and submitting the run again resumes it."""
    from orchestrator.jobs import stop_job

    return stop_job(_cluster(address), job_id)


def list_jobs(*, address: str | None = None) -> list[dict[str, str]]:
    """The cluster's jobs, newest first (`orch list`)."""
    from orchestrator.jobs import list_jobs as cluster_jobs

    return cluster_jobs(_cluster(address))


def runs(
    *, tracking_uri: str | None = None, experiment: str | None = None, limit: int = 20
) -> list[dict[str, str]]:
    """Recent MLflow runs: id, workload, status, key metrics, duration (`orch runs`)."""
    from orchestrator.tracking import recent_runs

    return recent_runs(tracking_uri, experiment, limit)


@dataclass(frozen=True)
class Exported:
    """What `export` wrote: one report per format, and where it was tracked."""

    model_dir: Path | str  # a URI for a run on object storage
    reports: list[ExportReport]
    mlflow_run_id: str | None
    notes: list[str]  # tracking outcomes, to show


def export(
    run_dir: str | Path,
    formats: Iterable[str],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    tracking: bool = True,
    tracking_uri: str | None = None,
    log: Log = _quiet,
) -> Exported:
    """Export a finished run's fp32 model to ONNX and/or TorchScript beside it, each checked
    against eager PyTorch on the run's eval batches (`orch export`); ExportError (an input
    error) when the run has no model, a format is unknown or the kind's, or an export is off
    by more than `tolerance`. A tracked run (found in MLflow by its name) gets the files."""
    from orchestrator.exporting import export_model, find_model_dir, known_formats
    from orchestrator.storage import is_remote

    formats = known_formats(formats)
    if is_remote(str(run_dir)):
        return _export_remote(str(run_dir), formats, tolerance, tracking, tracking_uri, log)
    model_dir = find_model_dir(run_dir)
    reports = export_model(model_dir, formats, tolerance=tolerance, log=log)
    run_id: str | None = None
    notes: list[str] = []
    if tracking:
        from orchestrator.exporting.tracked import log_exports

        run_id, notes = log_exports(model_dir, reports, tracking_uri)
    return Exported(model_dir, reports, run_id, notes)


def _export_remote(
    uri: str,
    formats: list[str],
    tolerance: float,
    tracking: bool,
    tracking_uri: str | None,
    log: Log,
) -> Exported:
    """`export` of a run on object storage: its model/ is exported here, then uploaded back."""
    import tempfile

    from orchestrator.errors import ExportError
    from orchestrator.exporting import export_model
    from orchestrator.masking import mask
    from orchestrator.storage import download_dir, join, upload_dir

    run_uri = uri.rstrip("/").removesuffix("/model")
    model_uri = join(run_uri, "model")
    with tempfile.TemporaryDirectory(prefix="orch-export-") as scratch:
        # Under a directory of the run's name: that is how its MLflow run is found.
        local = Path(scratch, run_uri.rsplit("/", 1)[-1], "model")
        if not download_dir(model_uri, str(local)) or not (local / "model.json").is_file():
            raise ExportError(
                f"{mask(model_uri)}: no exported model here (no model.json): the run has not "
                "finished, or this is not an orch run directory (<storage_path>/<name>)"
            )
        try:
            reports = export_model(local, formats, tolerance=tolerance, log=log)
        finally:  # the formats accepted are kept, as beside a local model
            upload_dir(str(local), model_uri)
        run_id: str | None = None
        notes: list[str] = []
        if tracking:
            from orchestrator.exporting.tracked import log_exports

            run_id, notes = log_exports(local, reports, tracking_uri)
    return Exported(model_uri, reports, run_id, notes)


def upload_runs(file: str | Path) -> int:
    """Send the reports a run kept while its MLflow server was down (`orch runs upload`);
    returns how many were sent."""
    from orchestrator.tracking import upload_pending

    return upload_pending(Path(file))


def _cluster(address: str | None) -> Any:
    from orchestrator.jobs import connect

    return connect(address, None, allow_insecure=True)  # reading is not submitting
