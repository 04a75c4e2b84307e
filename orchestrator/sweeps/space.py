"""A workload's `tune` section as Ray Tune objects: search space, search algorithm, scheduler.

Search dimensions keep their dotted spec paths as Tune config keys (`train.optimizer.lr`), so
a trial's config is exactly the values to set on the workload (`WorkloadSpec.sampled`).
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    PopulationBasedTraining,
    TrialScheduler,
)

from orchestrator.spec import Domain, TuneSpec

__all__ = [
    "ASHA_MAX_T",
    "param_space",
    "pbt_mutations",
    "population",
    "scheduler",
    "search_algorithm",
]

# ASHA stops a trial that reaches max_t; trials here end on their own after their last
# evaluation, so max_t only has to lie beyond every rung a trial can reach.
ASHA_MAX_T = 1_000_000


def domain(d: Domain) -> Any:
    """One dimension as a Tune domain (grid as Tune's grid_search marker)."""
    from ray import tune

    if d.loguniform is not None:
        return tune.loguniform(*d.loguniform)
    if d.uniform is not None:
        return tune.uniform(*d.uniform)
    if d.randint is not None:
        return tune.randint(*d.randint)  # [low, high), like the spec says
    if d.choice is not None:
        return tune.choice(list(d.choice))
    return tune.grid_search(list(d.grid or []))


def param_space(space: dict[str, Domain]) -> dict[str, Any]:
    """The Tuner's param_space: dotted spec path -> Tune domain."""
    return {path: domain(d) for path, d in space.items()}


def population(tune: TuneSpec) -> int:
    """How many trials the sweep runs: num_samples for every point of the grid."""
    return tune.num_samples * math.prod(len(d.grid) for d in tune.space.values() if d.grid)


def pbt_mutations(space: dict[str, Domain]) -> dict[str, Any]:
    """What PBT may perturb: every dimension; discrete values as lists (PBT steps through them)."""
    return {
        path: list(d.choice or d.grid or []) if d.kind in ("choice", "grid") else domain(d)
        for path, d in space.items()
    }


def search_algorithm(tune: TuneSpec, seed: int, concurrency: int) -> Any:
    """Random/grid sampling (seeded, so the same workload samples the same trials) or Optuna,
    starting at most `concurrency` trials at once."""
    if tune.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        # metric and mode come from the TuneConfig, for the searcher and the scheduler alike.
        return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=concurrency)
    from ray.tune.search import BasicVariantGenerator

    # TuneConfig.max_concurrent_trials applies to Searchers only; this one takes its own.
    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrency)


def scheduler(tune: TuneSpec, all_at_once: bool) -> Any:
    """FIFO, ASHA or PBT, comparing trials on the sweep's metric.

    One training iteration is one report that carries the metric (see trial.py), so
    ASHA's grace period counts evaluations and PBT's interval counts checkpoints.
    `all_at_once`: every trial of the sweep can run at the same time.
    """
    s = tune.scheduler
    if s.kind == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=ASHA_MAX_T,
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
        )
    if s.kind == "pbt":
        pbt = _PBTWithoutTurns if all_at_once else PopulationBasedTraining
        return pbt(
            time_attr="training_iteration",
            perturbation_interval=s.perturbation_interval,
            hyperparam_mutations=pbt_mutations(tune.space),
        )
    return FIFOScheduler()


class _PBTWithoutTurns(PopulationBasedTraining):
    """PBT that never pauses a trial so that a paused or pending one gets a turn.

    Tune's PBT time-shares a population larger than the cluster that way. When every trial
    runs at once there is nobody to make room for, and each pause here costs a restart of a
    whole Train run, so only exploits pause trials.
    """

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if decision == TrialScheduler.PAUSE else decision
