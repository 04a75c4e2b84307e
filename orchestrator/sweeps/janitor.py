"""Frees the workers' placement group of a Train run whose trial Tune stopped.

When Tune stops a trial (ASHA, PBT's exploit, the time budget), the trial's process dies and
with it the TorchTrainer's controller and workers; the placement group that reserved the
workers' CPUs and GPUs stays until the sweep's driver exits. Ray Train's own cleaner asks the
dashboard whether the controller lives, so without a dashboard (orch's local Ray) nothing frees
it, and a few stopped trials hold enough CPUs to starve every later trial's data pipeline.

Each trial's rank-0 worker registers its placement group here; the sweep's driver asks the
janitor to look every few seconds and at the end. A group goes once its worker is gone.
"""

from __future__ import annotations

import contextlib
from typing import Any

import ray

__all__ = ["PlacementGroupJanitor", "train_loop_in_trial"]


@ray.remote(num_cpus=0)
class PlacementGroupJanitor:
    def __init__(self) -> None:
        self.groups: dict[str, tuple[Any, Any]] = {}  # group id -> (group, its rank-0 worker)

    def track(self, group: Any, worker: Any) -> None:
        self.groups[group.id.hex()] = (group, worker)

    def collect(self) -> None:
        """Remove the groups whose worker died."""
        from ray.exceptions import RayActorError
        from ray.util.placement_group import remove_placement_group

        for key, (group, worker) in list(self.groups.items()):
            ready, _ = ray.wait([worker.__ray_ready__.remote()], timeout=1.0)
            if not ready:
                continue  # busy, so alive
            try:
                ray.get(ready[0])
                continue
            except RayActorError:
                pass
            del self.groups[key]
            # It may be gone already: Ray Train removes it when a run ends normally.
            with contextlib.suppress(Exception):
                remove_placement_group(group)


def train_loop_in_trial(config: dict[str, Any], janitor: Any) -> None:
    """orch's training loop, after registering the run's placement group with the janitor
    (bound by the trial with functools.partial: it is no part of the training config)."""
    import ray.train

    from orchestrator.train.loop import train_loop

    if ray.train.get_context().get_world_rank() == 0:
        group = ray.util.get_current_placement_group()
        if group is not None:
            janitor.track.remote(group, ray.get_runtime_context().current_actor)
    train_loop(config)
