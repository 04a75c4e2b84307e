"""`orch submit`: check the workload against the cluster, then run it there as a Ray job.

The job's entrypoint is `python -m orchestrator job-run`, which runs the resolved workload (sent
in the job's environment, so `extends` files and `--set` overrides need not exist on the
cluster) through the same code as `orch run`.
"""

from __future__ import annotations

import secrets
import shlex
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

import yaml

from orchestrator import __version__
from orchestrator.jobs.connect import Cluster, JobsError, connect
from orchestrator.jobs.upload import build_runtime_env
from orchestrator.masking import mask, public_dump, secret_fields, split_userinfo
from orchestrator.plan import Unschedulable, check_fit, worker_resources
from orchestrator.spec import WorkloadSpec

if TYPE_CHECKING:
    from orchestrator.tracking import Tracker

__all__ = ["Submission", "check_shared_paths", "job_entrypoint", "job_workload", "submit"]

ENTRYPOINT = "python -m orchestrator job-run"


@dataclass
class Submission:
    job_id: str
    dashboard: str  # the job's page in the Ray dashboard
    cluster: Cluster
    mlflow_run_id: str | None = None
    notes: list[str] = field(default_factory=list)  # warnings worth showing before the logs


def submit(
    spec: WorkloadSpec,
    *,
    address: str | None = None,
    name: str | None = None,
    allow_insecure: bool = False,
    fit_check: bool = True,
    tracking: bool = True,
    working_dir: Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Submission:
    """Submit `spec` as a Ray job; raise JobsError (with what to do) when it cannot go."""
    name = name or spec.name
    check_shared_paths(spec)
    workload_yaml, credentials = job_workload(spec)
    cluster = connect(address, spec.cluster.address, allow_insecure)
    notes = [] if cluster.authenticated else ["the cluster accepts unauthenticated jobs"]
    _check_not_running(cluster, name)
    if fit_check:
        notes += _check_fit(cluster, spec)
    notes += _placement_notes(spec, tracking)
    upload = build_runtime_env(spec, workload_yaml, working_dir or Path.cwd(), credentials)
    notes += upload.plan.notes
    log(
        f"uploading {upload.runtime_env['working_dir']}: {upload.files} files, "
        f"{upload.size_bytes / 2**20:.1f} MiB"
    )
    tracker = _start_tracking(spec, name) if tracking and spec.tracking.mlflow.enabled else None
    job_id = f"orch-{name}-{secrets.token_hex(4)}"
    entrypoint = job_entrypoint(name, tracking)
    metadata = {"orch.workload": spec.name, "orch.run": name, "orch.version": __version__}
    if tracker is not None:
        metadata["orch.mlflow_run"] = tracker.run_id
    with _ended_unless_submitted(tracker):
        try:
            cluster.jobs.submit_job(
                entrypoint=entrypoint,
                submission_id=job_id,
                runtime_env=upload.runtime_env,
                metadata=metadata,
            )
        except Exception as exc:  # the Jobs API reports runtime-env and upload problems as text
            raise JobsError(mask(f"the cluster at {cluster.url} refused the job: {exc}")) from None
    return Submission(
        job_id=job_id,
        dashboard=cluster.job_url(job_id),
        cluster=cluster,
        mlflow_run_id=tracker.run_id if tracker is not None else None,
        notes=notes,
    )


def _check_not_running(cluster: Cluster, name: str) -> None:
    """Refuse a run name that a job of the cluster is running: both would write the same run
    directory. (On a filesystem the run's lock refuses it too, but only once the job starts,
    and object stores have no lock.)"""
    for job in cluster.jobs.list_jobs():
        metadata = job.metadata or {}
        if metadata.get("orch.run") == name and not job.status.is_terminal():
            raise JobsError(
                f"run {name!r} is already {job.status.value} on the cluster at "
                f"{mask(cluster.url)} as job {job.submission_id}; wait for it, stop it "
                f"(orch stop {job.submission_id}), or pass another --name"
            )


def job_entrypoint(name: str, tracking: bool) -> str:
    """The job's command line (also what `orch submit --dry-run` shows)."""
    return f"{ENTRYPOINT} --name {shlex.quote(name)}" + ("" if tracking else " --no-tracking")


def job_workload(spec: WorkloadSpec) -> tuple[str, dict[str, str]]:
    """The workload the job runs ($ORCH_WORKLOAD: YAML, masked like `orch show`), and the env
    vars it needs beside it: the tracking URI's credentials, where MLflow reads them.

    The job gets its env vars from Ray (cluster.runtime_env.env_vars), not from this copy,
    which is logged to MLflow like any run's workload. JobsError for credentials elsewhere in
    the workload: masked here, they would not reach the job.
    """
    data = spec.model_dump(mode="json")
    mlflow = data["tracking"]["mlflow"]
    credentials: dict[str, str] = {}
    if mlflow["tracking_uri"]:
        mlflow["tracking_uri"], userinfo = split_userinfo(mlflow["tracking_uri"])
        if userinfo is not None:
            user, _, password = userinfo.partition(":")
            credentials = {
                "MLFLOW_TRACKING_USERNAME": unquote(user),
                "MLFLOW_TRACKING_PASSWORD": unquote(password),
            }
    # The cluster section is Ray's, applied before the job starts; the job reads the rest.
    if found := secret_fields({k: v for k, v in data.items() if k != "cluster"}):
        raise JobsError(
            f"{', '.join(found)}: holds credentials, which orch does not send inside the "
            "workload; give them to the job as env vars in cluster.runtime_env.env_vars "
            "(e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for s3://)"
        )
    return yaml.safe_dump(public_dump(data), sort_keys=False), credentials


def cluster_nodes(cluster: Cluster) -> list[dict[str, float]]:
    """Total resources of each alive node."""
    from ray.util.state.common import ListApiOptions, StateResource

    nodes = cluster.state().list(
        StateResource.NODES,
        ListApiOptions(detail=True, filters=[("state", "=", "ALIVE")]),
        raise_on_missing_output=False,
    )
    return [dict(node.resources_total or {}) for node in nodes]


def _check_fit(cluster: Cluster, spec: WorkloadSpec) -> list[str]:
    try:
        check_fit(spec.scaling, worker_resources(spec.scaling), cluster_nodes(cluster))
    except Unschedulable as exc:
        if _autoscales(cluster):
            return [f"the cluster cannot run this yet ({exc}); its autoscaler has to add nodes"]
        raise JobsError(
            f"the cluster at {mask(cluster.url)} can never schedule this workload: {exc}. Change "
            "scaling (num_workers, resources_per_worker, use_gpu, placement_strategy), or pass "
            "--no-fit-check if nodes will join"
        ) from None
    return []


def _autoscales(cluster: Cluster) -> bool:
    """Whether an autoscaler with node types of its own manages the cluster.

    Ray names the nodes of a cluster without one (`ray start`) `node_<id>` in the autoscaler's
    report; the cluster launcher and KubeRay use the node types of their config.
    """
    import requests

    try:
        response = requests.get(
            f"{cluster.url}/api/cluster_status", headers=cluster.headers, timeout=10
        )
        report = response.json()["data"]["clusterStatus"]["autoscalerReport"]
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return False
    mapping: dict[str, str] = report.get("nodeTypeMapping") or {}
    return bool(report.get("pendingLaunches")) or any(
        node_type != f"node_{node_id}" for node_id, node_type in mapping.items()
    )


def check_shared_paths(spec: WorkloadSpec) -> None:
    """Refuse relative storage on a cluster: it would land in the job's working directory on
    the head node, which Ray deletes with the job's session and other nodes cannot read."""
    for field_name, value, example in (
        ("train.storage_path", spec.train.storage_path, "s3://bucket/orch-runs"),
        ("data.cache_dir", spec.data.cache_dir, "s3://bucket/orch-data"),
    ):
        if "://" not in value and not Path(value).is_absolute():
            raise JobsError(
                f"{field_name} is {value!r}, a relative path: on a cluster it must be storage "
                f"that every node reaches and that outlives the job, e.g. {example} or a shared "
                f"filesystem path (--set {field_name}=/mnt/shared/...)"
            )


def _placement_notes(spec: WorkloadSpec, tracking: bool) -> list[str]:
    mlflow = spec.tracking.mlflow
    if tracking and mlflow.enabled and not mlflow.tracking_uri:
        return [
            "tracking.mlflow.tracking_uri is not set: the job records to an mlflow.db in its "
            "working directory on the cluster; set an MLflow server URI to keep the run"
        ]
    return []


def _start_tracking(spec: WorkloadSpec, name: str) -> Tracker | None:
    """Create the MLflow run now, so its id is known at once and a bad server fails here; the
    job continues the same run (runs are found by run name) and records the data hash."""
    if not spec.tracking.mlflow.tracking_uri:
        return None
    from orchestrator.tracking import TrackingError, start_tracker

    try:
        tracker = start_tracker(spec, name, "pending", Path(tempfile.gettempdir()))
    except TrackingError as exc:
        raise JobsError(str(exc)) from None
    with _ended_unless_submitted(tracker):
        tracker.mark("SCHEDULED")
    return tracker


@contextmanager
def _ended_unless_submitted(tracker: Tracker | None) -> Iterator[None]:
    """The MLflow run made for a job that does not go ends at once (KILLED by Ctrl-C, else
    FAILED): it would otherwise wait as SCHEDULED (or RUNNING) for a job that never starts."""
    try:
        yield
    except BaseException as error:
        if tracker is not None:
            with suppress(Exception):  # the error that stopped the submit is the one to show
                tracker.mark("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
