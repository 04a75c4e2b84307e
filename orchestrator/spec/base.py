"""What every spec section shares: the base model, the cross-field error and bounded numbers."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "IMPORT_PATH",
    "Inputs",
    "NonNegativeInt",
    "PositiveFloat",
    "PositiveInt",
    "Problem",
    "Section",
    "SpecFieldError",
]

# What a model consumes and a data format yields; a model and its data must agree on it.
Inputs = Literal["tokens", "images", "features", "labeled_tokens"]

# A dotted field path (relative to the model raising it) and what is wrong there.
Problem = tuple[tuple[str, ...], str]

# 'package.module:function': how a workload names code of its own (model.build, train.step).
IMPORT_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class SpecFieldError(ValueError):
    """A cross-field problem, carrying the dotted paths (relative to the model raising it)."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(p)}: {m}" for p, m in problems))


class Section(BaseModel):
    """Base of every spec section: unknown keys are errors and a loaded spec never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=False)


PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
