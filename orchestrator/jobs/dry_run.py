"""`orch submit --dry-run`: what a submit would send, built by the same functions `submit`
uses (storage check, workload, upload, runtime env, entrypoint), without contacting the
cluster: no address, no fit check, no MLflow run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.jobs.submit import check_shared_paths, job_entrypoint, job_workload
from orchestrator.jobs.upload import UploadPlan, build_runtime_env
from orchestrator.plan import worker_resources
from orchestrator.spec import WorkloadSpec

__all__ = ["SubmitPlan", "plan_submit"]


@dataclass(frozen=True)
class SubmitPlan:
    entrypoint: str
    upload: UploadPlan
    env_vars: list[str]  # the names only: values may be secrets
    pip: list[str]
    num_workers: int
    resources_per_worker: dict[str, float]

    @property
    def notes(self) -> list[str]:
        """Warnings `submit` would show."""
        return self.upload.notes


def plan_submit(
    spec: WorkloadSpec,
    *,
    name: str | None = None,
    tracking: bool = True,
    working_dir: Path | None = None,
) -> SubmitPlan:
    """What `submit(spec, ...)` would send; raise JobsError where `submit` would refuse
    before contacting the cluster."""
    check_shared_paths(spec)
    workload_yaml, credentials = job_workload(spec)
    upload = build_runtime_env(spec, workload_yaml, working_dir or Path.cwd(), credentials)
    return SubmitPlan(
        entrypoint=job_entrypoint(name or spec.name, tracking),
        upload=upload.plan,
        env_vars=list(upload.runtime_env["env_vars"]),
        pip=list(upload.runtime_env.get("pip", [])),
        num_workers=spec.scaling.num_workers,
        resources_per_worker=worker_resources(spec.scaling),
    )
