"""The exceptions that decide `orch`'s exit code, shared by the run, sweep and job drivers."""

from __future__ import annotations

__all__ = ["RunError", "TrainingFailed"]


class RunError(Exception):
    """The workload cannot start as specified (exit code 2): bad model, data, plan or checkpoint."""


class TrainingFailed(Exception):
    """Training started and failed (exit code 1)."""
