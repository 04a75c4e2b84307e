"""The `train:` section: steps, batch sizes, precision, optimizer, LR schedule, checkpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from orchestrator.spec.base import NonNegativeInt, PositiveFloat, PositiveInt, Section

__all__ = ["OptimizerSpec", "SchedulerSpec", "TrainSpec"]


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
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="LR schedule.")
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
    keep_checkpoints: PositiveInt = Field(3, description="How many recent checkpoints to keep.")
    log_every: PositiveInt = Field(10, description="Report metrics every N steps.")
    seed: int = Field(42, description="Seed for weights, data order and masking.")
    storage_path: str = Field(
        "./orch_runs", description="Where runs and checkpoints are stored (local dir or s3://)."
    )
