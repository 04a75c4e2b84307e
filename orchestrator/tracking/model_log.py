"""The finished run's model in MLflow (pytorch flavor), registered when `promote_if` holds."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.spec import MLflowSpec, parse_condition

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["log_model", "promotion"]

_OPS = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


def promotion(condition: str | None, metrics: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether final metrics satisfy `promote_if`, and why (for the run's tags)."""
    if not condition:
        return True, "no promote_if condition"
    reasons = []
    for name, op, bound in parse_condition(condition):
        value = metrics.get(name)
        if not isinstance(value, (int, float)) or math.isnan(value):
            return False, f"{name} was not reported"
        holds = _OPS[op](value, bound)
        reasons.append(f"{name} {value:.6g} {op} {bound:g}: {'yes' if holds else 'no'}")
        if not holds:
            return False, "; ".join(reasons)
    return True, "; ".join(reasons)


def log_model(
    client: MlflowClient,
    uri: str,
    run_id: str,
    settings: MLflowSpec,
    judged_on: Mapping[str, float],
    model_dir: str,
) -> list[str]:
    """Log the exported model to the run, register it if promoted; notes to show."""
    import mlflow
    import torch

    import orchestrator
    from orchestrator.exporting import export_files
    from orchestrator.models import LogitsOnly, load_exported

    meta = json.loads(Path(model_dir, "model.json").read_text())
    model = load_exported(model_dir, trust_custom_code=True).eval()  # this run's own
    if hasattr(model, "config"):  # transformers models return output objects, not tensors
        model = LogitsOnly(model).eval()
    example = _input_example(meta)
    with torch.no_grad():
        output = model(torch.from_numpy(example))
    signature = mlflow.models.infer_signature(example, output.numpy())
    if example.ndim == 2:  # token ids: any batch size and any sequence length
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        signature = ModelSignature(
            inputs=Schema([TensorSpec(example.dtype, (-1, -1))]),
            outputs=Schema([TensorSpec(output.numpy().dtype, (-1, -1, output.shape[-1]))]),
        )
    promote, reason = promotion(settings.promote_if, judged_on)
    register = settings.register_as if promote else None
    # orch's code travels with the model, so it loads where orch is not installed.
    code = [str(Path(orchestrator.__file__).parent)]
    with _fluent_uri(uri), mlflow.start_run(run_id=run_id), _quiet("mlflow"):
        mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            registered_model_name=register,
            code_paths=code,
            # A pickled module takes any sequence length; an exported graph fixes it.
            serialization_format="pickle",
        )
        mlflow.log_artifact(str(Path(model_dir, "model.json")), "model_export")
        for exported in export_files(model_dir):  # ONNX, TorchScript: the workload's `export:`
            mlflow.log_artifact(str(exported), "model_export")
    notes = []
    if settings.register_as:
        client.set_tag(run_id, "orch.promoted", str(promote).lower())
        client.set_tag(run_id, "orch.promotion_reason", reason)
        verdict = f"registered as {register}" if promote else "not registered"
        notes.append(f"tracking: model {verdict} ({reason})")
    return notes


def _input_example(meta: dict[str, Any]) -> Any:
    from orchestrator.models import DataInfo, input_example

    # The model kinds' table knows what each kind takes; model.json names the kind and data.
    return input_example(meta["model"], DataInfo(**meta["data"]))


@contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (needed by log_model) at `uri`, for this block only.

    `mlflow.set_tracking_uri` also sets $MLFLOW_TRACKING_URI for the whole process; left set, the
    next run in the same process (a sweep after a run, a test after a test) would silently track
    to this server instead of its own default.
    """
    import mlflow

    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        # Back to "the env var decides" (MLflow's hint omits None); this unsets it too.
        mlflow.set_tracking_uri(None)
        if saved_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """MLflow narrates model logging at INFO and WARNING; orch prints the outcome itself."""
    import logging

    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
