"""The whole workload file: every section, the checks across sections, and its JSON Schema."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from orchestrator.spec.base import Inputs, Problem, Section, SpecFieldError
from orchestrator.spec.cluster import ClusterSpec
from orchestrator.spec.cv import CVSpec, cv_problems
from orchestrator.spec.data import FORMAT_INPUTS, DataFormat, DataSpec
from orchestrator.spec.distributed import DeepSpeedSpec, ScalingSpec
from orchestrator.spec.export import ExportSpec, export_list_schema, export_problems
from orchestrator.spec.model import ModelSpec, _TransformerModel
from orchestrator.spec.names import MAX_NAME_LENGTH, NAME_PATTERN, name_problem
from orchestrator.spec.tracking import TrackingSpec
from orchestrator.spec.train import TrainSpec, step_problems
from orchestrator.spec.tune import TuneSpec, sampled, tune_problems

__all__ = ["WorkloadSpec", "inputs_mismatch", "workload_schema"]

# How an error names each kind of input to the person who wrote the workload.
_INPUT_WORDS: dict[Inputs, str] = {
    "tokens": "text",
    "images": "images",
    "features": "tabular features",
    "labeled_tokens": "labeled text",
}


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
    cv: CVSpec | None = Field(
        None, description="k-fold cross-validation on the training split; null: a single run."
    )
    export: ExportSpec | None = Field(
        None,
        description="Export the final model (a sweep's: its best trial's) to these formats "
        "(onnx, torchscript) at the end of the run, each checked against eager PyTorch on eval "
        "batches; null: no export.",
        json_schema_extra=export_list_schema,
    )
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
        if t.compile and not s.use_gpu:
            problems.append(
                (
                    ("train", "compile"),
                    "torch.compile is a GPU setting (scaling.use_gpu: true): on CPU its first "
                    "steps compile for minutes and later ones gain little; set it false",
                )
            )
        if t.scheduler.warmup_steps and t.max_steps and t.scheduler.warmup_steps > t.max_steps:
            problems.append(
                (
                    ("train", "scheduler", "warmup_steps"),
                    f"{t.scheduler.warmup_steps} exceeds train.max_steps {t.max_steps}",
                )
            )
        problems += self._model_fits_data()
        problems += step_problems(t, self.deepspeed)
        if self.tune is not None and self.cv is None:  # with cv: refused as a whole, below
            problems += tune_problems(self, self.tune)
        if self.cv is not None:
            problems += cv_problems(self, self.cv)
        problems += export_problems(self.export, self.model.kind, cv=self.cv is not None)
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
        if (mismatch := inputs_mismatch(model, data.format)) is not None:
            problems.append((("data", "format"), mismatch))
        pretrained = getattr(model, "pretrained", None)
        if isinstance(model, _TransformerModel) and pretrained and data.tokenizer.kind != "file":
            # A tokenizer trained anew numbers its tokens its own way: the pretrained embeddings
            # would train on, silently meaning other tokens.
            problems.append(
                (
                    ("data", "tokenizer", "kind"),
                    f"model.pretrained needs the tokenizer its weights were trained with, not a "
                    f"new {data.tokenizer.kind} one: set data.tokenizer: "
                    f"{{kind: file, path: {pretrained}/tokenizer.json}}",
                )
            )
        return problems

    def sampled(self, values: dict[str, Any]) -> WorkloadSpec:
        """This workload with `values` (dotted path -> value) set and no tune section.

        Raises pydantic's ValidationError when a value does not fit; `sample_errors` words it.
        """
        return sampled(self, values)


def inputs_mismatch(model: ModelSpec, data_format: DataFormat) -> str | None:
    """Why `model` cannot train on data of this format; None when it can, or when only the
    prepared data can tell (auto, parquet)."""
    takes, gives = model.inputs, FORMAT_INPUTS[data_format]
    if takes is None or gives is None or takes == gives:
        return None
    fitting = " or ".join(f for f, yields in FORMAT_INPUTS.items() if yields == takes)
    return (
        f"{model.kind} trains on {_INPUT_WORDS[takes]}, not {data_format} {_INPUT_WORDS[gives]}"
        + (f"; use data.format: {fitting}" if fitting else "")
    )


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
