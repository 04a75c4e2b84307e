"""The `export:` section: portable copies of the final model (ONNX, TorchScript) made at the end.

Top level, not under `train:`: the driver exports once the run has ended, so no training worker
needs it (`train:` travels to every worker) and a sweep cannot search it.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.spec.base import PositiveFloat, Problem, Section
from orchestrator.spec.model import MODEL_SECTIONS

__all__ = [
    "DEFAULT_TOLERANCE",
    "EXPORT_FORMATS",
    "ExportFormat",
    "ExportSpec",
    "export_list_schema",
    "export_problems",
    "unexportable",
]

ExportFormat = Literal["onnx", "torchscript"]
EXPORT_FORMATS: tuple[str, ...] = typing.get_args(ExportFormat)
DEFAULT_TOLERANCE = 1e-4


class ExportSpec(Section):
    """Formats to export the final fp32 model to, each checked against eager PyTorch."""

    formats: list[ExportFormat] = Field(
        min_length=1, description="Formats to write beside the model: onnx, torchscript."
    )
    tolerance: PositiveFloat = Field(
        DEFAULT_TOLERANCE,
        description="Largest absolute difference from eager PyTorch on eval batches; an export "
        "above it is refused.",
    )

    @model_validator(mode="before")
    @classmethod
    def _list_shorthand(cls, value: Any) -> Any:
        # `export: [onnx, torchscript]` is the usual form; the mapping sets a tolerance too.
        return {"formats": value} if isinstance(value, list) else value

    @field_validator("formats")
    @classmethod
    def _once_each(cls, formats: list[str]) -> list[str]:
        if len(set(formats)) < len(formats):
            twice = sorted({f for f in formats if formats.count(f) > 1})
            raise ValueError(f"lists {', '.join(twice)} more than once")
        return formats


def export_list_schema(schema: dict[str, Any]) -> None:
    """The JSON Schema of the `export` field also takes the list shorthand (for editors)."""
    shorthand = {"type": "array", "items": {"enum": list(EXPORT_FORMATS)}, "minItems": 1}
    schema["anyOf"] = [shorthand, *schema.get("anyOf", [])]


def unexportable(kind: str) -> str | None:
    """Why a model kind cannot be exported; None when it can: every kind whose inputs orch knows."""
    section = MODEL_SECTIONS.get(kind)
    if section is not None and getattr(section, "inputs", None) is not None:
        return None
    kinds = ", ".join(k for k, s in MODEL_SECTIONS.items() if getattr(s, "inputs", None))
    return (
        f"a {kind} model cannot be exported by orch: orch cannot see what its forward takes, "
        f"so it cannot check the export against it; export formats ({', '.join(EXPORT_FORMATS)}) "
        f"are for the kinds {kinds}. Export a custom model yourself from its fp32 state dict "
        "(orchestrator.models.load_exported)"
    )


def export_problems(export: ExportSpec | None, kind: str, *, cv: bool) -> list[Problem]:
    """What refuses a workload's `export` before anything starts: a kind orch cannot export, and
    runs that end without one model of the workload's (cv's folds; a sweep exports its best
    trial's)."""
    if export is None:
        return []
    problems: list[Problem] = []
    if (reason := unexportable(kind)) is not None:
        problems.append((("export",), f"{reason}; remove export"))
    if cv:
        problems.append(
            (
                ("export",),
                "a cross-validation exports no model (no fold's model is the workload's); "
                "remove export, or remove cv to train and export the model",
            )
        )
    return problems
