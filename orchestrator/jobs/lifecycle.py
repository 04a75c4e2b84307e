"""A submitted job's life: status (with why it waits), logs, stop, and the table of jobs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator.errors import ConnectionLost
from orchestrator.jobs.connect import Cluster, JobsError
from orchestrator.masking import first_line, mask

__all__ = ["JobStatus", "follow_logs", "job_status", "list_jobs", "stop_job", "waiting_reason"]

_WAIT_CHECK_S = 5.0  # how often `logs --follow` looks for a reason the job waits


def _connection_errors() -> tuple[type[BaseException], ...]:
    """What Ray's job client raises when the cluster goes away: aiohttp's errors from the log
    stream, requests' from status calls; RuntimeError is how it reports an HTTP 5xx."""
    import aiohttp
    import requests

    return (aiohttp.ClientError, requests.RequestException, ConnectionError, RuntimeError)


_CONNECTION_ERRORS = _connection_errors()


@dataclass
class JobStatus:
    job_id: str
    status: str  # PENDING RUNNING STOPPED SUCCEEDED FAILED
    workload: str
    run: str
    message: str
    waiting: str | None  # why the job cannot run yet, when it cannot
    started: float | None  # epoch seconds
    ended: float | None
    mlflow_run_id: str | None
    dashboard: str  # the job's page in the Ray dashboard
    details: Any  # Ray's JobDetails

    @property
    def finished(self) -> bool:
        return self.status in ("STOPPED", "SUCCEEDED", "FAILED")

    @property
    def duration_s(self) -> float | None:
        if self.started is None:
            return None
        return (self.ended or time.time()) - self.started


def job_status(cluster: Cluster, job_id: str) -> JobStatus:
    info = _info(cluster, job_id)
    status = str(info.status.value if hasattr(info.status, "value") else info.status)
    meta = info.metadata or {}
    return JobStatus(
        job_id=job_id,
        status=status,
        workload=meta.get("orch.workload", "-"),
        run=meta.get("orch.run", "-"),
        message=info.message or "",
        waiting=waiting_reason(cluster, info, status),
        started=info.start_time / 1000 if info.start_time else None,
        ended=info.end_time / 1000 if info.end_time else None,
        mlflow_run_id=meta.get("orch.mlflow_run"),
        dashboard=cluster.job_url(job_id),
        details=info,
    )


def waiting_reason(cluster: Cluster, info: Any, status: str) -> str | None:
    """Why the job is not running yet: Ray's message for a job not started, or the training
    workers' placement group that the cluster cannot place now."""
    if status == "PENDING":
        return info.message or "the job has not started: Ray is setting up its environment"
    if status != "RUNNING" or not info.job_id:
        return None
    from ray.util.state.common import ListApiOptions, StateResource

    groups = cluster.state().list(
        StateResource.PLACEMENT_GROUPS,
        ListApiOptions(
            detail=True,
            filters=[("creator_job_id", "=", info.job_id), ("state", "=", "PENDING")],
        ),
        raise_on_missing_output=False,
    )
    if not groups:
        return None
    bundles = groups[0].bundles or []
    wants = _sum_bundles(bundles)
    free = _free_resources(cluster)
    have = ", ".join(f"{k} {free.get(k, 0):g}" for k in wants)
    ask = ", ".join(f"{k} {v:g}" for k, v in wants.items())
    stats = groups[0].stats or {}
    why = (
        "no node can ever hold them"
        if stats.get("scheduling_state") == "INFEASIBLE"
        else "until other work frees them"
    )
    return (
        f"waiting for resources: {len(bundles)} worker(s) need {ask} in all; "
        f"free now: {have} ({why})"
    )


def follow_logs(
    cluster: Cluster, job_id: str, write: Callable[[str], None], note: Callable[[str], None]
) -> JobStatus:
    """Stream the job's logs until it ends, noting when (and why) it waits for resources.

    Raises ConnectionLost when the cluster stops answering part-way (the head node restarted,
    the network went): the job may well go on, so that is said, not a traceback.
    """
    job_status(cluster, job_id)  # an unknown id fails here, before streaming
    try:
        return _follow(cluster, job_id, write, note)
    except _CONNECTION_ERRORS as exc:
        reason = first_line(exc)
        raise ConnectionLost(
            f"lost the connection to the cluster at {mask(cluster.url)} while following "
            f"{job_id} ({reason}); the job may still be running: `orch status {job_id}` "
            "says, once the cluster answers again"
        ) from None


def _follow(
    cluster: Cluster, job_id: str, write: Callable[[str], None], note: Callable[[str], None]
) -> JobStatus:

    async def tail() -> None:
        stream = cluster.jobs.tail_job_logs(job_id).__aiter__()
        last_reason: str | None = None
        pending: asyncio.Task | None = None
        while True:
            if pending is None:
                pending = asyncio.ensure_future(stream.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=_WAIT_CHECK_S)
            if done:
                try:
                    chunk = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                write(chunk)
                continue
            reason = (await asyncio.to_thread(job_status, cluster, job_id)).waiting
            if reason and reason != last_reason:
                note(reason)
            last_reason = reason

    asyncio.run(tail())
    deadline = time.monotonic() + 30  # the log stream can close just before the status flips
    while True:
        status = job_status(cluster, job_id)
        if status.finished or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def stop_job(cluster: Cluster, job_id: str, wait_s: float = 60) -> JobStatus:
    """Ask Ray to stop the job (SIGTERM, then SIGKILL); return once it has ended or wait_s passed.

    Checkpoints already written stay: re-submitting under the same run name resumes."""
    job_status(cluster, job_id)
    cluster.jobs.stop_job(job_id)
    deadline = time.monotonic() + wait_s
    while True:
        status = job_status(cluster, job_id)
        if status.finished or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def list_jobs(cluster: Cluster) -> list[dict[str, str]]:
    """Submitted jobs, newest first: id, workload, status, start, duration."""
    rows = []
    jobs = [j for j in cluster.jobs.list_jobs() if j.submission_id]  # not plain drivers
    for info in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        meta = info.metadata or {}
        start = info.start_time / 1000 if info.start_time else None
        end = info.end_time / 1000 if info.end_time else None
        status = str(info.status.value if hasattr(info.status, "value") else info.status)
        rows.append(
            {
                "id": info.submission_id,
                "workload": meta.get("orch.workload", "-"),
                "status": status,
                "start": datetime.fromtimestamp(start).strftime("%Y-%m-%d %H:%M:%S")
                if start
                else "-",
                "duration": _duration((end or time.time()) - start) if start else "-",
            }
        )
    return rows


def _info(cluster: Cluster, job_id: str) -> Any:
    try:
        return cluster.jobs.get_job_info(job_id)
    except RuntimeError as exc:  # Ray's client raises RuntimeError on HTTP 404
        if "404" in str(exc) or "does not exist" in str(exc):
            raise JobsError(
                f"no job {job_id!r} on the cluster at {mask(cluster.url)}; `orch list` shows the "
                "jobs"
            ) from None
        raise


def _sum_bundles(bundles: list[dict[str, Any]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for k, v in (bundle.get("unit_resources") or {}).items():
            if not k.startswith("bundle") and "_group_" not in k:
                total[k] = total.get(k, 0.0) + float(v)
    return total


def _free_resources(cluster: Cluster) -> dict[str, float]:
    import requests

    try:
        response = requests.get(
            f"{cluster.url}/api/cluster_status", headers=cluster.headers, timeout=10
        )
        usage = response.json()["data"]["clusterStatus"]["loadMetricsReport"]["usage"]
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return {}
    return {k: float(total) - float(used) for k, (used, total) in usage.items()}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
