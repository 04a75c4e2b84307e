"""The workload file as typed, frozen pydantic models.

This module is the single source of truth for what a workload YAML may contain: field
descriptions become the JSON Schema (`orch schema`) and the documentation. It imports
nothing else from the package so that every later stage can depend on it freely.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "BertMLMModel",
    "CNNModel",
    "ClusterSpec",
    "CustomModel",
    "DataSpec",
    "DeepSpeedSpec",
    "Domain",
    "GPTModel",
    "MLflowSpec",
    "ModelSpec",
    "OptimizerSpec",
    "ResNetModel",
    "RuntimeEnvSpec",
    "ScalingSpec",
    "SchedulerSpec",
    "SpecFieldError",
    "TokenizerSpec",
    "TrackingSpec",
    "TrainSpec",
    "TuneSchedulerSpec",
    "TuneSpec",
    "WorkloadSpec",
    "parse_condition",
    "reported_metrics",
    "sample_errors",
    "workload_schema",
]


class SpecFieldError(ValueError):
    """A cross-field problem, carrying the dotted paths (relative to the model raising it)."""

    def __init__(self, problems: list[tuple[tuple[str, ...], str]]):
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(p)}: {m}" for p, m in problems))


class Section(BaseModel):
    """Base of every spec section: unknown keys are errors and a loaded spec never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=False)


PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


# --------------------------------------------------------------------------- model
class _TransformerModel(Section):
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

    kind: Literal["bert_mlm"] = Field(description="Model family.")


class GPTModel(_TransformerModel):
    """GPT-2 style causal language model (transformers' GPT2LMHeadModel)."""

    kind: Literal["gpt_lm"] = Field(description="Model family.")
    max_seq_len: PositiveInt = Field(
        1024, description="Longest sequence the position table covers."
    )


class ResNetModel(Section):
    """A torchvision ResNet classifier."""

    kind: Literal["resnet"] = Field(description="Model family.")
    depth: Literal[18, 34, 50] = Field(50, description="ResNet depth: 18, 34 or 50.")
    num_classes: PositiveInt = Field(1000, description="Number of output classes.")
    in_channels: PositiveInt = Field(3, description="Channels of the input images.")
    image_size: PositiveInt = Field(224, description="Height and width of the input images.")
    pretrained: str | None = Field(None, description="Local path of a saved state dict.")


class CNNModel(Section):
    """A small convnet for 28x28 (MNIST) and 32x32 (CIFAR) images."""

    kind: Literal["cnn"] = Field(description="Model family.")
    num_classes: PositiveInt = Field(10, description="Number of output classes.")
    in_channels: PositiveInt = Field(1, description="Channels of the input images.")
    image_size: Literal[28, 32] = Field(28, description="Height and width: 28 or 32.")
    channels: list[PositiveInt] = Field(
        [32, 64], min_length=1, max_length=4, description="Output channels of each conv block."
    )
    dropout: float = Field(0.25, ge=0, lt=1, description="Dropout before the classifier.")
    pretrained: str | None = Field(None, description="Local path of a saved state dict.")


class CustomModel(Section):
    """A model of your own: an import path to a function that returns an nn.Module."""

    kind: Literal["custom"] = Field(description="Model family.")
    build: str = Field(
        description="Import path 'package.module:function'; called with `args` as keywords.",
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
    )
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for build.")
    task: Literal["classification", "causal_lm", "masked_lm"] = Field(
        "classification", description="What the model's outputs are trained against."
    )


ModelSpec = Annotated[
    BertMLMModel | GPTModel | ResNetModel | CNNModel | CustomModel,
    Field(discriminator="kind"),
]
MODEL_KINDS = ("bert_mlm", "gpt_lm", "resnet", "cnn", "custom")
LM_KINDS = ("bert_mlm", "gpt_lm")


# --------------------------------------------------------------------------- data
class TokenizerSpec(Section):
    kind: Literal["wordpiece", "bpe", "file"] = Field(
        "wordpiece",
        description="wordpiece (BERT) or byte-level bpe (GPT) trained on the corpus, or a file.",
    )
    vocab_size: PositiveInt = Field(30522, ge=64, description="Vocabulary size to train.")
    path: str | None = Field(None, description="An existing tokenizer.json (kind: file).")
    lowercase: bool = Field(True, description="Lowercase text before WordPiece training.")

    @model_validator(mode="after")
    def _path_iff_file(self) -> TokenizerSpec:
        if self.kind == "file" and not self.path:
            raise SpecFieldError([(("path",), "kind 'file' needs a path to a tokenizer.json")])
        if self.kind != "file" and self.path:
            raise SpecFieldError(
                [(("path",), f"a path is only used with kind 'file', not '{self.kind}'")]
            )
        return self


class DataSpec(Section):
    train: str = Field(
        description="Training data: Parquet shards (dir, glob) or a raw source "
        "(.txt/.jsonl corpus, MNIST idx, CIFAR batches, image folder); local path or s3:// gs://."
    )
    eval: str | None = Field(
        None, description="Evaluation data; null splits eval_fraction off the training source."
    )
    format: Literal["auto", "parquet", "text", "jsonl", "mnist", "cifar", "image_folder"] = Field(
        "auto", description="Source format; auto guesses from the path."
    )
    text_column: str = Field("text", description="Column or JSON key holding the text.")
    tokenizer: TokenizerSpec = Field(
        default_factory=TokenizerSpec, description="Tokenizer for text sources."
    )
    seq_len: PositiveInt = Field(128, ge=8, description="Tokens per packed training sequence.")
    eval_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of the source held out for eval when eval is null."
    )
    limit: PositiveInt | None = Field(
        None, description="Use at most this many source records (lines, documents, images)."
    )
    shard_rows: PositiveInt = Field(8192, description="Rows per prepared Parquet shard.")
    cache_dir: str = Field(".orch/data", description="Where prepared datasets are cached.")
    mlm_probability: float = Field(
        0.15, gt=0, lt=1, description="Share of tokens masked for masked-LM training."
    )
    shuffle_buffer: NonNegativeInt = Field(
        2048, description="Rows in each worker's local shuffle buffer; 0 turns shuffling off."
    )
    augment: bool = Field(False, description="Random crop and flip for image training data.")


# --------------------------------------------------------------------------- train
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


# --------------------------------------------------------------------------- deepspeed
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
        problems: list[tuple[tuple[str, ...], str]] = []
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


# --------------------------------------------------------------------------- scaling
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


# --------------------------------------------------------------------------- tune
class Domain(Section):
    """One search dimension: exactly one of the keys below."""

    loguniform: tuple[float, float] | None = Field(None, description="[low, high], log scale.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high].")
    randint: tuple[int, int] | None = Field(None, description="[low, high) integers.")
    choice: list[Any] | None = Field(None, min_length=1, description="Sample one of these.")
    grid: list[Any] | None = Field(None, min_length=1, description="Try every one of these.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Domain:
        set_keys = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(set_keys) != 1:
            allowed = ", ".join(type(self).model_fields)
            got = ", ".join(set_keys) or "none"
            raise ValueError(f"give exactly one of {allowed}; got {got}")
        bounds = self.loguniform or self.uniform or self.randint
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"low {bounds[0]} must be below high {bounds[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)


class TuneSchedulerSpec(Section):
    kind: Literal["fifo", "asha", "pbt"] = Field("fifo", description="Trial scheduler.")
    grace_period: PositiveInt = Field(
        1, description="ASHA: reports of the metric (evaluations) before a trial can be stopped."
    )
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: halving rate.")
    perturbation_interval: PositiveInt = Field(
        2, description="PBT: checkpoints (each with the metric) between exploit/explore."
    )


class TuneSpec(Section):
    metric: str = Field("eval_loss", description="Metric to optimize.")
    mode: Literal["min", "max"] = Field("min", description="Minimize or maximize the metric.")
    num_samples: PositiveInt = Field(8, description="Trials to sample (per grid point for grid).")
    max_concurrent_trials: PositiveInt | None = Field(
        None, description="Trials running at once; null: as many as resources allow."
    )
    time_budget_s: PositiveFloat | None = Field(None, description="Stop the sweep after this.")
    search: Literal["random", "grid", "optuna"] = Field("random", description="Search algorithm.")
    scheduler: TuneSchedulerSpec = Field(
        default_factory=TuneSchedulerSpec, description="Trial scheduler."
    )
    space: dict[str, Domain] = Field(min_length=1, description="Dotted spec path -> search domain.")
    max_retries: NonNegativeInt = Field(1, description="Retries of a failing trial.")

    @model_validator(mode="after")
    def _search_fits_space(self) -> TuneSpec:
        kinds = {path: d.kind for path, d in self.space.items()}
        problems: list[tuple[tuple[str, ...], str]] = []
        if self.search == "optuna":
            problems += [
                (("space", p), "grid is not supported by optuna; use choice")
                for p, k in kinds.items()
                if k == "grid"
            ]
        if self.search == "optuna":
            # Optuna's categorical distributions hold scalars only.
            problems += [
                (("space", p), "optuna choices must be numbers, strings, booleans or null")
                for p, d in self.space.items()
                if d.choice and not all(_is_scalar(v) for v in d.choice)
            ]
            if self.scheduler.kind == "pbt":
                problems.append(
                    (("search",), "pbt picks the configs itself; use search random or grid")
                )
        if self.search == "grid":
            problems += [
                (("space", p), f"search 'grid' needs grid domains, got {k}")
                for p, k in kinds.items()
                if k != "grid"
            ]
        if problems:
            raise SpecFieldError(problems)
        return self


# --------------------------------------------------------------------------- tracking
_CONDITION = re.compile(
    r"^\s*([A-Za-z_][\w/.]*)\s*(<=|>=|==|!=|<|>)\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*$"
)


def parse_condition(text: str) -> list[tuple[str, str, float]]:
    """Parse `metric op number [and ...]` without eval; raise ValueError on anything else."""
    clauses = []
    for part in re.split(r"\s+and\s+", text.strip()):
        m = _CONDITION.match(part)
        if not m:
            raise ValueError(
                f"cannot parse {part!r}; write 'metric OP number' joined by 'and', "
                "OP one of < <= > >= == !="
            )
        clauses.append((m.group(1), m.group(2), float(m.group(3))))
    return clauses


class MLflowSpec(Section):
    enabled: bool = Field(True, description="Record runs in MLflow.")
    tracking_uri: str | None = Field(
        None, description="MLflow server URI; null: a local store in the working directory."
    )
    experiment: str | None = Field(None, description="Experiment name; null: the workload name.")
    register_as: str | None = Field(None, description="Register the final model under this name.")
    promote_if: str | None = Field(
        None, description="Register only if this holds, e.g. 'eval_loss < 3.0 and eval_acc > 0.5'."
    )

    @field_validator("promote_if")
    @classmethod
    def _condition_parses(cls, v: str | None) -> str | None:
        if v is not None:
            parse_condition(v)
        return v

    @model_validator(mode="after")
    def _promote_needs_register(self) -> MLflowSpec:
        if self.promote_if and not self.register_as:
            raise SpecFieldError([(("promote_if",), "only applies with register_as set")])
        return self


class TrackingSpec(Section):
    mlflow: MLflowSpec = Field(default_factory=MLflowSpec, description="MLflow settings.")


# --------------------------------------------------------------------------- cluster
class RuntimeEnvSpec(Section):
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="Environment variables for the job."
    )
    pip: list[str] = Field(default_factory=list, description="Extra pip requirements for the job.")
    excludes: list[str] = Field(
        default_factory=list, description="More gitignore-style patterns kept out of the upload."
    )


class ClusterSpec(Section):
    address: str | None = Field(
        None, description="Ray dashboard address, e.g. http://head:8265 (used by orch submit)."
    )
    runtime_env: RuntimeEnvSpec = Field(
        default_factory=RuntimeEnvSpec, description="What the job gets on the cluster."
    )


# --------------------------------------------------------------------------- workload
class WorkloadSpec(Section):
    """A whole workload: what to train, on what data, how, where and how it is tracked."""

    name: str = Field(
        description="Workload name: run names, experiment and storage paths derive from it.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        max_length=100,
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

    @model_validator(mode="after")
    def _cross_section(self) -> WorkloadSpec:
        problems: list[tuple[tuple[str, ...], str]] = []
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
        kind = self.model.kind
        if kind in LM_KINDS:
            if self.data.seq_len > self.model.max_seq_len:  # type: ignore[union-attr]
                problems.append(
                    (
                        ("data", "seq_len"),
                        f"{self.data.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}",  # type: ignore[union-attr]
                    )
                )
            if self.data.format in ("mnist", "cifar", "image_folder"):
                problems.append(
                    (("data", "format"), f"{kind} trains on text, not {self.data.format} images")
                )
        if kind in ("resnet", "cnn") and self.data.format in ("text", "jsonl"):
            problems.append(
                (("data", "format"), f"{kind} trains on images, not {self.data.format} text")
            )
        if self.tune is not None:
            problems += self._tune_problems(self.tune)
        if problems:
            raise SpecFieldError(problems)
        return self

    def _tune_problems(self, tune: TuneSpec) -> list[tuple[tuple[str, ...], str]]:
        problems = []
        dumped = self.model_dump(mode="json")
        for path in tune.space:
            where = ("tune", "space", path)
            if not _has_path(dumped, path.split(".")):
                problems.append((where, _no_such_path(path, dumped)))
            elif (why := _unsearchable(path, tune.scheduler.kind)) is not None:
                problems.append((where, why))
        if tune.scheduler.kind == "pbt" and self.train.checkpoint_every is None:
            problems.append(
                (
                    ("tune", "scheduler", "kind"),
                    "pbt restores from checkpoints: set train.checkpoint_every",
                )
            )
        elif tune.scheduler.kind == "pbt" and tune.metric.startswith("eval_"):
            every, saved = self.train.eval_every, self.train.checkpoint_every or 0
            if not every or saved % every:
                problems.append(
                    (
                        ("train", "eval_every"),
                        f"pbt compares trials at their checkpoints, which must carry "
                        f"{tune.metric}: set eval_every to a divisor of train.checkpoint_every "
                        f"({saved})",
                    )
                )
        reported = reported_metrics(self.model)
        if tune.metric not in reported:
            problems.append(
                (
                    ("tune", "metric"),
                    f"{tune.metric!r} is not a metric this model reports; one of: "
                    + ", ".join(reported),
                )
            )
        if not problems:  # values are only worth checking on paths that can be searched
            del dumped["tune"]
            problems += _value_problems(dumped, tune.space)
        return problems

    def sampled(self, values: dict[str, Any]) -> WorkloadSpec:
        """This workload with `values` (dotted path -> value) set and no tune section.

        Raises pydantic's ValidationError when a value does not fit; `sample_errors` words it.
        """
        dumped = self.model_dump(mode="json", exclude={"tune"})
        return WorkloadSpec.model_validate(_with_values(dumped, values))


def reported_metrics(model: Any) -> tuple[str, ...]:
    """The metrics the training loop reports for a model (what a sweep can optimize)."""
    task = {"bert_mlm": "masked_lm", "gpt_lm": "causal_lm"}.get(
        model.kind, getattr(model, "task", "classification")
    )
    train = ("loss", "samples_per_s", "step_time_s", "data_wait_share")
    if task == "classification":
        return (*train, "eval_loss", "eval_accuracy", "eval_precision", "eval_recall", "eval_f1")
    return (*train, "tokens_per_s", "eval_loss", "eval_accuracy", "eval_perplexity")


# Data fields read when the data is streamed, not when it is prepared: a sweep prepares the
# data once and shares it, so only these can differ between trials.
STREAM_DATA_FIELDS = ("mlm_probability", "shuffle_buffer", "augment")


def _unsearchable(path: str, scheduler: str) -> str | None:
    """Why a field that exists cannot be a search dimension, or None when it can."""
    top, _, rest = path.partition(".")
    if top in ("name", "tune", "tracking", "cluster") or path == "train.storage_path":
        return "this field cannot be searched: it names, tracks or places the sweep"
    if top == "data" and rest.split(".")[0] not in STREAM_DATA_FIELDS:
        allowed = ", ".join(f"data.{f}" for f in STREAM_DATA_FIELDS)
        return (
            "the data is prepared once and shared by every trial, so this field cannot be "
            f"searched; of data, only {allowed} can"
        )
    if scheduler == "pbt" and top != "train" and path not in ("model.dropout",):
        return (
            "pbt copies weights between trials, so it can only search fields that keep the "
            "model and its layout: train.*, model.dropout, "
            + ", ".join(f"data.{f}" for f in STREAM_DATA_FIELDS)
        )
    return None


def _no_such_path(path: str, dumped: dict[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(path, sorted(_leaf_paths(dumped)), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"no such field in the workload to search over{hint}"


def _leaf_paths(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict) and value:
        return [p for k, v in value.items() for p in _leaf_paths(v, f"{prefix}{k}.")]
    return [prefix[:-1]]


def _value_problems(
    dumped: dict[str, Any], space: dict[str, Domain]
) -> list[tuple[tuple[str, ...], str]]:
    """Values of the space that no trial could run with, found before any trial starts.

    Each candidate (every choice and grid value, the ends of each range) is tried with the
    other dimensions' candidates too: a value is refused only when it fails in every tried
    combination, since a field can be valid only together with another searched field.
    """
    import itertools

    candidates = {path: _candidates(domain) for path, domain in space.items()}
    problems = []
    for path, values in candidates.items():
        others = [(p, [v for v, _ in c]) for p, c in candidates.items() if p != path]
        combos = list(itertools.islice(itertools.product(*(v for _, v in others)), 16))
        for value, label in values:
            errors: list[str] = []
            for combo in combos:
                sample = {path: value} | {p: v for (p, _), v in zip(others, combo, strict=True)}
                try:
                    WorkloadSpec.model_validate(_with_values(dumped, sample))
                except ValueError as exc:  # pydantic's ValidationError is a ValueError
                    errors = errors or sample_errors(exc)
                else:
                    errors = []
                    break
            if errors:
                problems.append((("tune", "space", path), f"{label}: {errors[0]}"))
                break  # one bad value per dimension says enough
    return problems


def _candidates(domain: Domain) -> list[tuple[Any, str]]:
    """Values to check for a domain, with how to name each in an error."""
    import math

    if domain.choice is not None or domain.grid is not None:
        return [(v, f"value {v!r} is invalid") for v in (domain.choice or domain.grid or [])]
    if domain.randint is not None:
        low, high = domain.randint
        return [
            (low, f"low bound {low} is invalid"),
            (high - 1, f"{high - 1} (high - 1) is invalid"),
        ]
    low, high = domain.loguniform or domain.uniform or (0.0, 0.0)
    # Sampling never returns `high` itself, but values just below it.
    return [
        (low, f"low bound {low!r} is invalid"),
        (math.nextafter(high, low), f"values near the high bound {high!r} are invalid"),
    ]


def _with_values(dumped: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    import copy

    out = copy.deepcopy(dumped)
    for path, value in values.items():
        *parents, last = path.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[last] = value
    return out


def sample_errors(exc: ValueError) -> list[str]:
    """A failed validation of a sampled workload as 'field: what is wrong' lines."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return [str(exc)]
    out = []
    for err in errors(include_url=False):
        # Discriminator tags (the model kind) appear in locations; they are not fields.
        loc = [str(p) for p in err["loc"] if p not in MODEL_KINDS]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, SpecFieldError):
            out += [".".join([*loc, *rel]) + f": {msg}" for rel, msg in cause.problems]
            continue
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] != "value_error" and _is_scalar(err.get("input")):
            message += f" (got {err['input']!r})"
        out.append(f"{'.'.join(loc)}: {message}" if loc else message)
    return out


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _has_path(dumped: Any, parts: list[str]) -> bool:
    """Whether a dotted path names a set field of the spec (for tune.space keys)."""
    for part in parts:
        if isinstance(dumped, dict) and part in dumped:
            dumped = dumped[part]
        else:
            return False
    return True


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
