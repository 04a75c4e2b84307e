"""One sweep trial: a Tune function trainable that trains the sampled workload.

A one-worker trial without DeepSpeed (what most sweeps run) trains right here, in the trial's
own process (`TrialSession`): no Ray Train controller, worker group or split coordinator starts
for it, which on a small machine cost each trial more than its training. The trial asks Tune
for the worker's resources, and persists its checkpoints into `train/step-*` under the trial's
directory, as a Train run does.

Trials with several workers, or with DeepSpeed (which needs the process group Ray Train sets
up), start a TorchTrainer instead. Its workers ask Ray for their own resources, so the trial
itself takes little CPU.

Only reports that carry the sweep's metric reach Tune: Tune refuses results without it, and it
makes one training iteration one evaluation for ASHA's rungs. Under PBT the reports that reach
Tune also carry their checkpoint, which PBT needs to exploit one trial's state in another.
A TorchTrainer's reports reach the trial through Ray's TuneReportCallback (metrics only), or
under PBT through a queue. A trial that Tune hands a checkpoint (PBT's exploit) starts a new run
from it; otherwise it continues its own run (after a retry, or in a resumed sweep).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any

from ray.train import UserCallback
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.spec import WorkloadSpec, sample_errors
from orchestrator.tracking.protocol import ARTIFACTS
from orchestrator.train.checkpoint import checkpoint_uri
from orchestrator.train.trainer import PreparedRun

__all__ = [
    "SampleError",
    "TrialSetup",
    "plan_splits",
    "run_trial",
    "trains_in_trial",
    "trial_dir_name",
    "trial_resources",
]

TRAINER_TRIAL_CPU = 0.25  # a trial that starts a TorchTrainer only waits on it


class SampleError(ValueError):
    """A sampled config is not a valid workload: the trial fails with this message."""


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares: the workload, the data prepared once, where the sweep lives."""

    spec: WorkloadSpec
    run: PreparedRun
    sweep_path: str  # the Tune experiment directory (local path or URI)
    janitor: Any  # a PlacementGroupJanitor (janitor.py) for trials that start a TorchTrainer
    # The splits as `open_splits` plans them for the workload's seed, for trials that train in
    # their own process: planning a Parquet read samples the files in a Ray task, which every
    # trial would otherwise wait for.
    datasets: dict[str, Any] | None = None

    def splits_for(self, spec: WorkloadSpec) -> dict[str, Any]:
        """The trial's splits: the planned ones, unless the trial samples its own data order."""
        if self.datasets is not None and _data_order(spec) == _data_order(self.spec):
            return self.datasets
        return plan_splits(spec, self.run)


def plan_splits(spec: WorkloadSpec, run: PreparedRun) -> dict[str, Any]:
    """The workload's splits, in the data order it asks for (a cv fold's: its own folds)."""
    from orchestrator.data import open_splits
    from orchestrator.train.trainer import workload_fold

    seed, shuffle, _ = _data_order(spec)
    return open_splits(run.prepared, seed=seed, shuffle=shuffle, fold=workload_fold(spec))


def _data_order(spec: WorkloadSpec) -> tuple[int, bool, int | None]:
    """What decides a trial's splits: the seed, shuffling, and its cross-validation fold."""
    fold = spec.cv.fold if spec.cv is not None else None
    return spec.train.seed, spec.data.shuffle_buffer > 0, fold


def trains_in_trial(spec: WorkloadSpec) -> bool:
    """Whether the trials of this sweep train in their own process (see the module's doc)."""
    return spec.scaling.num_workers == 1 and spec.deepspeed is None


def trial_resources(spec: WorkloadSpec) -> dict[str, float]:
    """What Tune reserves for one trial: the worker's resources when it trains in the trial."""
    from orchestrator.plan import worker_resources

    if trains_in_trial(spec):
        return worker_resources(spec.scaling)
    return {"CPU": TRAINER_TRIAL_CPU}


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
    """The Tune trainable: one full, resumable run of the sampled workload."""
    from ray import tune

    from orchestrator.train.trainer import worker_config

    spec = resolve(setup.spec, config)
    sweep = setup.spec.tune
    assert sweep is not None  # a sweep's workload has a tune section
    context = tune.get_context()
    storage = f"{setup.sweep_path}/{_TRIAL_DIR.format(context.get_trial_id())}"
    given = tune.get_checkpoint()
    start = checkpoint_uri(given) if given is not None else None
    # A new run per checkpoint Tune hands over, named by it, so a retry of the same trial
    # continues that run instead of starting over.
    name = "train" if given is None else f"train-{_short_hash(given.path)}"
    extra = {"restored_from": _source_trial(given.path)} if given is not None else {}
    to_tune = _ToTune(sweep.metric, sweep.scheduler.kind == "pbt", extra)
    train_config = worker_config(spec, setup.run, start)
    if trains_in_trial(spec):
        _train_here(spec, setup, train_config, f"{storage}/{name}", to_tune)
    else:
        _train_with_trainer(spec, setup, train_config, storage, name, to_tune)


@dataclass(frozen=True)
class _ToTune:
    """What of the training loop's reports Tune sees (see the module's doc)."""

    metric: str
    pbt: bool
    extra: dict[str, Any]

    def __call__(self, metrics: dict[str, Any], checkpoint_uri: str | None) -> None:
        from ray import tune

        if self.metric not in metrics or (self.pbt and checkpoint_uri is None):
            return
        # A report's files (a custom step's samples) are for `orch run`'s tracker, not Tune.
        metrics = {k: v for k, v in metrics.items() if k != ARTIFACTS} | self.extra
        if checkpoint_uri is not None:
            metrics |= {"checkpoint_path": checkpoint_uri}
        with_checkpoint = self.pbt and checkpoint_uri is not None
        tune.report(
            metrics, checkpoint=tune.Checkpoint(checkpoint_uri) if with_checkpoint else None
        )


def _train_here(
    spec: WorkloadSpec, setup: TrialSetup, config: Any, run_dir: str, to_tune: _ToTune
) -> None:
    """Train in this process; export the final model beside the checkpoints."""
    import ray.train

    from orchestrator.data.stream import ingest_options
    from orchestrator.models import import_ahead
    from orchestrator.train.loop import run_loop
    from orchestrator.train.session import TrialSession, checkpoint_dirs
    from orchestrator.train.trainer import export_checkpoint, named_read_failure

    import_ahead(spec.model.kind, training=True)
    saved = checkpoint_dirs(run_dir)
    if saved and (last := _final_report(saved[-1])) is not None:
        # The run ended while the sweep was being stopped, before Tune heard of its end.
        to_tune(last, saved[-1])
        return
    datasets = setup.splits_for(spec)
    for dataset in datasets.values():
        dataset.context.execution_options = ingest_options()
    session = TrialSession(run_dir, datasets, spec.train.keep_checkpoints, to_tune)
    try:
        run_loop(config, session)
    except Exception as exc:
        if (bad := named_read_failure(exc, setup.run.prepared)) is not None:
            raise bad from None
        raise
    if saved := checkpoint_dirs(run_dir):
        export_checkpoint(ray.train.Checkpoint(saved[-1]), run_dir, config, setup.run.prepared)


def _final_report(checkpoint: str) -> dict[str, Any] | None:
    """The report a checkpoint was persisted with, if it was the run's last."""
    import json

    from orchestrator.train.session import REPORT, filesystem_of

    fs, path = filesystem_of(checkpoint)
    try:
        with fs.open_input_stream(f"{path}/{REPORT}") as f:
            report: dict[str, Any] = json.loads(f.read())
    except FileNotFoundError:
        return None
    step = report.get("step")
    return report if step is not None and step == report.get("total_steps") else None


def _train_with_trainer(
    spec: WorkloadSpec,
    setup: TrialSetup,
    config: Any,
    storage: str,
    name: str,
    to_tune: _ToTune,
) -> None:
    """Start a TorchTrainer for the trial's workers, relay its reports, export its model."""
    import functools

    import ray.train

    from orchestrator.sweeps.janitor import train_loop_in_trial
    from orchestrator.train.trainer import build_trainer, explain, export_final

    metric = to_tune.metric
    if (ended := _ended_run(f"{storage}/{name}")) is not None:
        # The run finished while the sweep was being stopped, before Tune heard of its end.
        to_tune(ended.metrics, ended.checkpoint.path)
        return
    channel = None
    if to_tune.pbt:
        from ray.util.queue import Queue

        channel = Queue(maxsize=1, actor_options={"num_cpus": 0})
        callbacks: list[Any] = [_CheckpointedReports(channel, metric)]
    else:
        callbacks = [_MetricReports(metric)]
    trainer = build_trainer(
        spec,
        setup.run,
        config,
        name=name,
        storage=storage,
        callbacks=callbacks,
        loop=functools.partial(train_loop_in_trial, janitor=setup.janitor),
    )
    try:
        result = trainer.fit() if channel is None else _fit_reporting(trainer, channel, to_tune)
    except ray.train.TrainingFailedError as exc:
        raise explain(exc, setup.run.prepared) from None
    export_final(result, config, setup.run.prepared)


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


def _fit_reporting(trainer: Any, channel: Any, to_tune: _ToTune) -> Any:
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
        to_tune(metrics, checkpoint_uri(checkpoint))
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
