"""orch: a distributed training orchestrator on Ray."""

from importlib.metadata import PackageNotFoundError, version

from orchestrator.load import Problem, SpecError, load_workload
from orchestrator.spec import WorkloadSpec, workload_schema

try:
    __version__ = version("orch")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = [
    "Problem",
    "SpecError",
    "WorkloadSpec",
    "__version__",
    "load_workload",
    "workload_schema",
]
