"""Can this cluster ever run the workload's workers? Checked before submitting, against the
nodes' total resources, so a job that could never be scheduled is refused instead of PENDING
forever. Busy resources do not count against a job: they free up."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from orchestrator.spec import ScalingSpec

__all__ = ["Unschedulable", "check_fit", "worker_resources"]


class Unschedulable(Exception):
    """The request cannot fit the cluster; the message says what is missing."""


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
    """Raise Unschedulable if `scaling.num_workers` bundles of `per_worker` cannot be placed on
    `nodes` (each node's total resources) under the placement strategy."""
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
    # Ray Data's read tasks take a whole CPU beside the workers, or the stream never starts.
    cpus = sum(node.get("CPU", 0.0) for node in nodes)
    reserved = per_worker.get("CPU", 0.0) * n
    if cpus - reserved < 1:
        raise Unschedulable(
            f"{n} worker(s) x {_fmt(per_worker.get('CPU', 0.0))} CPU reserve {_fmt(reserved)} of "
            f"the cluster's {_fmt(cpus)} CPUs, leaving Ray Data less than 1 CPU to read data "
            "(the job would hang); lower scaling.resources_per_worker.CPU or add nodes"
        )


def _workers_on(node: Mapping[str, float], per_worker: Mapping[str, float]) -> int:
    return min(math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in per_worker.items())


def _show(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in resources.items()) + "}"


def _fmt(x: float) -> str:
    return f"{x:g}"
