"""orch's exceptions: each decides `orch`'s exit code (cli/errors.py); API callers catch them."""

from __future__ import annotations

__all__ = [
    "ConnectionLost",
    "DataError",
    "ExportError",
    "JobsError",
    "RunError",
    "SmokeFailed",
    "TrackingError",
    "TrainingFailed",
]


class RunError(Exception):
    """The workload cannot start as specified (exit code 2): bad model, data, plan or checkpoint."""


class ExportError(RunError):
    """A model that cannot be exported as asked, or whose export was refused (exit code 2)."""


class TrainingFailed(Exception):
    """Training started and failed (exit code 1)."""


class ConnectionLost(Exception):
    """The cluster stopped answering part-way through following a job (exit code 1)."""


class SmokeFailed(TrainingFailed):
    """A smoke run ran, but a stage a real run needs did not happen (exit code 1)."""


# Defined here rather than beside the code that raises them, so that `import orchestrator` (the
# CLI, the API) can name them without importing pyarrow, Ray or MLflow.
class DataError(Exception):
    """A data problem the user can fix: names the file and what is wrong with it (exit code 2)."""


class JobsError(Exception):
    """The cluster cannot be used as asked; the message says what to do (exit code 2)."""


class TrackingError(Exception):
    """The tracking server cannot be used; says how to run without it (exit code 2)."""
