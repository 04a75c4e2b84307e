"""One sweep trial: a Tune function trainable that runs a whole Ray Train run of the workload.

The trial takes little CPU itself (its TorchTrainer's workers ask Ray for their own), checks its
sampled config as a workload, and starts a TorchTrainer built by `orchestrator.train`. Only
reports that carry the sweep's metric reach Tune: Tune refuses results without it, and it makes
one training iteration one evaluation for ASHA's rungs.

Under PBT the trial also registers its checkpoints with Tune, which PBT needs to exploit one
trial's state in another. Ray's TuneReportCallback sends metrics only (the checkpoint path as a
metric), so under PBT reports travel through a queue to this function, which reports them to
Tune with their checkpoint. A trial that Tune hands a checkpoint (PBT's exploit) starts a new
Train run from it; otherwise it continues its own Train run (after a retry, or a resumed sweep).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any

from ray.train import UserCallback
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.spec import WorkloadSpec, sample_errors
from orchestrator.train.checkpoint import checkpoint_uri
from orchestrator.train.trainer import PreparedRun

__all__ = ["SampleError", "TrialSetup", "run_trial", "trial_dir_name"]

TRIAL_CPU = 0.25  # the trial's own process only waits on its TorchTrainer


class SampleError(ValueError):
    """A sampled config is not a valid workload: the trial fails with this message."""


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares: the workload, the data prepared once, where the sweep lives."""

    spec: WorkloadSpec
    run: PreparedRun
    sweep_path: str  # the Tune experiment directory (local path or URI)
    janitor: Any  # a PlacementGroupJanitor (janitor.py); None until the Tuner starts


def trial_dir_name(trial: Any) -> str:
    """Tune's directory for a trial; the trial's Train runs live in it too."""
    return _TRIAL_DIR.format(trial.trial_id)


_TRIAL_DIR = "trial_{}"


def resolve(spec: WorkloadSpec, config: dict[str, Any]) -> WorkloadSpec:
    """The workload this trial trains, or SampleError saying which value is wrong and why."""
    try:
        return spec.sampled(config)
    except ValueError as exc:
        values = ", ".join(f"{k}={v!r}" for k, v in config.items())
        raise SampleError(
            f"sampled config ({values}) is not a valid workload: " + "; ".join(sample_errors(exc))
        ) from None


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trainable: one full, resumable Ray Train run of the sampled workload."""
    import functools

    import ray.train
    from ray import tune

    from orchestrator.train.trainer import build_trainer, explain, export_final, worker_config
    from orchestrator.tune.janitor import train_loop_in_trial

    spec = resolve(setup.spec, config)
    sweep = setup.spec.tune
    assert sweep is not None  # a sweep's workload has a tune section
    metric, pbt = sweep.metric, sweep.scheduler.kind == "pbt"
    context = tune.get_context()
    storage = f"{setup.sweep_path}/{_TRIAL_DIR.format(context.get_trial_id())}"
    given = tune.get_checkpoint()
    start = checkpoint_uri(given) if given is not None else None
    # A new Train run per checkpoint Tune hands over, named by it, so a retry of the same
    # trial continues that run instead of starting over.
    name = "train" if given is None else f"train-{_short_hash(given.path)}"
    train_config = worker_config(spec, setup.run, start)
    extra = {"restored_from": _source_trial(given.path)} if given is not None else {}
    if (ended := _ended_run(f"{storage}/{name}")) is not None:
        # The run finished while the sweep was being stopped, before Tune heard of its end.
        _report(ended.metrics | extra, ended.checkpoint, metric, pbt)
        return
    channel = None
    if pbt:
        from ray.util.queue import Queue

        channel = Queue(maxsize=1, actor_options={"num_cpus": 0})
        callbacks: list[Any] = [_CheckpointedReports(channel, metric)]
    else:
        callbacks = [_MetricReports(metric)]
    trainer = build_trainer(
        spec,
        setup.run,
        train_config,
        name=name,
        storage=storage,
        callbacks=callbacks,
        loop=functools.partial(train_loop_in_trial, janitor=setup.janitor),
    )
    try:
        result = (
            trainer.fit() if channel is None else _fit_reporting(trainer, channel, extra, metric)
        )
    except ray.train.TrainingFailedError as exc:
        raise explain(exc) from None
    export_final(result, train_config)


class _MetricReports(TuneReportCallback):
    """Ray's Train-to-Tune reporting, for the reports that carry the sweep's metric."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


class _CheckpointedReports(UserCallback):
    """PBT: forwards each report with the metric and a checkpoint to the trial (the queue
    holds one, so training waits for Tune like it does with TuneReportCallback)."""

    def __init__(self, channel: Any, metric: str):
        self.channel, self.metric = channel, metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        if checkpoint is not None and metrics and self.metric in metrics[0]:
            self.channel.put((dict(metrics[0]), checkpoint))


def _ended_run(path: str) -> Any:
    """The Result of the Train run at `path` if it ran to its last step, else None."""
    import ray.train

    try:
        result = ray.train.Result.from_path(path)
    except RuntimeError:  # no run there yet
        return None
    m = result.metrics or {}
    return result if m.get("step") is not None and m.get("step") == m.get("total_steps") else None


def _report(metrics: dict[str, Any], checkpoint: Any, metric: str, with_checkpoint: bool) -> None:
    """One report to Tune from the trial itself (reports normally come from the callbacks)."""
    from ray import tune

    if metric not in metrics:
        return
    metrics = metrics | {"checkpoint_path": checkpoint.path}
    if with_checkpoint:
        tune.report(metrics, checkpoint=tune.Checkpoint(checkpoint.path, checkpoint.filesystem))
    else:
        tune.report(metrics)


def _fit_reporting(trainer: Any, channel: Any, extra: dict[str, Any], metric: str) -> Any:
    """Run fit() on a thread; report what it sends to Tune with checkpoints, from this one.

    tune.report must run in the trainable's own thread; fit() blocks, hence the helper thread.
    """
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the trial's thread below
            outcome["error"] = exc
        finally:
            channel.put(None)

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    while (item := channel.get()) is not None:
        metrics, checkpoint = item
        _report(metrics | extra, checkpoint, metric, with_checkpoint=True)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _source_trial(checkpoint_path: str) -> str:
    """The trial a Tune checkpoint belongs to: the name of its trial directory."""
    parts = checkpoint_path.rstrip("/").split("/")
    return next((p for p in reversed(parts) if p.startswith("trial_")), checkpoint_path)
