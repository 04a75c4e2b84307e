"""k-fold cross-validation (`cv:`): the workload trained once per fold, side by side, and the
mean and standard deviation of its evaluation metrics across the folds.

A cross-validation is a grid sweep over `cv.fold` (`sweep_of`), run by the sweep driver: the
data is prepared once, the folds run as Tune trials (as many at once as resources allow), each
fold is an MLflow child run (tagged `orch.cv_fold`) of one parent run. Fold i trains on the
other folds of the training split and evaluates on fold i, by sample id (data/folds.py); the
workload's eval split is not used. At the end the parent run gets `cv_<metric>_mean` and
`cv_<metric>_std` of every eval metric the folds reported and `folds.json`; no model is
registered, since no fold's model is the workload's (train it with the cv section removed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import RunError, TrainingFailed
from orchestrator.spec import Domain, TuneSpec, WorkloadSpec
from orchestrator.sweeps.sweep import EndedTrials, run_trials

__all__ = ["FOLD_PATH", "CVResult", "FoldRow", "cv_lines", "run_cv", "sweep_of"]

FOLD_PATH = "cv.fold"  # the sweep's one dimension


@dataclass
class FoldRow:
    fold: int
    trial_id: str
    status: str  # DONE, ERROR (as a sweep's trials)
    train_rows: int  # the other folds' rows it trained on
    eval_rows: int  # its own fold's rows, every one evaluated
    metrics: dict[str, float]  # its last evaluation: eval_*
    error: str | None = None


@dataclass
class CVResult:
    name: str
    path: str  # the cross-validation's sweep directory
    metric: str
    mode: str  # whether lower (min) or higher (max) `metric` is better
    mean: float
    std: float  # across folds, of the folds themselves (ddof 0, as scikit-learn's reports)
    folds: list[FoldRow]
    summary: dict[str, tuple[float, float]]  # every eval metric: (mean, std)
    seconds: float
    mlflow_run_id: str | None = None
    notes: list[str] = field(default_factory=list)


def sweep_of(spec: WorkloadSpec) -> WorkloadSpec:
    """The cross-validation as the grid sweep that runs it: one trial per fold.

    The copy is not validated again (cv and tune are refused together in a workload file);
    each trial's workload is (`WorkloadSpec.sampled`): its cv section with its fold set.
    """
    cv = spec.cv
    if cv is None:
        raise RunError("the workload has no cv section; use orch run")
    folds = list(range(cv.folds)) if cv.fold is None else [cv.fold]
    tune = TuneSpec(
        metric=cv.metric,
        mode=cv.direction(),
        num_samples=1,
        search="grid",
        max_concurrent_trials=cv.max_concurrent_folds,
        space={FOLD_PATH: Domain(grid=folds)},
    )
    return spec.model_copy(update={"tune": tune})


def run_cv(
    spec: WorkloadSpec,
    *,
    address: str | None = None,
    name: str | None = None,
    resume: bool | None = None,
    verbose: bool = False,
    tracking: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> CVResult:
    """Run (or continue) the cross-validation of a workload's `cv` section.

    resume: as a sweep's (None continues one of that name if it exists; failed folds run again).
    """
    return run_trials(
        sweep_of(spec),
        _summarize,
        address=address,
        name=name,
        resume=resume,
        verbose=verbose,
        tracking=tracking,
        log=log,
    )


def _summarize(ended: EndedTrials) -> CVResult:
    """The folds' metrics, their means and deviations; tracked on the parent run, which ends.

    TrainingFailed when a fold did not report its metric: a mean over some folds is no cv's.
    """
    cv, tune = ended.spec.cv, ended.spec.tune
    assert cv is not None and tune is not None
    sizes, total = ended.run.fold_sizes, ended.run.dataset.train_rows
    folds = []
    for result, trial in zip(ended.results, ended.rows, strict=True):
        fold = int(trial.params[FOLD_PATH])
        last = result.metrics or {}
        folds.append(
            FoldRow(
                fold=fold,
                trial_id=trial.trial_id,
                status=trial.status,
                train_rows=total - sizes[fold],
                eval_rows=sizes[fold],
                metrics={k: float(v) for k, v in last.items() if _is_eval(k, v)},
                error=trial.error,
            )
        )
    folds.sort(key=lambda f: f.fold)
    missing = [f for f in folds if f.status == "ERROR" or cv.metric not in f.metrics]
    summary = _mean_std(folds) if not missing else {}
    mean, std = summary.get(cv.metric, (math.nan, math.nan))
    result = CVResult(
        name=ended.name,
        path=ended.path,
        metric=cv.metric,
        mode=tune.mode,
        mean=mean,
        std=std,
        folds=folds,
        summary=summary,
        seconds=ended.seconds,
        mlflow_run_id=ended.parent.run_id if ended.parent is not None else None,
        notes=list(ended.notes),
    )
    if ended.parent is not None:
        result.notes += _track(ended.parent, result, failed=bool(missing))
    if missing:
        why = "; ".join(f"fold {f.fold}: {f.error or f'no {cv.metric}'}" for f in missing)
        raise TrainingFailed(
            f"{len(missing)} of {len(folds)} folds of {ended.name} did not report "
            f"{cv.metric} ({why}); run it again to retry them"
        )
    return result


def _is_eval(key: str, value: Any) -> bool:
    return (
        key.startswith("eval_")
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _mean_std(folds: list[FoldRow]) -> dict[str, tuple[float, float]]:
    """(mean, std) of each metric every fold reported."""
    import numpy as np

    shared = set.intersection(*(set(f.metrics) for f in folds)) if folds else set()
    out = {}
    for key in sorted(shared):
        values = np.array([f.metrics[key] for f in folds])
        out[key] = (float(values.mean()), float(values.std()))
    return out


def _track(parent: Any, result: CVResult, failed: bool) -> list[str]:
    metrics = {}
    for key, (mean, std) in result.summary.items():
        metrics[f"cv_{key}_mean"], metrics[f"cv_{key}_std"] = mean, std
    tags = {"orch.kind": "cv", "orch.cv_folds": str(len(result.folds))}
    texts = {"folds.json": json.dumps([f.__dict__ for f in result.folds], indent=2)}
    notes: list[str] = parent.summary(metrics, tags, texts)
    # No model: each fold's is trained on part of the data only.
    return notes + parent.finish("FAILED" if failed else "FINISHED", None, None)


def cv_lines(result: CVResult) -> list[str]:
    """The folds as a table, then the mean and standard deviation of every eval metric."""
    keys = [result.metric] + [k for k in result.summary if k != result.metric]
    keys = keys[:4]
    header = ["fold", "trial", "train", "eval", *keys, "status"]
    cells = [
        [
            str(f.fold),
            f.trial_id,
            str(f.train_rows),
            str(f.eval_rows),
            *(f"{f.metrics[k]:.4g}" if k in f.metrics else "-" for k in keys),
            f.status,
        ]
        for f in result.folds
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *cells]
    ]
    lines += [f"{k}: {m:.4g} +- {s:.4g}" for k, (m, s) in result.summary.items()]
    return lines
