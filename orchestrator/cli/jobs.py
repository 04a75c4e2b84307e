"""The commands that work on a Ray cluster's Jobs API: submit, status, logs, stop, list, job-run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from orchestrator.cli.errors import TRAINING_FAILED, exit_on_error, fail
from orchestrator.cli.options import (
    ClusterAddressOption,
    FollowOption,
    JobArgument,
    NoTrackingOption,
    RunNameOption,
    SetOption,
    VerboseOption,
    WorkloadArgument,
)
from orchestrator.cli.output import table
from orchestrator.cli.workloads import load_spec, run

if TYPE_CHECKING:
    from orchestrator.jobs import Cluster

__all__ = ["job_run", "list_jobs", "logs", "status", "stop", "submit"]


def submit(
    file: WorkloadArgument,
    overrides: SetOption = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray dashboard URL (http://HEAD:8265); default: $ORCH_ADDRESS, $RAY_ADDRESS, "
            "then the workload's cluster.address."
        ),
    ] = None,
    name: RunNameOption = None,
    follow: FollowOption = False,
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
    no_tracking: NoTrackingOption = False,
) -> None:
    """Run a workload on a Ray cluster as a Ray job (validated and fit-checked here first)."""
    from orchestrator.jobs import submit as submit_job

    spec = load_spec(file, overrides)
    with exit_on_error(file):
        job = submit_job(
            spec,
            address=address,
            name=name,
            allow_insecure=allow_insecure,
            fit_check=not no_fit_check,
            tracking=not no_tracking,
            log=typer.echo,
        )
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


def status(job_id: JobArgument, address: ClusterAddressOption = None) -> None:
    """A job's status, and why it waits when it cannot run yet."""
    from orchestrator.jobs import job_status

    cluster = _cluster(address)
    with exit_on_error():
        state = job_status(cluster, job_id)
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


def logs(
    job_id: JobArgument, address: ClusterAddressOption = None, follow: FollowOption = False
) -> None:
    """A job's output (orch's progress lines); --follow streams it and exits with the job's
    outcome: 0 succeeded, 1 failed or stopped."""
    from orchestrator.jobs import job_status

    cluster = _cluster(address)
    if follow:
        _follow(cluster, job_id)
        return
    with exit_on_error():
        state = job_status(cluster, job_id)
    text = cluster.jobs.get_job_logs(job_id)
    typer.echo(text, nl=bool(text) and not text.endswith("\n"))
    if state.waiting:
        typer.secho(f"[orch] {state.waiting}", fg="yellow", err=True)


def stop(job_id: JobArgument, address: ClusterAddressOption = None) -> None:
    """Stop a running job; its checkpoints stay, and submitting the run again resumes it."""
    from orchestrator.jobs import stop_job

    cluster = _cluster(address)
    with exit_on_error():
        state = stop_job(cluster, job_id)
    typer.echo(f"{job_id}: {state.status}")


def list_jobs(address: ClusterAddressOption = None) -> None:
    """The cluster's jobs, newest first: id, workload, status, start, duration."""
    from orchestrator.jobs import list_jobs as cluster_jobs

    cluster = _cluster(address)
    with exit_on_error():
        rows = cluster_jobs(cluster)
    table(rows, empty="no jobs")


def job_run(
    name: Annotated[str, typer.Option(help="Run name.")],
    no_tracking: NoTrackingOption = False,
    verbose: VerboseOption = False,
) -> None:
    """The entrypoint of a submitted job: run the resolved workload orch submit sent along."""
    import os
    import tempfile

    from orchestrator.jobs.upload import WORKLOAD_ENV

    text = os.environ.get(WORKLOAD_ENV)
    if not text:
        fail(f"error: ${WORKLOAD_ENV} is not set; use orch submit")
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
    from orchestrator.jobs import connect

    with exit_on_error():
        return connect(address, None, allow_insecure=True)  # reading is not submitting


def _follow(cluster: Cluster, job_id: str) -> None:
    """Stream a job's logs; exit 0 if it succeeds, 1 if it fails or stops."""
    from orchestrator.jobs import follow_logs

    try:
        with exit_on_error():
            state = follow_logs(
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
        raise typer.Exit(TRAINING_FAILED)
