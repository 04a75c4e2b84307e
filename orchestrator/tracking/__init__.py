"""Run tracking with one writer: the driver.

Every report reaches the driver anyway (for the progress line), so the driver logs it: workers on
other nodes need no tracking credentials, and SQLite (MLflow's embedded default store) gets the
single writer it requires. A report that cannot be logged (server down) is kept, retried with the
next ones and at the end, and written to a fallback file that `orch runs upload` sends later:
training never waits on, or dies from, the tracking server.

Callers hold a `Tracker` (the protocol) from `start_tracker`; MLflow is its one implementation.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.spec import WorkloadSpec
from orchestrator.tracking.buffer import upload_pending
from orchestrator.tracking.mlflow_run import MlflowTracker, flatten
from orchestrator.tracking.model_log import promotion
from orchestrator.tracking.protocol import Tracker, TrackingError
from orchestrator.tracking.runs import recent_runs
from orchestrator.tracking.server import default_tracking_uri

__all__ = [
    "Tracker",
    "TrackingError",
    "default_tracking_uri",
    "flatten",
    "promotion",
    "recent_runs",
    "start_tracker",
    "upload_pending",
]


def start_tracker(spec: WorkloadSpec, run_name: str, data_hash: str, run_dir: Path) -> Tracker:
    """The run's tracker, found by run name or created; raises TrackingError.

    `run_dir` holds the fallback file of reports the server did not take.
    """
    return MlflowTracker.start(spec, run_name, data_hash, run_dir)
