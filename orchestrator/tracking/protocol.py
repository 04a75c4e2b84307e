"""What a run is tracked through, so that callers never depend on one tracking backend."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from orchestrator.errors import TrackingError
from orchestrator.spec import WorkloadSpec

__all__ = ["ARTIFACTS", "Tracker", "TrackingError"]

# A report's files for the tracker, beside its metrics: {artifact path: base64 bytes}, such as
# a custom step's grid of samples ("samples/step-00000100.png"). A report reaches the driver as
# plain values, so small files travel in it rather than through storage the driver may not see.
ARTIFACTS = "artifacts"


class Tracker(Protocol):
    """One tracked run, written by the driver alone.

    Starting a run and `child` raise TrackingError and `mark` lets the server's errors through:
    nothing trains yet. `log`, `summary` and `finish` never raise; problems come back as notes,
    because training never waits on, or dies from, the tracking server.
    """

    @property
    def run_id(self) -> str:
        """The run's id in the tracking backend."""
        ...

    @property
    def location(self) -> str:
        """Where the run is recorded, with secrets redacted: fit for messages."""
        ...

    def child(
        self, run_name: str, spec: WorkloadSpec, data_hash: str, run_dir: Path, tags: dict[str, str]
    ) -> Tracker:
        """A run nested under this one (a sweep's trial); raises TrackingError."""
        ...

    def log(self, event: Mapping[str, Any]) -> None:
        """Record one report's metrics at its step, and its files (`event[ARTIFACTS]`)."""
        ...

    def mark(self, status: str) -> None:
        """Set the status of a run that does not train here (SCHEDULED, or FAILED to submit)."""
        ...

    def summary(
        self, metrics: dict[str, float], tags: dict[str, str], texts: dict[str, str]
    ) -> list[str]:
        """Record an outcome (a sweep's best): metrics, tags, text artifacts; notes to show."""
        ...

    def finish(
        self,
        status: str,
        model_dir: str | None,
        checkpoint_dir: str | None,
        judged_on: Mapping[str, float] | None = None,
    ) -> list[str]:
        """End the run, with its model when it FINISHED; notes to show.

        `judged_on`: the metrics `promote_if` decides on; by default the last ones reported.
        """
        ...
