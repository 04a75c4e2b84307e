"""Smoke runs: any workload, shrunk to this machine by documented rules, through every stage."""

from orchestrator.smoketest.runner import DEFAULT_WORKDIR, SmokeFailed, SmokeResult, Stage, smoke
from orchestrator.smoketest.shrink import Change, Generated, Shrunk, shrink

__all__ = [
    "DEFAULT_WORKDIR",
    "Change",
    "Generated",
    "Shrunk",
    "SmokeFailed",
    "SmokeResult",
    "Stage",
    "shrink",
    "smoke",
]
