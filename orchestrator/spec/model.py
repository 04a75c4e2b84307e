"""The `model:` section: one class per kind, each declaring its task and the data it trains on.

Adding a model kind here means a section class (with `task` and `inputs`) and a member of
the ModelSpec union; orchestrator.models then needs one entry in its MODEL_KINDS table.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from orchestrator.spec.base import IMPORT_PATH, Inputs, PositiveInt, Section, SpecFieldError

__all__ = [
    "BINARY_METRICS",
    "MODEL_SECTIONS",
    "TASK_METRICS",
    "BertClassifierModel",
    "BertMLMModel",
    "CNNModel",
    "CustomModel",
    "GPTModel",
    "MLPModel",
    "ModelSpec",
    "ResNetModel",
    "Task",
    "reported_metrics",
    "section_kind",
]

# What a model's outputs are trained against; the training loop picks its loss and metrics by it.
Task = Literal["classification", "causal_lm", "masked_lm"]

_TRAIN_METRICS = ("loss", "samples_per_s", "step_time_s", "data_wait_share")
_LM_METRICS = (*_TRAIN_METRICS, "tokens_per_s", "eval_loss", "eval_accuracy", "eval_perplexity")
# Classification metrics defined for two classes only: reported when the prepared data has two.
BINARY_METRICS = ("eval_roc_auc",)
# The metrics the training loop reports for each task (what a sweep can optimize).
TASK_METRICS: dict[Task, tuple[str, ...]] = {
    "classification": (
        *_TRAIN_METRICS,
        "eval_loss",
        "eval_accuracy",
        "eval_precision",
        "eval_recall",
        "eval_f1",
        *BINARY_METRICS,
    ),
    "masked_lm": _LM_METRICS,
    "causal_lm": _LM_METRICS,
}


class _TransformerModel(Section):
    # ClassVars are facts about the kind, not fields: they stay out of the YAML and the schema.
    inputs: ClassVar[Inputs | None] = "tokens"

    kind: str = Field(description="Model family.")  # narrowed to a Literal by each subclass
    vocab_size: PositiveInt | None = Field(
        None, description="Vocabulary size; null takes it from the prepared tokenizer."
    )
    hidden_size: PositiveInt = Field(768, description="Width of the hidden states.")
    num_layers: PositiveInt = Field(12, description="Number of Transformer blocks.")
    num_heads: PositiveInt = Field(12, description="Attention heads per block.")
    intermediate_size: PositiveInt | None = Field(
        None, description="Feed-forward width; null means 4 x hidden_size."
    )
    max_seq_len: PositiveInt = Field(512, description="Longest sequence the position table covers.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout probability.")
    pretrained: str | None = Field(
        None, description="Local directory of pretrained weights (save_pretrained format)."
    )

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> _TransformerModel:
        if self.hidden_size % self.num_heads:
            raise SpecFieldError(
                [
                    (
                        ("num_heads",),
                        f"hidden_size {self.hidden_size} is not divisible by num_heads "
                        f"{self.num_heads}; pick num_heads that divides hidden_size",
                    )
                ]
            )
        return self


class BertMLMModel(_TransformerModel):
    """BERT masked-language-model pretraining (transformers' BertForMaskedLM)."""

    task: ClassVar[Task] = "masked_lm"

    kind: Literal["bert_mlm"] = Field(description="Model family.")


class BertClassifierModel(_TransformerModel):
    """A BERT encoder with a classification head, for labeled text (data.format: labeled_text).

    The classes come from the data; the attention mask from the tokenizer's pad id.
    """

    task: ClassVar[Task] = "classification"
    inputs: ClassVar[Inputs | None] = "labeled_tokens"

    kind: Literal["bert_classifier"] = Field(description="Model family.")
    pooling: Literal["mean", "cls"] = Field(
        "mean",
        description="What the head reads: the mean of the unpadded tokens' states, or the "
        "[CLS] state through BERT's pooler (an MLM-only pretraining never trains [CLS] alone).",
    )
    pretrained: str | None = Field(
        None,
        description="Encoder weights to start from: an orch export directory of a bert_mlm "
        "run (model.json, state_dict.pt) or a save_pretrained directory; the head starts fresh.",
    )


class GPTModel(_TransformerModel):
    """GPT-2 style causal language model (transformers' GPT2LMHeadModel)."""

    task: ClassVar[Task] = "causal_lm"

    kind: Literal["gpt_lm"] = Field(description="Model family.")
    max_seq_len: PositiveInt = Field(
        1024, description="Longest sequence the position table covers."
    )


class ResNetModel(Section):
    """A torchvision ResNet classifier."""

    task: ClassVar[Task] = "classification"
    inputs: ClassVar[Inputs | None] = "images"

    kind: Literal["resnet"] = Field(description="Model family.")
    depth: Literal[18, 34, 50] = Field(50, description="ResNet depth: 18, 34 or 50.")
    num_classes: PositiveInt = Field(1000, description="Number of output classes.")
    in_channels: PositiveInt = Field(3, description="Channels of the input images.")
    image_size: PositiveInt = Field(224, description="Height and width of the input images.")
    pretrained: str | None = Field(None, description="Local path of a saved state dict.")


class CNNModel(Section):
    """A small convnet for 28x28 (MNIST) and 32x32 (CIFAR) images."""

    task: ClassVar[Task] = "classification"
    inputs: ClassVar[Inputs | None] = "images"

    kind: Literal["cnn"] = Field(description="Model family.")
    num_classes: PositiveInt = Field(10, description="Number of output classes.")
    in_channels: PositiveInt = Field(1, description="Channels of the input images.")
    image_size: Literal[28, 32] = Field(28, description="Height and width: 28 or 32.")
    channels: list[PositiveInt] = Field(
        [32, 64], min_length=1, max_length=4, description="Output channels of each conv block."
    )
    dropout: float = Field(0.25, ge=0, lt=1, description="Dropout before the classifier.")
    pretrained: str | None = Field(None, description="Local path of a saved state dict.")


class MLPModel(Section):
    """A multilayer perceptron for tabular data: its input width and classes come from the data."""

    task: ClassVar[Task] = "classification"
    inputs: ClassVar[Inputs | None] = "features"

    kind: Literal["mlp"] = Field(description="Model family.")
    hidden_sizes: list[PositiveInt] = Field(
        [64, 64], max_length=8, description="Width of each hidden layer; [] is a linear model."
    )
    activation: Literal["relu", "gelu", "tanh", "silu"] = Field(
        "relu", description="Nonlinearity after each hidden layer."
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout after each hidden layer.")
    batch_norm: bool = Field(False, description="BatchNorm after each hidden linear layer.")


class CustomModel(Section):
    """A model of your own: an import path to a function that returns an nn.Module."""

    # Whatever the function builds may take any data; orch cannot check it before the run.
    inputs: ClassVar[Inputs | None] = None

    kind: Literal["custom"] = Field(description="Model family.")
    build: str = Field(
        description="Import path 'package.module:function'; called with `args` as keywords.",
        pattern=IMPORT_PATH,
    )
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for build.")
    task: Task = Field(
        "classification", description="What the model's outputs are trained against."
    )


ModelSpec = Annotated[
    BertMLMModel | GPTModel | ResNetModel | CNNModel | CustomModel | MLPModel | BertClassifierModel,
    Field(discriminator="kind"),
]


def section_kind(section: type[BaseModel]) -> str:
    """The `kind` a model section class answers to, read off its Literal."""
    (kind,) = typing.get_args(section.model_fields["kind"].annotation)
    return str(kind)


# kind -> section class, read off the union so the list of kinds is written only there.
MODEL_SECTIONS: dict[str, type[Section]] = {
    section_kind(section): section for section in typing.get_args(typing.get_args(ModelSpec)[0])
}


def reported_metrics(model: ModelSpec) -> tuple[str, ...]:
    """The metrics the training loop reports for a model (what a sweep can optimize)."""
    return TASK_METRICS[model.task]
