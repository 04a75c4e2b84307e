"""The `cv:` section: k-fold cross-validation of the workload, and its checks against the rest.

A cross-validation trains the workload once per fold of the training split (by sample id) and
evaluates each run on its own fold; the original eval split is not used. orch runs the folds as
a grid sweep over `cv.fold` (orchestrator/sweeps/cv.py), so the checks here are the ones a
sweep's trials would otherwise fail on, one fold at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from orchestrator.spec.base import NonNegativeInt, PositiveInt, Problem, Section, SpecFieldError
from orchestrator.spec.model import reported_metrics

if TYPE_CHECKING:
    from orchestrator.spec.workload import WorkloadSpec

__all__ = ["MAX_FOLDS", "CVSpec", "cv_problems", "fold_workloads"]

MAX_FOLDS = 100  # one Tune trial per fold: beyond this, leave-one-out is the better tool


class CVSpec(Section):
    folds: PositiveInt = Field(
        5, ge=2, le=MAX_FOLDS, description="Folds of the training split: one run per fold."
    )
    metric: str = Field(
        "eval_loss",
        description="The evaluation metric whose mean and standard deviation across the folds "
        "the cross-validation reports (every eval_* metric is summarized; this one first).",
    )
    mode: Literal["min", "max"] | None = Field(
        None, description="Whether lower or higher `metric` is better; null: from its name."
    )
    max_concurrent_folds: PositiveInt | None = Field(
        None, description="Folds trained at once; null: as many as resources allow."
    )
    fold: NonNegativeInt | None = Field(
        None, description="Run only this fold (0-based), e.g. to rerun one; null: every fold."
    )

    @model_validator(mode="after")
    def _fold_in_range(self) -> CVSpec:
        if self.fold is not None and self.fold >= self.folds:
            raise SpecFieldError(
                [
                    (
                        ("fold",),
                        f"{self.fold} is not a fold of {self.folds}: use 0 to {self.folds - 1}",
                    )
                ]
            )
        return self

    def direction(self) -> Literal["min", "max"]:
        """`mode`, or what the metric's name implies: losses and perplexities fall."""
        if self.mode is not None:
            return self.mode
        return "min" if self.metric.endswith(("loss", "perplexity")) else "max"


def cv_problems(spec: WorkloadSpec, cv: CVSpec) -> list[Problem]:
    """What in `cv` does not fit the rest of `spec`."""
    if spec.tune is not None:  # the one problem worth reporting until it is fixed
        return [
            (
                ("cv",),
                "cv and tune cannot be combined: a cross-validation runs the folds as a sweep "
                "of its own; cross-validate the best workload a sweep writes "
                "(best_workload.yaml) instead, or remove one of the two sections",
            )
        ]
    problems: list[Problem] = []
    evaluated = [m for m in reported_metrics(spec.model) if m.startswith("eval_")]
    if cv.metric not in evaluated:
        problems.append(
            (
                ("cv", "metric"),
                f"{cv.metric!r} is not an evaluation metric this model reports; one of: "
                + ", ".join(evaluated),
            )
        )
    if spec.train.eval_batches is not None:
        problems.append(
            (
                ("train", "eval_batches"),
                f"{spec.train.eval_batches} would evaluate only part of each fold; a "
                "cross-validation evaluates every sample of its fold: set it to null",
            )
        )
    if spec.data.limit is not None and spec.data.limit < cv.folds:
        problems.append(
            (
                ("cv", "folds"),
                f"{cv.folds} folds of at most {spec.data.limit} records (data.limit): every fold "
                f"needs a sample; use at most {spec.data.limit} folds",
            )
        )
    return problems


def fold_workloads(spec: WorkloadSpec) -> list[WorkloadSpec]:
    """The workload of each fold a cross-validation runs (`spec` itself without a cv section).

    Copies without validation: only `cv.fold` changes, to a value in range.
    """
    cv = spec.cv
    if cv is None:
        return [spec]
    folds = range(cv.folds) if cv.fold is None else [cv.fold]
    return [spec.model_copy(update={"cv": cv.model_copy(update={"fold": i})}) for i in folds]
