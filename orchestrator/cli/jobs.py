"""The commands that work on a Ray cluster's Jobs API: submit, status, logs, stop, list, job-run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from orchestrator import api
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
from orchestrator.errors import ConnectionLost
from orchestrator.masking import mask

if TYPE_CHECKING:
    from orchestrator.jobs import SubmitPlan

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
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print what would be sent (files, what is left out and why, entrypoint, env "
            "var names, resources) without contacting the cluster.",
        ),
    ] = False,
) -> None:
    """Run a workload on a Ray cluster as a Ray job (validated and fit-checked here first)."""
    spec = load_spec(file, overrides)
    if dry_run:
        with exit_on_error(file):
            plan = api.plan_submit(spec, name=name, tracking=not no_tracking)
        _print_plan(plan)
        return
    try:
        with exit_on_error(file):
            job = api.submit(
                spec,
                address=address,
                name=name,
                allow_insecure=allow_insecure,
                fit_check=not no_fit_check,
                tracking=not no_tracking,
                log=typer.echo,
            )
    except KeyboardInterrupt:  # before the cluster took the job: nothing runs, no MLflow run waits
        fail("stopped before the job was submitted; nothing runs on the cluster", code=130)
    for note in job.notes:
        typer.secho(f"warning: {note}", fg="yellow", err=True)
    typer.echo(f"submitted {job.job_id}")
    typer.echo(f"  dashboard: {job.dashboard}")
    if job.mlflow_run_id:
        typer.echo(f"  MLflow run: {job.mlflow_run_id}")
    if not follow:
        address = mask(job.cluster.url)
        typer.echo(f"  follow with: orch logs {job.job_id} --follow --address {address}")
        return
    _follow(job.cluster.url, job.job_id)


def status(job_id: JobArgument, address: ClusterAddressOption = None) -> None:
    """A job's status, and why it waits when it cannot run yet."""
    with exit_on_error():
        state = api.status(job_id, address=address)
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
    typer.echo(f"  dashboard: {state.dashboard}")


def logs(
    job_id: JobArgument, address: ClusterAddressOption = None, follow: FollowOption = False
) -> None:
    """A job's output (orch's progress lines); --follow streams it and exits with the job's
    outcome: 0 succeeded, 1 failed or stopped."""
    if follow:
        _follow(address, job_id)
        return
    with exit_on_error():
        state, text = api.logs(job_id, address=address)
    typer.echo(text, nl=bool(text) and not text.endswith("\n"))
    if state.waiting:
        typer.secho(f"[orch] {state.waiting}", fg="yellow", err=True)


def stop(job_id: JobArgument, address: ClusterAddressOption = None) -> None:
    """Stop a running job; its checkpoints stay, and submitting the run again resumes it."""
    with exit_on_error():
        state = api.stop(job_id, address=address)
    typer.echo(f"{job_id}: {state.status}")


def list_jobs(address: ClusterAddressOption = None) -> None:
    """The cluster's jobs, newest first: id, workload, status, start, duration."""
    with exit_on_error():
        rows = api.list_jobs(address=address)
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


def _print_plan(plan: SubmitPlan) -> None:
    upload = plan.upload
    typer.echo("dry run: nothing was sent; the cluster was not contacted")
    typer.echo(f"entrypoint: {plan.entrypoint}")
    each = ", ".join(f"{k} {v:g}" for k, v in plan.resources_per_worker.items()) or "nothing"
    typer.echo(f"workers: {plan.num_workers}, each with {each}")
    typer.echo(f"env vars (names only): {', '.join(plan.env_vars)}")
    if plan.pip:
        typer.echo(f"pip: {' '.join(plan.pip)}")
    typer.echo(
        f"upload {upload.root}: {len(upload.sent)} files, {_size(upload.size_bytes)} uncompressed"
    )
    width = max((len(_size(size)) for _, size in upload.sent), default=0)
    for path, size in upload.sent:
        typer.echo(f"  {_size(size).rjust(width)}  {path}")
    typer.echo(f"left out ({len(upload.left_out)}):")
    for entry in upload.left_out:
        count = f", {entry.files} files" if entry.path.endswith("/") and entry.files else ""
        typer.echo(f"  {entry.path}  ({entry.rule}{count})")
    for note in plan.notes:
        typer.secho(f"warning: {note}", fg="yellow", err=True)


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    return f"{size / 1024:.1f} KiB" if size < 2**20 else f"{size / 2**20:.1f} MiB"


def _follow(address: str | None, job_id: str) -> None:
    """Stream a job's logs; exit 0 if it succeeds, 1 if it fails or stops."""
    try:
        with exit_on_error():
            state, _ = api.logs(
                job_id,
                address=address,
                follow=True,
                on_output=lambda chunk: typer.echo(chunk, nl=False),
                on_notice=lambda reason: typer.secho(f"[orch] {reason}", fg="yellow", err=True),
            )
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; {job_id} keeps running (orch stop {job_id} stops it)")
        raise typer.Exit(130) from None
    except ConnectionLost as exc:
        fail(f"error: {exc}", code=TRAINING_FAILED)
    typer.echo(f"{job_id}: {state.status}")
    if state.status != "SUCCEEDED":
        if state.message:
            typer.echo(f"  {state.message.splitlines()[0]}")
        raise typer.Exit(TRAINING_FAILED)
