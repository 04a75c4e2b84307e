"""orch: a distributed training orchestrator on Ray.

The Python API mirrors the `orch` command line, one function per command (orchestrator.api):

    import orchestrator as orch

    orch.smoke("workloads/bert_pretrain.yaml")  # orch run workloads/bert_pretrain.yaml --smoke
    result = orch.run("workloads/local/bert_tiny.yaml", ["train.max_steps=20"])
"""

from importlib.metadata import PackageNotFoundError, version

from orchestrator.api import (
    Exported,
    JobLogs,
    Workload,
    cross_validate,
    export,
    list_jobs,
    logs,
    plan_submit,
    prepare,
    run,
    runs,
    schema,
    smoke,
    status,
    stop,
    submit,
    tune,
    upload_runs,
    validate,
)
from orchestrator.errors import (
    DataError,
    ExportError,
    JobsError,
    RunError,
    SmokeFailed,
    TrackingError,
    TrainingFailed,
)
from orchestrator.load import Problem, SpecError, load_workload
from orchestrator.spec import WorkloadSpec, workload_schema
from orchestrator.stopping import Stopped

try:
    __version__ = version("orch")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = [
    "DataError",
    "ExportError",
    "Exported",
    "JobLogs",
    "JobsError",
    "Problem",
    "RunError",
    "SmokeFailed",
    "SpecError",
    "Stopped",
    "TrackingError",
    "TrainingFailed",
    "Workload",
    "WorkloadSpec",
    "__version__",
    "cross_validate",
    "export",
    "list_jobs",
    "load_workload",
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
    "workload_schema",
]
