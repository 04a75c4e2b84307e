"""One table of model kinds (MODEL_KINDS), and everything that reads it.

The spec section of a kind declares its task and the data it takes; this table adds what
needs torch: the builder, the library worth importing ahead, and an input example for the
exported model. Adding a kind is a section class in orchestrator.spec (and a member of the
ModelSpec union) plus one ModelKind here; the check below fails at import when they disagree.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from pydantic import TypeAdapter
from torch import nn

from orchestrator.bert_classifier import build_bert_classifier, classifier_example
from orchestrator.masking import first_line
from orchestrator.model_zoo import (
    DataInfo,
    ModelError,
    build_bert,
    build_cnn,
    build_custom,
    build_gpt,
    build_mlp,
    build_resnet,
    custom_example,
    feature_example,
    image_example,
    resolve_custom,
    token_example,
)
from orchestrator.spec import (
    MODEL_SECTIONS,
    BertClassifierModel,
    BertMLMModel,
    CNNModel,
    CustomModel,
    GPTModel,
    MLPModel,
    ModelSpec,
    ResNetModel,
    Section,
    Task,
    section_kind,
)

__all__ = [
    "MODEL_KINDS",
    "DataInfo",
    "LogitsOnly",
    "ModelError",
    "ModelKind",
    "build_model",
    "config_hash",
    "import_ahead",
    "import_model_library",
    "input_example",
    "load_exported",
    "resolve_custom",
    "task_of",
]

S = TypeVar("S", bound=Section)


@dataclass(frozen=True)
class ModelKind(Generic[S]):
    """What orch does with one `model.kind`; its task and inputs are declared by `spec`."""

    spec: type[S]  # the spec section; its `kind` Literal is this entry's key
    build: Callable[[S, DataInfo], nn.Module]
    example: Callable[[S, DataInfo], np.ndarray]  # one input the built model accepts
    # (module, names) that `build` imports: transformers takes seconds, worth starting early.
    library: tuple[str, tuple[str, ...]] | None = None

    @property
    def kind(self) -> str:
        return section_kind(self.spec)


_BERT: ModelKind[BertMLMModel] = ModelKind(
    BertMLMModel, build_bert, token_example, ("transformers", ("BertConfig", "BertForMaskedLM"))
)
_GPT: ModelKind[GPTModel] = ModelKind(
    GPTModel, build_gpt, token_example, ("transformers", ("GPT2Config", "GPT2LMHeadModel"))
)
_RESNET: ModelKind[ResNetModel] = ModelKind(
    ResNetModel, build_resnet, image_example, ("torchvision", ("models",))
)
_CNN: ModelKind[CNNModel] = ModelKind(CNNModel, build_cnn, image_example)
_CUSTOM: ModelKind[CustomModel] = ModelKind(CustomModel, build_custom, custom_example)
_MLP: ModelKind[MLPModel] = ModelKind(MLPModel, build_mlp, feature_example)
_BERT_CLASSIFIER: ModelKind[BertClassifierModel] = ModelKind(
    BertClassifierModel,
    build_bert_classifier,
    classifier_example,
    ("transformers", ("BertConfig", "BertModel")),
)

MODEL_KINDS: dict[str, ModelKind[Any]] = {
    entry.kind: entry for entry in (_BERT, _GPT, _RESNET, _CNN, _CUSTOM, _MLP, _BERT_CLASSIFIER)
}

# A kind the spec accepts but this table lacks would only fail mid-run, on a worker.
if {k: e.spec for k, e in MODEL_KINDS.items()} != MODEL_SECTIONS:
    raise ImportError(
        f"orchestrator.models.MODEL_KINDS has {sorted(MODEL_KINDS)} but the spec's ModelSpec "
        f"union has {sorted(MODEL_SECTIONS)}: give every kind one ModelKind entry"
    )

_MODEL_SPEC: TypeAdapter[ModelSpec] = TypeAdapter(ModelSpec)


def _section(spec: ModelSpec | Mapping[str, Any]) -> ModelSpec:
    """A model section from a validated section or a plain dict (as in an exported model.json)."""
    return _MODEL_SPEC.validate_python(spec) if isinstance(spec, Mapping) else spec


def task_of(spec: ModelSpec) -> Task:
    """What the model is trained against: masked_lm, causal_lm or classification."""
    return spec.task


def import_ahead(kind: str, *, training: bool) -> None:
    """Start importing what building a `kind` model imports, in a daemon thread, so it overlaps
    with what the caller waits for before it builds one (Ray's start, the data stream's).

    `training`: also what creating an optimizer imports. torch wraps its optimizers' methods
    to keep torch.compile out, and the first optimizer imports torch._dynamo for that: over a
    second of CPU (1.3 s here), on every worker, right before the first step.
    """

    def run() -> None:
        import_model_library(kind)
        if training:
            with contextlib.suppress(Exception):  # left for the optimizer to fail on, if it does
                importlib.import_module("torch._dynamo")

    thread = threading.Thread(target=run, name="orch-import-ahead", daemon=True)
    thread.start()
    _AHEAD.append(thread)


# Imports started ahead and not yet waited for. `build_model` waits for them rather than import
# the same library beside them: transformers' lazily filled module fails a concurrent
# `from transformers import BertConfig` while another thread is still filling it.
_AHEAD: list[threading.Thread] = []


def _wait_for_imports_ahead() -> None:
    while _AHEAD:
        _AHEAD.pop().join()


def import_model_library(kind: str) -> None:
    """Import what `build_model` needs for this kind, so it can happen ahead, in a thread.

    Failures are left for `build_model` to report, where they belong to the model.
    """
    entry = MODEL_KINDS.get(kind)
    if entry is None or entry.library is None:
        return
    module, names = entry.library
    try:
        library = importlib.import_module(module)
        for name in names:
            getattr(library, name)  # transformers imports its modeling code on attribute access
    except Exception:
        return


def build_model(spec: ModelSpec | Mapping[str, Any], data: DataInfo) -> nn.Module:
    """Build the model a (validated, or plain-dict) model spec describes."""
    _wait_for_imports_ahead()
    section = _section(spec)
    return MODEL_KINDS[section.kind].build(section, data)


def input_example(spec: ModelSpec | Mapping[str, Any], data: DataInfo) -> np.ndarray:
    """One input (batch of 1) the model a (validated, or plain-dict) spec builds accepts."""
    section = _section(spec)
    return MODEL_KINDS[section.kind].example(section, data)


def config_hash(spec: ModelSpec, data: DataInfo) -> str:
    """Identifies the architecture, so a checkpoint is never loaded into another model."""
    payload = {
        "model": spec.model_dump(mode="json", exclude={"pretrained", "dropout"}),
        # Facts a kind does not use are None: left out, so a new DataInfo field (None for the
        # kinds before it) leaves their hashes, and so their checkpoints, as they were.
        "data": {k: v for k, v in data.__dict__.items() if v is not None},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class LogitsOnly(nn.Module):
    """A transformers model as a plain tensor-to-tensor module (for MLflow's pytorch flavor)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits


def load_exported(directory: str | Path, *, trust_custom_code: bool = False) -> nn.Module:
    """Load an exported model (model.json, state_dict.pt) with plain torch: no Ray or DeepSpeed.

    A `custom` model is built by calling the function model.json names, so loading one runs
    code chosen by whoever wrote the file: refused unless `trust_custom_code` (an export of
    your own). Built-in kinds only read weights, with `weights_only=True`.
    """
    directory = Path(directory)
    where = directory / "model.json"
    try:
        meta = json.loads(where.read_text())
        section = _section(meta["model"])
        data = DataInfo(**meta["data"])
    except (ValueError, KeyError, TypeError) as exc:  # pydantic's errors are ValueErrors
        raise ModelError(f"{where}: not an orch model export ({first_line(exc)})") from None
    if isinstance(section, CustomModel) and not trust_custom_code:
        raise ModelError(
            f"{where}: a custom model, built by calling {section.build!r}; load it with "
            "trust_custom_code=True only if you trust where this export came from"
        )
    if getattr(section, "pretrained", None):  # the weights are in state_dict.pt
        section = section.model_copy(update={"pretrained": None})
    model = build_model(section, data)
    state = torch.load(directory / "state_dict.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model
