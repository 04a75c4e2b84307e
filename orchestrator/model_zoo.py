"""The builders behind orchestrator.models' table: one per model kind, and an input example each.

Every builder takes the validated model section and what the prepared data says (vocabulary,
classes, image shape) and returns a plain `nn.Module`; distribution (DDP, DeepSpeed) is
applied elsewhere, in the training loop. Nothing here is looked up by kind: the table in
orchestrator.models pairs each kind with its builder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator.import_path import ImportPathError, import_function
from orchestrator.spec import (
    BertClassifierModel,
    BertMLMModel,
    CNNModel,
    CustomModel,
    GPTModel,
    MLPModel,
    ResNetModel,
)

__all__ = [
    "DataInfo",
    "ModelError",
    "bert_config",
    "build_bert",
    "build_cnn",
    "build_custom",
    "build_gpt",
    "build_mlp",
    "build_resnet",
    "custom_example",
    "feature_example",
    "image_example",
    "resolve_custom",
    "token_example",
]


class ModelError(Exception):
    """A model that cannot be built as specified (bad import path, bad weights...)."""


@dataclass(frozen=True)
class DataInfo:
    """What the model needs to know about the prepared data."""

    vocab_size: int | None = None
    num_classes: int | None = None
    channels: int | None = None
    num_features: int | None = None  # tabular data: the width of each row's feature vector
    pad_id: int | None = None  # labeled text: the padding token (the attention mask's zeros)
    seq_len: int | None = None  # labeled text: tokens per sample


def _vocab(spec: BertMLMModel | BertClassifierModel | GPTModel, data: DataInfo) -> int:
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


def build_bert(spec: BertMLMModel, data: DataInfo) -> nn.Module:
    cls = masked_lm_bert()
    if spec.pretrained:
        return _from_pretrained(cls, spec.pretrained)
    return cls(bert_config(spec, data))


@functools.cache
def masked_lm_bert() -> type[nn.Module]:
    """transformers' BertForMaskedLM, able to predict at chosen positions only.

    `model(input_ids, predict_at=mask)` returns the logits of the positions where `mask` is
    True, (positions, vocab): the encoder still reads every token, but the MLM head (its
    transform and the projection to the vocabulary) runs on the ~15% that are masked, as
    MosaicBERT does. Without `predict_at` it is BertForMaskedLM as it was, with the same
    weights and state dict, so checkpoints and exports are unchanged. Defined on first use:
    importing transformers takes seconds.
    """
    from transformers import BertForMaskedLM

    class MaskedLMBert(BertForMaskedLM):
        predicts_at_positions = True

        def forward(
            self, input_ids: Any = None, *args: Any, predict_at: Any = None, **kwargs: Any
        ) -> Any:
            if predict_at is None:
                return super().forward(input_ids, *args, **kwargs)
            hidden = self.bert(input_ids, *args, **kwargs).last_hidden_state
            return self.cls(hidden[predict_at])

    return MaskedLMBert


def bert_config(spec: BertMLMModel | BertClassifierModel, data: DataInfo, **extra: Any) -> Any:
    """The transformers BertConfig of a BERT-family section (`extra`: its own settings)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=_vocab(spec, data),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size or 4 * spec.hidden_size,
        max_position_embeddings=spec.max_seq_len,
        hidden_dropout_prob=spec.dropout,
        attention_probs_dropout_prob=spec.dropout,
        attn_implementation="sdpa",
        **extra,
    )


def build_gpt(spec: GPTModel, data: DataInfo) -> nn.Module:
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


def build_resnet(spec: ResNetModel, data: DataInfo) -> nn.Module:
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


def build_cnn(spec: CNNModel, data: DataInfo) -> nn.Module:
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


_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


def build_mlp(spec: MLPModel, data: DataInfo) -> nn.Module:
    width, classes = _tabular_shape(data)
    layers: list[nn.Module] = []
    for hidden in spec.hidden_sizes:
        layers.append(nn.Linear(width, hidden))
        if spec.batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(_ACTIVATIONS[spec.activation]())
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, classes))


def _tabular_shape(data: DataInfo) -> tuple[int, int]:
    if data.num_features is None or data.num_classes is None:
        raise ModelError(
            "model: mlp takes its input width and classes from tabular data "
            "(data.format: tabular), and this data has none"
        )
    return data.num_features, data.num_classes


def resolve_custom(path: str) -> Callable[..., nn.Module]:
    """Import 'package.module:function'; ModelError says which part is missing."""
    try:
        return import_function(path, "model.build")
    except ImportPathError as exc:
        raise ModelError(str(exc)) from None


def build_custom(spec: CustomModel, data: DataInfo) -> nn.Module:
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


# Input examples are what MLflow stores beside a registered model and what its signature is
# inferred from: one sample of what the model's forward takes, with batch size 1.
_EXAMPLE_TOKENS = 16


def _tokens(length: int) -> np.ndarray:
    return np.zeros((1, length), dtype=np.int64)


def _images(channels: int, size: int) -> np.ndarray:
    return np.zeros((1, channels, size, size), dtype=np.float32)


def token_example(spec: BertMLMModel | GPTModel, data: DataInfo) -> np.ndarray:
    # A short sequence, yet never past the model's position table.
    return _tokens(min(_EXAMPLE_TOKENS, spec.max_seq_len))


def image_example(spec: ResNetModel | CNNModel, data: DataInfo) -> np.ndarray:
    # The prepared data knows its channels better than a default in the spec.
    return _images(data.channels or spec.in_channels, spec.image_size)


def feature_example(spec: MLPModel | CustomModel, data: DataInfo) -> np.ndarray:
    return np.zeros((1, _tabular_shape(data)[0]), dtype=np.float32)


def custom_example(spec: CustomModel, data: DataInfo) -> np.ndarray:
    # orch cannot see what a custom model takes; the training loop feeds language models
    # token ids and classifiers images or tabular features, so guess the same (a 32x32 image
    # by default).
    if spec.task == "classification" and data.num_features is not None:
        return feature_example(spec, data)
    if spec.task == "classification":
        return _images(data.channels or 3, 32)
    return _tokens(_EXAMPLE_TOKENS)
