"""Hyperparameter sweeps: a workload's `tune` section as Ray Tune trials of Ray Train runs."""

from orchestrator.sweeps.results import SweepResult, TrialRow, summary_lines
from orchestrator.sweeps.sweep import SweepInterrupted, run_sweep

__all__ = ["SweepInterrupted", "SweepResult", "TrialRow", "run_sweep", "summary_lines"]
