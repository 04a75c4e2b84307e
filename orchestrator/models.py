"""Model construction: one entry per `model.kind` in MODELS, plus loading of exported models.

Every builder takes the validated model spec and what the prepared data says (vocabulary,
classes, image shape) and returns a plain `nn.Module`; distribution (DDP, DeepSpeed) is
applied elsewhere, in the training loop.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter
from torch import nn

from orchestrator.spec import (
    BertMLMModel,
    CNNModel,
    CustomModel,
    GPTModel,
    ModelSpec,
    ResNetModel,
)

__all__ = [
    "MODELS",
    "DataInfo",
    "LogitsOnly",
    "ModelError",
    "build_model",
    "config_hash",
    "import_model_library",
    "load_exported",
    "resolve_custom",
    "task_of",
]


class ModelError(Exception):
    """A model that cannot be built as specified (bad import path, bad weights...)."""


@dataclass(frozen=True)
class DataInfo:
    """What the model needs to know about the prepared data."""

    vocab_size: int | None = None
    num_classes: int | None = None
    channels: int | None = None


def task_of(spec: Any) -> str:
    """What the model is trained against: masked_lm, causal_lm or classification."""
    return {"bert_mlm": "masked_lm", "gpt_lm": "causal_lm"}.get(
        spec.kind, getattr(spec, "task", "classification")
    )


def _vocab(spec: BertMLMModel | GPTModel, data: DataInfo) -> int:
    vocab = spec.vocab_size or data.vocab_size
    if vocab is None:
        raise ModelError(
            "model.vocab_size is not set and the data has no tokenizer to take it from"
        )
    if data.vocab_size and vocab < data.vocab_size:
        raise ModelError(
            f"model.vocab_size {vocab} is smaller than the tokenizer's {data.vocab_size}; "
            "raise it or leave it null to take the tokenizer's"
        )
    return vocab


def _bert(spec: BertMLMModel, data: DataInfo) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    if spec.pretrained:
        return _from_pretrained(BertForMaskedLM, spec.pretrained)
    config = BertConfig(
        vocab_size=_vocab(spec, data),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size or 4 * spec.hidden_size,
        max_position_embeddings=spec.max_seq_len,
        hidden_dropout_prob=spec.dropout,
        attention_probs_dropout_prob=spec.dropout,
        attn_implementation="sdpa",
    )
    return BertForMaskedLM(config)


def _gpt(spec: GPTModel, data: DataInfo) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    if spec.pretrained:
        return _from_pretrained(GPT2LMHeadModel, spec.pretrained)
    config = GPT2Config(
        vocab_size=_vocab(spec, data),
        n_embd=spec.hidden_size,
        n_layer=spec.num_layers,
        n_head=spec.num_heads,
        n_inner=spec.intermediate_size,
        n_positions=spec.max_seq_len,
        resid_pdrop=spec.dropout,
        embd_pdrop=spec.dropout,
        attn_pdrop=spec.dropout,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config)


def _from_pretrained(cls: Any, path: str) -> nn.Module:
    if not Path(path, "config.json").is_file():
        raise ModelError(
            f"model.pretrained: {path} has no config.json (a save_pretrained directory)"
        )
    return cls.from_pretrained(path, local_files_only=True)


def _resnet(spec: ResNetModel, data: DataInfo) -> nn.Module:
    import torchvision

    build = {
        18: torchvision.models.resnet18,
        34: torchvision.models.resnet34,
        50: torchvision.models.resnet50,
    }[spec.depth]
    model = build(weights=None, num_classes=spec.num_classes)
    if spec.in_channels != 3:
        model.conv1 = nn.Conv2d(
            spec.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False
        )
    if spec.image_size < 64:  # small images: the ImageNet stem would shrink them to nothing
        model.conv1 = nn.Conv2d(
            spec.in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False
        )
        model.maxpool = nn.Identity()
    _load_state(model, spec.pretrained)
    return model


def _cnn(spec: CNNModel, data: DataInfo) -> nn.Module:
    layers: list[nn.Module] = []
    channels = spec.in_channels
    for out in spec.channels:
        layers += [
            nn.Conv2d(channels, out, 3, padding=1),
            nn.BatchNorm2d(out),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = out
    side = spec.image_size // 2 ** len(spec.channels)
    model = nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Dropout(spec.dropout),
        nn.Linear(channels * side * side, spec.num_classes),
    )
    _load_state(model, spec.pretrained)
    return model


def resolve_custom(path: str) -> Callable[..., nn.Module]:
    """Import 'package.module:function'; ModelError says which part is missing."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"model.build: cannot import module {module_name!r}: {exc}") from None
    build = getattr(module, attr, None)
    if not callable(build):
        raise ModelError(f"model.build: module {module_name!r} has no function {attr!r}")
    return build


def _custom(spec: CustomModel, data: DataInfo) -> nn.Module:
    model = resolve_custom(spec.build)(**spec.args)
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model.build: {spec.build} returned {type(model).__name__}, not nn.Module"
        )
    return model


def _load_state(model: nn.Module, path: str | None) -> None:
    if path is None:
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ModelError(f"model.pretrained: cannot load {path}: {exc}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelError(f"model.pretrained: {path} does not fit the model: {exc}") from None
    if missing or unexpected:
        raise ModelError(
            f"model.pretrained: {path} does not fit the model "
            f"(missing {len(missing)} keys, unexpected {len(unexpected)})"
        )


MODELS: dict[str, Callable[[Any, DataInfo], nn.Module]] = {
    "bert_mlm": _bert,
    "gpt_lm": _gpt,
    "resnet": _resnet,
    "cnn": _cnn,
    "custom": _custom,
}

_MODEL_SPEC: TypeAdapter[Any] = TypeAdapter(ModelSpec)

# What each kind's builder imports; the transformers models take seconds to import.
_LIBRARIES = {
    "bert_mlm": ("transformers", ("BertConfig", "BertForMaskedLM")),
    "gpt_lm": ("transformers", ("GPT2Config", "GPT2LMHeadModel")),
    "resnet": ("torchvision", ("models",)),
}


def import_model_library(kind: str) -> None:
    """Import what `build_model` needs for this kind, so it can happen ahead, in a thread.

    Failures are left for `build_model` to report, where they belong to the model.
    """
    if kind not in _LIBRARIES:
        return
    module, names = _LIBRARIES[kind]
    try:
        library = importlib.import_module(module)
        for name in names:
            getattr(library, name)  # transformers imports its modeling code on attribute access
    except Exception:
        return


def build_model(spec: Any, data: DataInfo) -> nn.Module:
    """Build the model a (validated, or plain-dict) model spec describes."""
    if isinstance(spec, dict):
        spec = _MODEL_SPEC.validate_python(spec)
    return MODELS[spec.kind](spec, data)


def config_hash(spec: Any, data: DataInfo) -> str:
    """Identifies the architecture, so a checkpoint is never loaded into another model."""
    payload = {
        "model": spec.model_dump(mode="json", exclude={"pretrained", "dropout"}),
        "data": data.__dict__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class LogitsOnly(nn.Module):
    """A transformers model as a plain tensor-to-tensor module (for MLflow's pytorch flavor)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits


def load_exported(directory: str | Path) -> nn.Module:
    """Load an exported model (model.json, state_dict.pt) with plain torch: no Ray or DeepSpeed."""
    directory = Path(directory)
    meta = json.loads((directory / "model.json").read_text())
    model = build_model(meta["model"], DataInfo(**meta["data"]))
    state = torch.load(directory / "state_dict.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model
