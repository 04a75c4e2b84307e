"""Every "does it fit" decision, made before anything starts: the model's memory, the CPUs
Ray Data needs beside the training workers, a cluster's nodes, and how many sweep trials run at
once. `orch run`, `orch submit` and sweeps all ask here, so the rules cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.spec import DeepSpeedSpec, ModelSpec, ScalingSpec, TrainSpec

if TYPE_CHECKING:
    from orchestrator.models import DataInfo
    from orchestrator.spec import TuneSpec, WorkloadSpec

__all__ = [
    "DATA_CPUS",
    "PlanError",
    "Unschedulable",
    "check_data_cpus",
    "check_fit",
    "check_gpus",
    "check_here",
    "check_memory",
    "count_parameters",
    "memory_per_worker",
    "trials_at_once",
    "worker_resources",
]

GB = 1024**3

# Ray Train reserves its workers' CPUs for them; Ray Data's read tasks ask Ray for 1 CPU each
# (its default), so unless a whole CPU is left beside the workers the stream never starts and
# the run hangs. One threshold for runs, jobs and sweeps.
DATA_CPUS = 1.0


class PlanError(Exception):
    """The workload cannot run as specified on the resources at hand."""


class Unschedulable(PlanError):
    """The workers can never be placed on the cluster; the message says what is missing."""


def check_here(spec: WorkloadSpec, info: DataInfo) -> None:
    """Checks against the Ray on this machine (a cluster's fit is `orch submit`'s: `check_fit`)."""
    import psutil
    import ray

    resources = ray.cluster_resources()
    check_data_cpus(spec.scaling, resources.get("CPU", 0))
    check_gpus(spec.scaling, resources.get("GPU", 0.0))
    if not spec.scaling.use_gpu:
        check_memory(
            spec.model,
            info,
            spec.train,
            spec.deepspeed,
            spec.scaling,
            psutil.virtual_memory().available,
            "this machine",
        )


def check_gpus(scaling: ScalingSpec, gpus: float) -> None:
    """A GPU workload where Ray has too few GPUs would wait for them forever: refuse it."""
    if not scaling.use_gpu:
        return
    need = scaling.num_workers * worker_resources(scaling).get("GPU", 1.0)
    if need > gpus + 1e-9:
        raise Unschedulable(
            f"scaling.use_gpu: the {scaling.num_workers} worker(s) need {_fmt(need)} GPU(s) and "
            f"the Ray here has {_fmt(gpus)}; set scaling.use_gpu: false to train on CPU, or "
            "submit it to a cluster with GPUs (orch submit)"
        )


def count_parameters(model_spec: ModelSpec, data: DataInfo) -> int:
    """Exact parameter count, from a model built on the meta device (no memory allocated)."""
    import torch

    from orchestrator.models import build_model

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
    model_spec: ModelSpec,
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
    """Ray Train reserves its workers' CPUs; Ray Data needs `DATA_CPUS` left or it stalls."""
    per_worker = (scaling.resources_per_worker or {}).get("CPU", 1.0)
    if (why := _data_cpu_problem(scaling.num_workers, per_worker, cluster_cpus)) is not None:
        fit = max(0.0, (cluster_cpus - DATA_CPUS) / scaling.num_workers)
        raise PlanError(
            f"scaling: {why}; set scaling.resources_per_worker.CPU to {fit:.2g} or less, "
            "or use fewer workers"
        )


def _data_cpu_problem(workers: int, per_worker: float, cluster_cpus: float) -> str | None:
    reserved = per_worker * workers
    if cluster_cpus - reserved >= DATA_CPUS:
        return None
    return (
        f"{workers} workers x {per_worker:g} CPU reserve {reserved:g} of the cluster's "
        f"{cluster_cpus:g} CPUs, leaving Ray Data less than {DATA_CPUS:g} CPU to stream "
        "batches (the run would hang)"
    )


def worker_resources(scaling: ScalingSpec) -> dict[str, float]:
    """What Ray Train will ask for per worker, with Ray's defaults (1 CPU; 1 GPU with use_gpu)."""
    import ray.train

    config = ray.train.ScalingConfig(
        num_workers=scaling.num_workers,
        use_gpu=scaling.use_gpu,
        resources_per_worker=scaling.resources_per_worker,
    )
    return {k: float(v) for k, v in config._resources_per_worker_not_none.items() if v > 0}


def check_fit(
    scaling: ScalingSpec, per_worker: Mapping[str, float], nodes: Sequence[Mapping[str, float]]
) -> None:
    """Raise Unschedulable if `scaling.num_workers` bundles of `per_worker` can never be placed
    on `nodes` (each node's total resources: busy resources free up) under the placement
    strategy, or would leave Ray Data no CPU."""
    n = scaling.num_workers
    if not per_worker:  # workers that ask for nothing always fit
        return
    totals = {k: sum(node.get(k, 0.0) for node in nodes) for k in per_worker}
    for name, amount in per_worker.items():
        if amount * n > totals[name] + 1e-9:
            raise Unschedulable(
                f"needs {_fmt(amount * n)} {name} across {n} worker(s) ({_fmt(amount)} each); "
                f"the cluster has {_fmt(totals[name])} {name} on {len(nodes)} node(s)"
            )
    fits = [_workers_on(node, per_worker) for node in nodes]
    strategy = scaling.placement_strategy
    if strategy == "STRICT_PACK" and max(fits, default=0) < n:
        raise Unschedulable(
            f"placement STRICT_PACK needs all {n} workers ({_show(per_worker)} each) on one "
            f"node; the largest node holds {max(fits, default=0)}"
        )
    if strategy == "STRICT_SPREAD" and sum(1 for f in fits if f) < n:
        raise Unschedulable(
            f"placement STRICT_SPREAD needs {n} nodes that can each hold a worker "
            f"({_show(per_worker)}); the cluster has {sum(1 for f in fits if f)}"
        )
    if sum(fits) < n:
        raise Unschedulable(
            f"{n} worker(s) of {_show(per_worker)} do not fit on the nodes: together they hold "
            f"{sum(fits)} (a worker cannot span nodes)"
        )
    cpus = sum(node.get("CPU", 0.0) for node in nodes)
    if (why := _data_cpu_problem(n, per_worker.get("CPU", 0.0), cpus)) is not None:
        raise Unschedulable(f"{why}; lower scaling.resources_per_worker.CPU or add nodes")


def trials_at_once(
    scaling: ScalingSpec,
    tune: TuneSpec,
    have: Mapping[str, float],
    trial_cpu: float,
    on_this_machine: bool,
    folds: bool = False,
) -> int:
    """Sweep trials at once: what the cluster holds, each trial with its workers, and Ray Data
    `DATA_CPUS` beside them all (the trials' read tasks share it).

    `trial_cpu`: what a trial takes beside its workers. A trial that starts a TorchTrainer
    reserves only its own small CPU share and its Train workers ask Ray afterwards, so too many
    trials at once would hold every CPU and leave their workers waiting forever. A one-worker
    trial trains in its own process and reserves the worker's resources itself (0 beside).
    `folds`: the trials are a cross-validation's folds, limited by the cv's own setting (its
    grid is orch's), which the error names.
    """
    per_worker = scaling.resources_per_worker or {}
    workers = scaling.num_workers
    cpus = trial_cpu + workers * per_worker.get("CPU", 1.0)
    gpus = workers * per_worker.get("GPU", 1.0 if scaling.use_gpu else 0.0)
    fit = math.floor((have.get("CPU", 0) - DATA_CPUS) / cpus)
    if gpus:
        fit = min(fit, math.floor(have.get("GPU", 0) / gpus))
    asked = tune.max_concurrent_trials
    if asked is None:
        return max(1, fit)
    if on_this_machine and asked > fit:
        field, unit = "tune.max_concurrent_trials", "trials"
        if folds:
            field, unit = "cv.max_concurrent_folds", "folds"
        raise PlanError(
            f"{field}: {asked} {unit} at once do not fit here: each takes "
            f"{cpus:g} CPU ("
            + (f"{trial_cpu:g} for the trial, " if trial_cpu else "")
            + f"{workers} worker(s) x {per_worker.get('CPU', 1.0):g})"
            + (f" and {gpus:g} GPU" if gpus else "")
            + f", this machine has {have.get('CPU', 0):g} CPU"
            + (f" and {have.get('GPU', 0):g} GPU" if gpus else "")
            + f" with {DATA_CPUS:g} CPU kept for Ray Data; use at most {max(fit, 0)}, "
            "or null to let orch choose"
        )
    return asked


def _workers_on(node: Mapping[str, float], per_worker: Mapping[str, float]) -> int:
    return min(math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in per_worker.items())


def _show(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in resources.items()) + "}"


def _fmt(x: float) -> str:
    return f"{x:g}"
