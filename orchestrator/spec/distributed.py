"""How training is spread out: the `deepspeed:` and `scaling:` sections, apart from the model."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.spec.base import NonNegativeInt, PositiveInt, Problem, Section, SpecFieldError

__all__ = ["DeepSpeedSpec", "ScalingSpec"]


class DeepSpeedSpec(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage: 0, 1, 2 or 3.")
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none", description="Offload optimizer state to CPU (ZeRO 1-3)."
    )
    offload_param: Literal["none", "cpu"] = Field(
        "none", description="Offload parameters to CPU (ZeRO 3 only)."
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Merged into the generated DeepSpeed config for anything orch does not model.",
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedSpec:
        problems: list[Problem] = []
        if self.offload_optimizer != "none" and self.zero_stage < 1:
            problems.append(
                (("offload_optimizer",), "optimizer offload needs zero_stage 1, 2 or 3, not 0")
            )
        if self.offload_param != "none" and self.zero_stage != 3:
            problems.append(
                (("offload_param",), f"parameter offload needs zero_stage 3, not {self.zero_stage}")
            )
        # Settings orch derives from the spec must come from the spec, or the two disagree.
        owned = {
            "train_batch_size": "train.global_batch_size",
            "train_micro_batch_size_per_gpu": "train.micro_batch_size",
            "gradient_accumulation_steps": "train.global_batch_size",
            "gradient_clipping": "train.grad_clip",
            "fp16": "train.precision",
            "bf16": "train.precision",
        }
        zero_owned = {
            "stage": "zero_stage",
            "offload_optimizer": "offload_optimizer",
            "offload_param": "offload_param",
        }
        for key in self.extra:
            if key in owned:
                problems.append(
                    (("extra", key), f"set by orch from {owned[key]}; set that field instead")
                )
        zero_extra = self.extra.get("zero_optimization", {})
        if not isinstance(zero_extra, dict):
            problems.append((("extra", "zero_optimization"), "must be a mapping"))
            zero_extra = {}
        for key in zero_extra:
            if key in zero_owned:
                problems.append(
                    (
                        ("extra", "zero_optimization", key),
                        f"set by orch from deepspeed.{zero_owned[key]}; set that field instead",
                    )
                )
        if problems:
            raise SpecFieldError(problems)
        return self


class ScalingSpec(Section):
    num_workers: PositiveInt = Field(1, description="Training worker processes.")
    use_gpu: bool = Field(False, description="Give each worker a GPU.")
    resources_per_worker: dict[str, float] | None = Field(
        None, description="Ray resources per worker, e.g. {CPU: 8, GPU: 1}; null: Ray's default."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers are placed on nodes."
    )
    max_failures: NonNegativeInt = Field(
        0, description="Restarts from the last checkpoint after a worker failure."
    )

    @field_validator("resources_per_worker")
    @classmethod
    def _non_negative(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for name, amount in (v or {}).items():
            if amount < 0:
                raise ValueError(f"resource {name} is {amount}; amounts must be >= 0")
        return v

    @model_validator(mode="after")
    def _gpu_consistent(self) -> ScalingSpec:
        gpus = (self.resources_per_worker or {}).get("GPU", 0)
        if gpus > 0 and not self.use_gpu:
            raise SpecFieldError(
                [
                    (
                        ("resources_per_worker", "GPU"),
                        "asks for GPUs but use_gpu is false; set use_gpu: true or drop GPU",
                    )
                ]
            )
        return self
