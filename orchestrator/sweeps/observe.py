"""The sweep driver's view of its trials: progress lines and the one MLflow writer.

Trial results reach the driver through a Tune callback; the driver logs them to MLflow as one
nested run per trial under the sweep's parent run (tag mlflow.parentRunId). Workers and trials
never talk to MLflow.

Tune pickles its RunConfig, callbacks included, with the sweep and restores them on resume.
So the callback Tune keeps holds only a key; it forwards to the observer registered under that
key in this process, which a resumed sweep registers afresh (with its own tracking choice).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from orchestrator.spec import WorkloadSpec

if TYPE_CHECKING:
    from orchestrator.tracking import Tracker

__all__ = ["Relay", "SweepObserver", "register", "unregister"]

_OBSERVERS: dict[str, SweepObserver] = {}
COLLECT_EVERY_S = 3.0
# Tune's own bookkeeping in every result; the rest is what the training loop reported.
_TUNE_KEYS = {*AUTO_RESULT_KEYS, "done", "trial_id", "should_checkpoint", "checkpoint_path"}


def register(key: str, observer: SweepObserver) -> None:
    _OBSERVERS[key] = observer


def unregister(key: str) -> None:
    _OBSERVERS.pop(key, None)


class Relay(Callback):
    """Runs in the Tune driver (this process); forwards trial events to the live observer."""

    def __init__(self, key: str):
        self.key = key

    def _observer(self) -> SweepObserver | None:
        return _OBSERVERS.get(self.key)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if (o := self._observer()) is not None:
            o.tick()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if (o := self._observer()) is not None:
            o.started(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        if (o := self._observer()) is not None:
            o.result(trial, result)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if (o := self._observer()) is not None:
            o.recovering(trial)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if (o := self._observer()) is not None:
            o.ended(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if (o := self._observer()) is not None:
            o.ended(trial, "FAILED")


class SweepObserver:
    """Prints one line per trial event and, with tracking, writes the trials' MLflow runs."""

    def __init__(
        self,
        spec: WorkloadSpec,
        name: str,
        parent: Tracker | None,  # None: without tracking
        data_hash: str,
        local_dir: Path,
        log: Callable[[str], None],
    ):
        self.spec, self.name, self.parent, self.data_hash = spec, name, parent, data_hash
        self.local_dir, self.log = local_dir, log
        self.janitor: Any = None  # a PlacementGroupJanitor, while the Tuner runs
        self.next_collect = 0.0
        assert spec.tune is not None  # a sweep's workload has a tune section
        self.metric = spec.tune.metric
        self.children: dict[str, Tracker | None] = {}  # trial id -> None: could not start
        self.ended_ids: set[str] = set()
        self.seen: set[str] = set()
        self.last: dict[str, dict[str, Any]] = {}  # trial id -> its last report
        self.notes: list[str] = []

    def tick(self) -> None:
        """Every few seconds, have the janitor free what stopped trials held."""
        now = time.monotonic()
        if self.janitor is not None and now >= self.next_collect:
            self.janitor.collect.remote()
            self.next_collect = now + COLLECT_EVERY_S

    def started(self, trial: Any) -> None:
        again = trial.trial_id in self.seen  # a retry, or PBT restarting it from a checkpoint
        self.seen.add(trial.trial_id)
        verb = "restarted" if again else "started"
        self.log(f"{_who(trial)} {verb}: {_params(trial.config)}")
        if self.parent is None or trial.trial_id in self.children:
            return
        from orchestrator.tracking import TrackingError

        try:
            spec = self.spec.sampled(trial.config)
        except ValueError:  # an invalid sample: the trial fails and says why; keep its run
            spec = self.spec
        tags = {
            "orch.sweep": self.name,
            "orch.trial_id": trial.trial_id,
            "orch.sample": json.dumps(trial.config, default=str),
        }
        if spec.cv is not None and spec.cv.fold is not None:  # one fold of a cross-validation
            tags["orch.cv_fold"] = str(spec.cv.fold)
        run_dir = self.local_dir / f"trial_{trial.trial_id}"
        try:
            self.children[trial.trial_id] = self.parent.child(
                f"{self.name}/{trial.trial_id}", spec, self.data_hash, run_dir, tags
            )
        except TrackingError as exc:  # training goes on; the summary says what is missing
            self.notes.append(str(exc))
            self.children[trial.trial_id] = None

    def result(self, trial: Any, result: dict[str, Any]) -> None:
        event = {k: v for k, v in result.items() if k not in _TUNE_KEYS}
        self.last[trial.trial_id] = event
        value = event.get(self.metric)
        shown = f"{self.metric} {value:.4g}" if _is_number(value) else ""
        note = f" (from {event['restored_from']})" if "restored_from" in event else ""
        self.log(f"{_who(trial)} step {event.get('step', '?')}: {shown}{note}")
        if (child := self.children.get(trial.trial_id)) is not None:
            child.log(event)

    def recovering(self, trial: Any) -> None:
        self.log(f"{_who(trial)} failed; retrying it")

    def ended(self, trial: Any, status: str) -> None:
        last = self.last.get(trial.trial_id, {})
        if status != "FINISHED":
            how = "failed"
        elif last.get("step") is not None and last.get("step") == last.get("total_steps"):
            how = "finished"
        else:
            how = f"stopped early at step {last.get('step', '?')}"
        self.log(f"{_who(trial)} {how}")
        self.ended_ids.add(trial.trial_id)
        if (child := self.children.get(trial.trial_id)) is not None:
            self.notes += child.finish(status, None, None)

    def end_unfinished(self, status: str) -> list[str]:
        """End the runs of the trials that have not ended (the sweep stopped); notes to show."""
        notes = []
        for trial_id, child in self.children.items():
            if child is not None and trial_id not in self.ended_ids:
                notes += child.finish(status, None, None)
        return notes


def _who(trial: Any) -> str:
    """A trial as the user knows it: a cross-validation's are folds (the grid's one dimension)."""
    from orchestrator.sweeps.cv import FOLD_PATH  # cv builds on this module

    fold = trial.config.get(FOLD_PATH)
    if fold is None:
        return f"trial {trial.trial_id}"
    return f"fold {fold} (trial {trial.trial_id})"


def _params(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in config.items())


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
