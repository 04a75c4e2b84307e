"""Checks made before any training starts: does the model fit, can Ray Data get a CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.models import DataInfo, build_model
from orchestrator.spec import DeepSpeedSpec, ScalingSpec, TrainSpec

__all__ = ["PlanError", "check_data_cpus", "check_memory", "count_parameters", "memory_per_worker"]

GB = 1024**3


class PlanError(Exception):
    """The workload cannot run as specified on the resources at hand."""


def count_parameters(model_spec: Any, data: DataInfo) -> int:
    """Exact parameter count, from a model built on the meta device (no memory allocated)."""
    with torch.device("meta"):
        model = build_model(model_spec, data)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    bytes_per_worker: float

    def describe(self) -> str:
        return (
            f"{self.params / 1e6:.1f}M parameters, ~{self.bytes_per_worker / GB:.2f} GB per worker"
        )


def memory_per_worker(
    params: int, train: TrainSpec, ds: DeepSpeedSpec | None, workers: int
) -> MemoryEstimate:
    """Model states per worker (weights, gradients, AdamW moments), after ZeRO sharding.

    Mixed precision keeps 16-bit weights and gradients plus fp32 master weights; fp32 keeps
    fp32 weights and gradients. Activations come on top; the checks leave a margin for them.
    """
    half = train.precision in ("bf16", "fp16")
    weights = 2 if half else 4
    grads = 2 if half else 4
    optimizer = (4 if half else 0) + (8 if train.optimizer.name == "adamw" else 4)
    stage = ds.zero_stage if ds else 0
    if ds is None and half:  # autocast keeps fp32 weights and grads: no separate master copy
        weights, grads, optimizer = 4, 4, 8 if train.optimizer.name == "adamw" else 4
    shard = 1 / workers
    per_param = (
        weights * (shard if stage >= 3 else 1)
        + grads * (shard if stage >= 2 else 1)
        + optimizer * (shard if stage >= 1 else 1)
    )
    return MemoryEstimate(params, params * per_param)


def check_memory(
    model_spec: Any,
    data: DataInfo,
    train: TrainSpec,
    ds: DeepSpeedSpec | None,
    scaling: ScalingSpec,
    available_bytes: float,
    where: str,
) -> MemoryEstimate:
    """Refuse a model whose states cannot fit, before a worker runs out of memory."""
    estimate = memory_per_worker(count_parameters(model_spec, data), train, ds, scaling.num_workers)
    needed = estimate.bytes_per_worker * (1 if scaling.use_gpu else scaling.num_workers)
    # Half of the memory for model states leaves the rest for activations, data and Ray.
    if needed > 0.5 * available_bytes:
        hint = (
            "use a smaller model, more workers with deepspeed.zero_stage 3, bf16, "
            "or deepspeed.offload_optimizer/offload_param: cpu"
        )
        raise PlanError(
            f"model: {estimate.describe()} ({_zero(ds)}, {train.precision}) needs "
            f"~{needed / GB:.1f} GB for model states, but {where} has "
            f"{available_bytes / GB:.1f} GB; "
            f"{hint}"
        )
    return estimate


def _zero(ds: DeepSpeedSpec | None) -> str:
    return "DDP" if ds is None else f"ZeRO-{ds.zero_stage}"


def check_data_cpus(scaling: ScalingSpec, cluster_cpus: float) -> None:
    """Ray Train reserves its workers' CPUs; Ray Data needs some left or the stream stalls."""
    per_worker = (scaling.resources_per_worker or {}).get("CPU", 1.0)
    reserved = per_worker * scaling.num_workers
    if cluster_cpus - reserved < 0.5:
        fit = max(0.0, (cluster_cpus - 1) / scaling.num_workers)
        raise PlanError(
            f"scaling: {scaling.num_workers} workers x {per_worker:g} CPU reserve {reserved:g} of "
            f"the cluster's {cluster_cpus:g} CPUs, leaving Ray Data none to stream batches (the "
            f"run would hang); set scaling.resources_per_worker.CPU to {fit:.2g} or less, "
            "or use fewer workers"
        )
