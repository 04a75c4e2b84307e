"""The workload file as typed, frozen pydantic models.

This package is the single source of truth for what a workload YAML may contain: field
descriptions become the JSON Schema (`orch schema`) and the documentation. It imports
nothing else from the package so that every later stage can depend on it freely.
"""

from orchestrator.spec.base import (
    Inputs,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Problem,
    Section,
    SpecFieldError,
)
from orchestrator.spec.cluster import ClusterSpec, RuntimeEnvSpec
from orchestrator.spec.cv import CVSpec, fold_workloads
from orchestrator.spec.data import (
    FORMAT_INPUTS,
    DataFormat,
    DataSpec,
    StreamSettings,
    TokenizerSpec,
)
from orchestrator.spec.distributed import DeepSpeedSpec, ScalingSpec
from orchestrator.spec.export import (
    DEFAULT_TOLERANCE,
    EXPORT_FORMATS,
    ExportFormat,
    ExportSpec,
    unexportable,
)
from orchestrator.spec.model import (
    BINARY_METRICS,
    MODEL_SECTIONS,
    TASK_METRICS,
    BertClassifierModel,
    BertMLMModel,
    CNNModel,
    CustomModel,
    GPTModel,
    MLPModel,
    ModelSpec,
    ResNetModel,
    Task,
    reported_metrics,
    section_kind,
)
from orchestrator.spec.names import (
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    NAME_RULE,
    derived_name,
    name_problem,
)
from orchestrator.spec.tracking import MLflowSpec, TrackingSpec, parse_condition
from orchestrator.spec.train import OptimizerSpec, SchedulerSpec, TrainSpec
from orchestrator.spec.tune import (
    STREAM_DATA_FIELDS,
    Domain,
    TuneSchedulerSpec,
    TuneSpec,
    sample_errors,
    sampled,
    tune_problems,
)
from orchestrator.spec.workload import WorkloadSpec, workload_schema

__all__ = [
    "BINARY_METRICS",
    "DEFAULT_TOLERANCE",
    "EXPORT_FORMATS",
    "FORMAT_INPUTS",
    "MAX_NAME_LENGTH",
    "MODEL_SECTIONS",
    "NAME_PATTERN",
    "NAME_RULE",
    "STREAM_DATA_FIELDS",
    "TASK_METRICS",
    "BertClassifierModel",
    "BertMLMModel",
    "CNNModel",
    "CVSpec",
    "ClusterSpec",
    "CustomModel",
    "DataFormat",
    "DataSpec",
    "DeepSpeedSpec",
    "Domain",
    "ExportFormat",
    "ExportSpec",
    "GPTModel",
    "Inputs",
    "MLPModel",
    "MLflowSpec",
    "ModelSpec",
    "NonNegativeInt",
    "OptimizerSpec",
    "PositiveFloat",
    "PositiveInt",
    "Problem",
    "ResNetModel",
    "RuntimeEnvSpec",
    "ScalingSpec",
    "SchedulerSpec",
    "Section",
    "SpecFieldError",
    "StreamSettings",
    "Task",
    "TokenizerSpec",
    "TrackingSpec",
    "TrainSpec",
    "TuneSchedulerSpec",
    "TuneSpec",
    "WorkloadSpec",
    "derived_name",
    "fold_workloads",
    "name_problem",
    "parse_condition",
    "reported_metrics",
    "sample_errors",
    "sampled",
    "section_kind",
    "tune_problems",
    "unexportable",
    "workload_schema",
]
