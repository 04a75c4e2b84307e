"""A finished sweep: its trials as rows, the best of them as a workload to run, the table.

Errored trials are no candidates for the best: their config did not run to an answer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import TrainingFailed
from orchestrator.exporting import export_at_end
from orchestrator.masking import mask, public_yaml
from orchestrator.spec import WorkloadSpec, derived_name

if TYPE_CHECKING:
    from orchestrator.tracking import Tracker

__all__ = ["BEST_WORKLOAD", "SweepResult", "TrialRow", "finish", "row", "summary_lines"]

BEST_WORKLOAD = "best_workload.yaml"


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    metric: float | None  # the last reported value
    status: str  # DONE (ran to the end), STOPPED (by the scheduler or time budget), ERROR
    iterations: int  # reports that reached Tune, over all attempts
    step: int | None
    error: str | None = None
    checkpoint: str | None = None


@dataclass
class SweepResult:
    name: str
    path: str  # the sweep's directory
    metric: str
    mode: str
    trials: list[TrialRow]
    best: TrialRow | None
    best_workload: str | None  # a ready-to-run workload file with the best values
    model_dir: str | None  # the best trial's exported model
    seconds: float
    mlflow_run_id: str | None = None
    notes: list[str] = field(default_factory=list)


def row(result: Any, metric: str, space: dict[str, Any]) -> TrialRow:
    """One trial, from Tune's Result: its values, last metric and how it ended."""
    m = result.metrics or {}
    trial_id = m.get("trial_id") or Path(result.path).name.removeprefix("trial_")
    value = m.get(metric)
    if result.error is not None:
        status = "ERROR"
    else:
        status = "DONE" if m.get("step") and m.get("step") == m.get("total_steps") else "STOPPED"
    return TrialRow(
        trial_id=trial_id,
        params={k: result.config.get(k) for k in space},
        metric=value if isinstance(value, (int, float)) and math.isfinite(value) else None,
        status=status,
        iterations=_reports(result),
        step=m.get("step"),
        # Shown in the table and logged to MLflow: a data error can name a URI's password.
        error=mask(_error_line(result.error)) if result.error is not None else None,
        checkpoint=m.get("checkpoint_path"),
    )


def _reports(result: Any) -> int:
    """Reports the trial made to Tune, over all its attempts (Tune numbers each one's afresh)."""
    frame = result.metrics_dataframe
    return (
        len(frame)
        if frame is not None
        else int((result.metrics or {}).get("training_iteration") or 0)
    )


def finish(
    spec: WorkloadSpec,
    name: str,
    path: str,
    local: Path,
    rows: list[TrialRow],
    parent: Tracker | None,
    notes: list[str],
    seconds: float,
    log: Callable[[str], None] = lambda _: None,
) -> SweepResult:
    """Rank the trials, write the best workload, export the best model in the workload's
    `export:` formats, track the outcome; TrainingFailed if none reported the metric."""
    assert spec.tune is not None
    metric, mode = spec.tune.metric, spec.tune.mode
    # Errored trials are no candidates: their config did not run to an answer.
    ranked = [(r.metric, r) for r in rows if r.metric is not None and r.status != "ERROR"]
    pick = min if mode == "min" else max
    best = pick(ranked, key=lambda pair: pair[0])[1] if ranked else None
    best_file = model_dir = None
    if best is not None:
        best_spec = spec.sampled(best.params | {"name": derived_name(name, "-best")})
        best_file = str(local / BEST_WORKLOAD)
        local.mkdir(parents=True, exist_ok=True)
        Path(best_file).write_text(
            f"# The best trial ({best.trial_id}, {metric} {best.metric:.6g}) of sweep {name},\n"
            f"# as a workload to run: orch run {best_file}\n"
            "# Env var values and URI credentials are masked (***): restore them to run it.\n"
            + public_yaml(best_spec)
        )
        if best.checkpoint:
            exported = Path(best.checkpoint).parent / "model"
            model_dir = str(exported) if exported.is_dir() else None
    result = SweepResult(
        name=name,
        path=path,
        metric=metric,
        mode=mode,
        trials=rows,
        best=best,
        best_workload=best_file,
        model_dir=model_dir,
        seconds=seconds,
        mlflow_run_id=parent.run_id if parent is not None else None,
        notes=list(notes),
    )
    export_done = False
    try:
        export_at_end(spec.export, model_dir, log, parent)
        export_done = True
    finally:  # a refused export keeps the sweep's record, marked FAILED as a run's would be
        if parent is not None:
            result.notes += _track_outcome(parent, result, export_failed=not export_done)
    if best is None:
        errors = {r.error for r in rows if r.error}
        raise TrainingFailed(
            f"no trial of sweep {name} reported {metric}"
            + (f"; errors: {'; '.join(sorted(errors))}" if errors else "")
        )
    return result


def _track_outcome(parent: Tracker, result: SweepResult, export_failed: bool) -> list[str]:
    best = result.best
    texts = {"trials.json": json.dumps([r.__dict__ for r in result.trials], indent=2)}
    metrics: dict[str, float] = {}
    tags = {"orch.kind": "sweep"}
    judged_on = None
    if best is not None and best.metric is not None and result.best_workload:
        texts[BEST_WORKLOAD] = Path(result.best_workload).read_text()
        metrics[f"best_{result.metric}"] = best.metric
        tags["orch.best_trial"] = best.trial_id
        # The sweep's model is the best trial's, so promote_if judges the best trial's metric.
        judged_on = {result.metric: best.metric}
    notes = parent.summary(metrics, tags, texts)
    status = "FINISHED" if best is not None and not export_failed else "FAILED"
    checkpoint = best.checkpoint if best else None
    return notes + parent.finish(status, result.model_dir, checkpoint, judged_on=judged_on)


def summary_lines(result: SweepResult) -> list[str]:
    """The trials as a table, best first, then where the results are."""
    keys = list(result.trials[0].params) if result.trials else []
    header = ["trial", *keys, result.metric, "status", "iters"]
    reverse = result.mode == "max"
    order = sorted(
        result.trials,
        key=lambda r: (r.metric is None, -(r.metric or 0) if reverse else (r.metric or 0)),
    )
    cells = [
        [
            r.trial_id,
            *(_fmt(r.params.get(k)) for k in keys),
            _fmt(r.metric) if r.metric is not None else "-",
            r.status,
            str(r.iterations),
        ]
        for r in order
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = [_line(header, widths)] + [_line(row, widths) for row in cells]
    lines += [f"  {r.trial_id}: {r.error}" for r in order if r.error]
    return lines


def _line(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _error_line(error: BaseException) -> str:
    """The line of a trial's error that says what went wrong (Tune wraps it in tracebacks)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for kind in ("SampleError", "RunError", "DataError", "TrainingFailed", "CheckpointMismatch"):
        for line in reversed(lines):
            if f"{kind}: " in line:
                return line.split(f"{kind}: ", 1)[1]
    return lines[-1] if lines else type(error).__name__
