"""The whole workload file: every section, the checks across sections, and its JSON Schema."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from orchestrator.spec.base import Inputs, Problem, Section, SpecFieldError
from orchestrator.spec.cluster import ClusterSpec
from orchestrator.spec.data import FORMAT_INPUTS, DataSpec
from orchestrator.spec.distributed import DeepSpeedSpec, ScalingSpec
from orchestrator.spec.model import ModelSpec, _TransformerModel
from orchestrator.spec.names import MAX_NAME_LENGTH, NAME_PATTERN, name_problem
from orchestrator.spec.tracking import TrackingSpec
from orchestrator.spec.train import TrainSpec
from orchestrator.spec.tune import TuneSpec, sampled, tune_problems

__all__ = ["WorkloadSpec", "workload_schema"]

# How an error names each kind of input to the person who wrote the workload.
_INPUT_WORDS: dict[Inputs, str] = {"tokens": "text", "images": "images"}


class WorkloadSpec(Section):
    """A whole workload: what to train, on what data, how, where and how it is tracked."""

    name: str = Field(
        description="Workload name: run names, experiment and storage paths derive from it.",
        json_schema_extra={"pattern": NAME_PATTERN, "maxLength": MAX_NAME_LENGTH},
    )
    model: ModelSpec = Field(description="What to train, chosen by kind.")
    data: DataSpec = Field(description="Training and evaluation data.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="The training loop.")
    deepspeed: DeepSpeedSpec | None = Field(
        None, description="DeepSpeed ZeRO settings; null trains with plain DDP."
    )
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Workers and resources.")
    tune: TuneSpec | None = Field(None, description="A hyperparameter sweep; null: a single run.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Run tracking.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Where jobs go.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if problem := name_problem(name):
            raise ValueError(problem)
        return name

    @model_validator(mode="after")
    def _cross_section(self) -> WorkloadSpec:
        problems: list[Problem] = []
        t, s = self.train, self.scaling
        per_step = t.micro_batch_size * s.num_workers
        if t.global_batch_size is not None and t.global_batch_size % per_step:
            problems.append(
                (
                    ("train", "global_batch_size"),
                    f"{t.global_batch_size} is not divisible by micro_batch_size x num_workers "
                    f"= {t.micro_batch_size} x {s.num_workers} = {per_step}; "
                    f"use a multiple of {per_step}",
                )
            )
        if t.precision == "fp16" and not s.use_gpu:
            problems.append(
                (("train", "precision"), "fp16 needs a GPU (scaling.use_gpu); use bf16 or fp32")
            )
        if t.scheduler.warmup_steps and t.max_steps and t.scheduler.warmup_steps > t.max_steps:
            problems.append(
                (
                    ("train", "scheduler", "warmup_steps"),
                    f"{t.scheduler.warmup_steps} exceeds train.max_steps {t.max_steps}",
                )
            )
        problems += self._model_fits_data()
        if self.tune is not None:
            problems += tune_problems(self, self.tune)
        if problems:
            raise SpecFieldError(problems)
        return self

    def _model_fits_data(self) -> list[Problem]:
        """The data's shape against what the model takes, from facts the model section declares."""
        problems: list[Problem] = []
        model, data = self.model, self.data
        if isinstance(model, _TransformerModel) and data.seq_len > model.max_seq_len:
            problems.append(
                (
                    ("data", "seq_len"),
                    f"{data.seq_len} exceeds model.max_seq_len {model.max_seq_len}",
                )
            )
        takes, gives = model.inputs, FORMAT_INPUTS[data.format]
        if takes is not None and gives is not None and takes != gives:
            problems.append(
                (
                    ("data", "format"),
                    f"{model.kind} trains on {_INPUT_WORDS[takes]}, "
                    f"not {data.format} {_INPUT_WORDS[gives]}",
                )
            )
        return problems

    def sampled(self, values: dict[str, Any]) -> WorkloadSpec:
        """This workload with `values` (dotted path -> value) set and no tune section.

        Raises pydantic's ValidationError when a value does not fit; `sample_errors` words it.
        """
        return sampled(self, values)


def workload_schema() -> dict[str, Any]:
    """JSON Schema of a workload file, for editors (`orch schema`)."""
    schema = WorkloadSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "orch workload"
    # `extends` is resolved by the loader before validation, so it is not a spec field.
    schema["properties"] = {
        "extends": {
            "description": "Parent workload file(s), relative to this one; mappings merge deeply.",
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
        },
        **schema["properties"],
    }
    return schema
