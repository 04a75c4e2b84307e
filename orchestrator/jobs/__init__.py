"""Ray jobs: `orch submit` and the job lifecycle (status, logs, stop, list) on a cluster."""

from orchestrator.jobs.connect import Cluster, JobsError, connect
from orchestrator.jobs.dry_run import SubmitPlan, plan_submit
from orchestrator.jobs.lifecycle import JobStatus, follow_logs, job_status, list_jobs, stop_job
from orchestrator.jobs.submit import Submission, submit

__all__ = [
    "Cluster",
    "JobStatus",
    "JobsError",
    "Submission",
    "SubmitPlan",
    "connect",
    "follow_logs",
    "job_status",
    "list_jobs",
    "plan_submit",
    "stop_job",
    "submit",
]
