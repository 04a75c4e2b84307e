"""The `train:` section: steps, batch sizes, precision, optimizer, LR schedule, checkpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.spec.base import (
    IMPORT_PATH,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Problem,
    Section,
    SpecFieldError,
)
from orchestrator.spec.distributed import DeepSpeedSpec

__all__ = ["OptimizerSpec", "SchedulerSpec", "TrainSpec", "step_problems"]


class OptimizerSpec(Section):
    name: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer: adamw or sgd.")
    lr: PositiveFloat = Field(1e-4, description="Peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    eps: PositiveFloat = Field(1e-8, description="Adam epsilon.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class SchedulerSpec(Section):
    name: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="LR decay after warmup: constant, linear or cosine."
    )
    warmup_steps: NonNegativeInt = Field(0, description="Steps of linear warmup from 0.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final LR as a share of the peak.")


class TrainSpec(Section):
    max_steps: PositiveInt | None = Field(
        None, description="Stop after this many optimizer steps; takes precedence over epochs."
    )
    epochs: PositiveInt = Field(1, description="Passes over the training data.")
    global_batch_size: PositiveInt | None = Field(
        None,
        description="Samples per optimizer step over all workers; null means "
        "micro_batch_size x num_workers (no gradient accumulation).",
    )
    micro_batch_size: PositiveInt = Field(8, description="Samples per worker per forward pass.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Training precision: fp32, bf16 (mixed) or fp16 (mixed, GPU only)."
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Optimizer.")
    step: str | None = Field(
        None,
        description="A training step of your own, 'package.module:function', called as "
        "step(ctx, batch) for every micro batch (see orchestrator.train.custom_step); "
        "null: the built-in step.",
        pattern=IMPORT_PATH,
    )
    optimizers: dict[str, OptimizerSpec] | None = Field(
        None,
        min_length=1,
        description="With train.step: one optimizer per named sub-module of the model "
        "(sub-module name -> optimizer); null: one train.optimizer over the whole model.",
    )
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="LR schedule.")
    compile: bool = Field(
        False,
        description="torch.compile the model (a GPU setting: the first steps compile for "
        "minutes, later ones run faster).",
    )
    tf32: bool = Field(
        True, description="fp32 matrix products in TF32 on GPUs that have it (Ampere and later)."
    )
    fused_optimizer: bool = Field(
        True, description="AdamW's fused CUDA kernel on GPU workers (one launch per step)."
    )
    channels_last: bool = Field(
        True, description="CNNs on a GPU: images and weights in channels-last memory order."
    )
    mlm_predict: Literal["masked", "all"] = Field(
        "masked",
        description="BERT MLM: the vocabulary projection and loss at the masked positions only "
        "(about 15% of tokens; the same loss) or at every token.",
    )
    grad_clip: PositiveFloat | None = Field(1.0, description="Clip gradient norm; null: no clip.")
    eval_every: PositiveInt | None = Field(
        None, description="Evaluate every N steps; null evaluates at the end only."
    )
    eval_batches: PositiveInt | None = Field(
        None, description="Cap on eval batches per evaluation; null: the whole eval set."
    )
    checkpoint_every: PositiveInt | None = Field(
        None, description="Checkpoint every N steps; null checkpoints at the end only."
    )
    checkpoint_upload: Literal["auto", "background", "inline"] = Field(
        "auto",
        description="Store checkpoints in the background (Ray Train's asynchronous upload: "
        "training goes on while a checkpoint is copied to storage) or before the next step; "
        "auto: in the background on GPU workers, inline on CPU.",
    )
    keep_checkpoints: PositiveInt = Field(3, description="How many recent checkpoints to keep.")
    log_every: PositiveInt = Field(10, description="Report metrics every N steps.")
    seed: int = Field(42, description="Seed for weights, data order and masking.")
    storage_path: str = Field(
        "./orch_runs", description="Where runs and checkpoints are stored (local dir or s3://)."
    )

    @model_validator(mode="after")
    def _optimizers_need_a_step(self) -> TrainSpec:
        if self.optimizers is not None and self.step is None:
            raise SpecFieldError(
                [
                    (
                        ("optimizers",),
                        "optimizers per sub-module need a training step of your own "
                        "(train.step); the built-in step trains one train.optimizer",
                    )
                ]
            )
        return self


def step_problems(train: TrainSpec, deepspeed: DeepSpeedSpec | None) -> list[Problem]:
    """What a custom training step cannot run with (it drives plain DDP and fp32/bf16 only)."""
    if train.step is None:
        return []
    problems: list[Problem] = []
    if deepspeed is not None:
        problems.append(
            (
                ("deepspeed",),
                "a custom training step (train.step) runs with plain DDP only; remove the "
                "deepspeed section, or train.step",
            )
        )
    if train.precision == "fp16":
        problems.append(
            (
                ("train", "precision"),
                "a custom training step (train.step) runs in fp32 or bf16; use one of those",
            )
        )
    return problems
