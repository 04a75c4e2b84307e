"""`orch run`: the driver of one training run on a laptop's Ray, or as a cluster job's entrypoint.

It prepares the run (`train.prepare_run`), starts tracking, runs the TorchTrainer with a live
progress line, and exports the final model. What a run is made of lives in `orchestrator.train`.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import ExportError, RunError, TrainingFailed
from orchestrator.exporting import export_at_end
from orchestrator.models import import_ahead
from orchestrator.ray_session import ray_session
from orchestrator.runlock import run_lock
from orchestrator.spec import WorkloadSpec
from orchestrator.stopping import Stopped, keep_sigint, stop_signals
from orchestrator.storage import download_dir, is_remote, join
from orchestrator.train.checkpoint import checkpoint_uri
from orchestrator.train.config import WorkerConfig
from orchestrator.train.loop import total_steps
from orchestrator.train.trainer import (
    PreparedRun,
    build_trainer,
    check_inputs,
    explain,
    export_checkpoint,
    export_final,
    local_dir,
    model_workdir,
    prepare_run,
    publish_model,
    resumable_checkpoint,
    storage_uri,
    worker_config,
)

if TYPE_CHECKING:
    from orchestrator.data import PreparedData
    from orchestrator.tracking import Tracker

__all__ = ["RunError", "RunResult", "TrainingFailed", "run_workload"]


@dataclass
class RunResult:
    name: str
    path: str  # the run's directory: checkpoints, export
    metrics: dict[str, Any]  # the last report
    checkpoint: str | None
    model_dir: str | None
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    mlflow_run_id: str | None = None
    notes: list[str] = field(default_factory=list)  # e.g. tracking outcomes, to show the user


def run_workload(
    spec: WorkloadSpec,
    *,
    address: str | None = None,
    name: str | None = None,
    verbose: bool = False,
    tracking: bool = True,
    export: bool = True,
    log: Callable[[str], None] = lambda _: None,
    on_progress: Callable[[dict[str, Any]], None] = lambda _: None,
) -> RunResult:
    """Run one workload to the end (resuming its earlier checkpoints) and export the model.

    `tracking=False` (--no-tracking) skips MLflow even when the workload enables it.
    `export=False` leaves the final checkpoint unexported (a smoke run's first leg: its second
    leg exports).
    """
    started = time.monotonic()
    name = name or spec.name
    check_inputs(spec)
    # The plan check builds the model (on the meta device); importing its library overlaps
    # with starting Ray instead of following it.
    import_ahead(spec.model.kind, training=False)
    with (
        run_lock(storage_uri(spec.train.storage_path), name),
        ray_session(address, verbose),
        # After Ray starts: its core worker installs a SIGTERM handler of its own, which aborts.
        stop_signals() as received,
    ):
        run = prepare_run(spec, address=address, verbose=verbose, log=log)
        tracker = None
        if tracking and spec.tracking.mlflow.enabled:
            from orchestrator.tracking import TrackingError, start_tracker

            data_hash = (
                run.prepared.manifest.get("cache_key")
                or run.prepared.manifest["source_fingerprint"]
            )
            run_dir = Path(local_dir(f"{storage_uri(spec.train.storage_path)}/{name}"))
            try:
                tracker = start_tracker(spec, name, data_hash, run_dir)
            except TrackingError as exc:
                raise RunError(str(exc)) from None
            log(f"tracking: MLflow run {tracker.run_id} at {tracker.location}")
        try:
            return _fit(spec, run, name, log, on_progress, started, tracker, export)
        except BaseException as error:  # stopped (Ctrl-C, SIGTERM) or failed: the run ends
            if received and isinstance(error, KeyboardInterrupt):
                # Ray Train ends a stopped run as if by Ctrl-C, whichever signal stopped it.
                error = Stopped(received[0])
            if tracker is not None:
                status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
                for note in tracker.finish(status, None, None):
                    log(note)
            raise error from None


def _fit(
    spec: WorkloadSpec,
    run: PreparedRun,
    name: str,
    log: Callable[[str], None],
    on_progress: Callable[[dict[str, Any]], None],
    started: float,
    tracker: Tracker | None,
    export: bool,
) -> RunResult:
    import ray.train
    from ray.util.queue import Queue

    from orchestrator.train.progress import ProgressCallback, ProgressPrinter

    storage = storage_uri(spec.train.storage_path)
    config = worker_config(spec, run)
    latest = resumable_checkpoint(storage, name, spec, config.model_config_hash)
    total = total_steps(config.dataset.train_rows, spec.train, spec.scaling.num_workers)
    if latest is not None and latest[1] >= total:
        # Starting Ray Train only to have it find nothing to do takes half a minute.
        return _already_finished(
            config, name, storage, latest, log, started, tracker, spec, run.prepared
        )
    channel = Queue(actor_options={"num_cpus": 0})
    trainer = build_trainer(
        spec, run, config, name=name, storage=storage, callbacks=[ProgressCallback(channel)]
    )
    log(f"training {name}: {spec.scaling.num_workers} worker(s), run directory {storage}/{name}")

    def show(event: dict[str, Any]) -> None:
        on_progress(event)
        if tracker is not None:
            tracker.log(event)

    try:
        # The printer's thread is joined before the tracker finishes (see run_workload).
        with ProgressPrinter(channel, show) as printer, keep_sigint():
            result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise explain(exc, run.prepared) from None
    except SystemExit:  # Ray Train's own Ctrl-C handler exits once it has aborted the run
        raise Stopped(signal.SIGINT) from None
    history = printer.events
    # Ray names a remote run by its path on the bucket, without the scheme.
    run_path = join(storage, name) if is_remote(storage) else result.path
    checkpoint = checkpoint_uri(result.checkpoint) if result.checkpoint else None
    with model_workdir(run_path) as workdir:
        exported = export_final(result, config, run.prepared, workdir) if export else None
        model_dir = _export_and_publish(spec, exported, run_path, log, tracker)
        notes = tracker.finish("FINISHED", exported, checkpoint) if tracker is not None else []
    return RunResult(
        name=name,
        path=run_path,
        metrics=history[-1] if history else (result.metrics or {}),
        checkpoint=checkpoint,
        model_dir=model_dir,
        seconds=time.monotonic() - started,
        history=history,
        mlflow_run_id=tracker.run_id if tracker is not None else None,
        notes=notes,
    )


def _already_finished(
    config: WorkerConfig,
    name: str,
    storage: str,
    latest: tuple[str, int],
    log: Callable[[str], None],
    started: float,
    tracker: Tracker | None,
    spec: WorkloadSpec,
    data: PreparedData,
) -> RunResult:
    """The run's newest checkpoint is its last step: keep it, export it if that is missing."""
    checkpoint, step = latest
    run_path = join(storage, name)  # under storage_uri(): an absolute path or a URI already
    with model_workdir(run_path) as workdir:
        if is_remote(run_path):
            download_dir(join(run_path, "model"), workdir)
        if not os.path.isfile(os.path.join(workdir, "model.json")):
            import ray.train

            export_checkpoint(ray.train.Checkpoint(checkpoint), run_path, config, data, workdir)
        model_dir = _export_and_publish(spec, workdir, run_path, log, tracker)
        log(f"{name} already finished; nothing to train (another --name starts a new run)")
        notes = tracker.finish("FINISHED", workdir, checkpoint) if tracker is not None else []
    return RunResult(
        name=name,
        path=run_path,
        metrics={"step": step},
        checkpoint=checkpoint,
        model_dir=model_dir,
        seconds=time.monotonic() - started,
        notes=notes,
    )


def _export_and_publish(
    spec: WorkloadSpec,
    model_dir: str | None,
    run_path: str,
    log: Callable[[str], None],
    tracker: Tracker | None,
) -> str | None:
    """The workload's `export:` formats beside the fp32 model, then the model directory where it
    stays: uploaded to `<run_path>/model` for a run on object storage, with every format."""
    if model_dir is None:
        return None
    try:
        export_at_end(spec.export, model_dir, log, tracker)
    except ExportError:
        publish_model(model_dir, run_path)  # the fp32 model is kept, as on local storage
        raise
    return publish_model(model_dir, run_path)
