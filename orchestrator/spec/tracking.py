"""The `tracking:` section (MLflow) and the promotion condition it may carry."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from orchestrator.spec.base import Section, SpecFieldError

__all__ = ["MLflowSpec", "TrackingSpec", "parse_condition"]

_CONDITION = re.compile(
    r"^\s*([A-Za-z_][\w/.]*)\s*(<=|>=|==|!=|<|>)\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*$"
)


def parse_condition(text: str) -> list[tuple[str, str, float]]:
    """Parse `metric op number [and ...]` without eval; raise ValueError on anything else."""
    clauses = []
    for part in re.split(r"\s+and\s+", text.strip()):
        m = _CONDITION.match(part)
        if not m:
            raise ValueError(
                f"cannot parse {part!r}; write 'metric OP number' joined by 'and', "
                "OP one of < <= > >= == !="
            )
        clauses.append((m.group(1), m.group(2), float(m.group(3))))
    return clauses


class MLflowSpec(Section):
    enabled: bool = Field(True, description="Record runs in MLflow.")
    tracking_uri: str | None = Field(
        None, description="MLflow server URI; null: a local store in the working directory."
    )
    experiment: str | None = Field(None, description="Experiment name; null: the workload name.")
    register_as: str | None = Field(None, description="Register the final model under this name.")
    promote_if: str | None = Field(
        None, description="Register only if this holds, e.g. 'eval_loss < 3.0 and eval_acc > 0.5'."
    )

    @field_validator("promote_if")
    @classmethod
    def _condition_parses(cls, v: str | None) -> str | None:
        if v is not None:
            parse_condition(v)
        return v

    @model_validator(mode="after")
    def _promote_needs_register(self) -> MLflowSpec:
        if self.promote_if and not self.register_as:
            raise SpecFieldError([(("promote_if",), "only applies with register_as set")])
        return self


class TrackingSpec(Section):
    mlflow: MLflowSpec = Field(default_factory=MLflowSpec, description="MLflow settings.")
