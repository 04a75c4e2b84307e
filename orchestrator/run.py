"""`orch run`: prepare data, check the plan, train with Ray Train, export the final model.

The same function runs on a laptop (a local Ray) and, later, as the entrypoint of a Ray job.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from orchestrator.train.checkpoint import CheckpointMismatch, export_model, manifest_in
from orchestrator.data import PreparedData, open_splits, prepare
from orchestrator.data.stream import ingest_config
from orchestrator.errors import RunError, TrainingFailed
from orchestrator.train.engines import accumulation_steps
from orchestrator.models import (
    DataInfo,
    ModelError,
    config_hash,
    import_model_library,
    resolve_custom,
)
from orchestrator.plan import PlanError, check_data_cpus, check_memory
from orchestrator.ray_session import ray_session
from orchestrator.spec import WorkloadSpec
from orchestrator.train.loop import steps_per_epoch, total_steps, train_loop

__all__ = [
    "RunError",
    "RunResult",
    "TrainingFailed",
    "build_trainer",
    "check_plan",
    "explain",
    "export_final",
    "local_dir",
    "loop_config",
    "run_workload",
    "storage_uri",
]


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
    log: Callable[[str], None] = lambda _: None,
    on_progress: Callable[[dict[str, Any]], None] = lambda _: None,
) -> RunResult:
    """Run one workload to the end (resuming its earlier checkpoints) and export the model.

    `tracking=False` (--no-tracking) skips MLflow even when the workload enables it.
    """
    from orchestrator.data import DataError

    started = time.monotonic()
    name = name or spec.name
    if spec.model.kind == "custom":
        try:
            resolve_custom(spec.model.build)
        except ModelError as exc:
            raise RunError(str(exc)) from None
    # The plan check builds the model (on the meta device); importing its library overlaps
    # with starting Ray instead of following it.
    threading.Thread(target=import_model_library, args=(spec.model.kind,), daemon=True).start()
    with ray_session(address, verbose):
        try:
            prepared = prepare(spec.data, log=log, ray_address=address, verbose=verbose)
        except DataError as exc:
            raise RunError(f"data: {exc}") from None
        info = data_info(spec, prepared)
        try:
            check_plan(spec, info, on_this_machine=address is None)
        except (PlanError, ModelError) as exc:
            raise RunError(str(exc)) from None
        tracker = None
        if tracking and spec.tracking.mlflow.enabled:
            from orchestrator.tracking import Tracker, TrackingError, redact

            data_hash = (
                prepared.manifest.get("cache_key") or prepared.manifest["source_fingerprint"]
            )
            run_dir = Path(local_dir(f"{storage_uri(spec.train.storage_path)}/{name}"))
            try:
                tracker = Tracker.start(spec, name, data_hash, run_dir)
            except TrackingError as exc:
                raise RunError(str(exc)) from None
            log(f"tracking: MLflow run {tracker.run_id} at {redact(tracker.uri)}")
        return _fit(spec, prepared, info, name, log, on_progress, started, tracker)


def data_info(spec: WorkloadSpec, prepared: PreparedData) -> DataInfo:
    m = prepared.manifest
    if m["kind"] == "text":
        tokenizer = m.get("tokenizer") or {}
        return DataInfo(vocab_size=tokenizer.get("vocab_size"))
    image = m["image"]
    num_classes = image["num_classes"]
    model_classes = getattr(spec.model, "num_classes", None)
    if model_classes is not None and model_classes < num_classes:
        raise RunError(
            f"model.num_classes is {model_classes} but the data has {num_classes} classes "
            f"(labels up to {num_classes - 1}); set model.num_classes: {num_classes}"
        )
    channels = image["shape"][2] if image["shape"] else getattr(spec.model, "in_channels", 3)
    model_channels = getattr(spec.model, "in_channels", channels)
    if model_channels != channels:
        raise RunError(f"model.in_channels is {model_channels} but the images have {channels}")
    return DataInfo(num_classes=model_classes or num_classes, channels=channels)


def check_plan(spec: WorkloadSpec, info: DataInfo, on_this_machine: bool) -> None:
    """Checks against the Ray on this machine; a cluster's fit (autoscaling nodes, GPU memory)
    cannot be judged from its current resources, so no check refuses it here."""
    import ray

    if not on_this_machine:
        return
    # Ray Data needs CPUs beside the ones Train reserves, or the stream stalls.
    check_data_cpus(spec.scaling, ray.cluster_resources().get("CPU", 0))
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


def _fit(
    spec: WorkloadSpec,
    prepared: PreparedData,
    info: DataInfo,
    name: str,
    log: Callable[[str], None],
    on_progress: Callable[[dict[str, Any]], None],
    started: float,
    tracker: Any,
) -> RunResult:
    import ray.train
    from ray.util.queue import Queue

    from orchestrator.train.progress import ProgressCallback, ProgressPrinter

    storage = storage_uri(spec.train.storage_path)
    config = loop_config(spec, prepared, info)
    latest = _check_existing_checkpoints(storage, name, spec, config["model_config_hash"])
    total = total_steps(config["data"]["train_rows"], spec.train, spec.scaling.num_workers)
    if latest is not None and latest[1] >= total:
        # Starting Ray Train only to have it find nothing to do takes half a minute.
        return _already_finished(spec, config, name, storage, latest, log, started, tracker)
    channel = Queue(actor_options={"num_cpus": 0})
    trainer = build_trainer(
        spec, prepared, config, name=name, storage=storage, callbacks=[ProgressCallback(channel)]
    )
    log(f"training {name}: {spec.scaling.num_workers} worker(s), run directory {storage}/{name}")

    def show(event: dict[str, Any]) -> None:
        on_progress(event)
        if tracker is not None:
            tracker.log_event(event)

    with ProgressPrinter(channel, show) as printer:
        try:
            result = trainer.fit()
        except (ray.train.TrainingFailedError, KeyboardInterrupt) as exc:
            error = explain(exc) if isinstance(exc, ray.train.TrainingFailedError) else exc
            failed = True
        else:
            failed = False
    if failed:
        if tracker is not None:
            for note in tracker.finish(
                "FAILED" if not isinstance(error, KeyboardInterrupt) else "KILLED", None, None
            ):
                log(note)
        raise error
    history = printer.events
    model_dir = export_final(result, config, spec)
    checkpoint = result.checkpoint.path if result.checkpoint else None
    notes = tracker.finish("FINISHED", model_dir, checkpoint) if tracker is not None else []
    return RunResult(
        name=name,
        path=result.path,
        metrics=history[-1] if history else (result.metrics or {}),
        checkpoint=checkpoint,
        model_dir=model_dir,
        seconds=time.monotonic() - started,
        history=history,
        mlflow_run_id=tracker.run_id if tracker is not None else None,
        notes=notes,
    )


def loop_config(
    spec: WorkloadSpec, prepared: PreparedData, info: DataInfo, initial_checkpoint: Any = None
) -> dict[str, Any]:
    """The plain config each worker gets (re-validated there); RunError if the data cannot serve.

    `initial_checkpoint` (a ray.train.Checkpoint) starts a new run from another run's weights;
    the run's own checkpoints still come first when it restarts.
    """
    data = {
        "kind": prepared.kind,
        "train_rows": prepared.manifest["splits"]["train"]["rows"],
        "seq_len": prepared.manifest.get("seq_len"),
        "tokenizer": prepared.manifest.get("tokenizer"),
        "image": prepared.manifest.get("image"),
        "mlm_probability": spec.data.mlm_probability,
        "shuffle_buffer": spec.data.shuffle_buffer,
        "augment": spec.data.augment,
    }
    if spec.model.kind == "bert_mlm" and not (data["tokenizer"] or {}).get("mask_id"):
        raise RunError("data: bert_mlm needs a tokenizer with a [MASK] token (use kind wordpiece)")
    workers = spec.scaling.num_workers
    accum = accumulation_steps(spec.train, workers)
    if steps_per_epoch(data["train_rows"], spec.train, workers) == 0:
        raise RunError(
            f"data: the training split ({data['train_rows']} rows) is smaller than one global "
            f"batch ({spec.train.micro_batch_size} x {workers} workers x {accum} accumulation); "
            "use more data or smaller batches"
        )
    return {
        "model": spec.model.model_dump(mode="json"),
        "train": spec.train.model_dump(mode="json"),
        "deepspeed": spec.deepspeed.model_dump(mode="json") if spec.deepspeed else None,
        "data": data,
        "data_info": info.__dict__,
        "model_config_hash": config_hash(spec.model, info),
        "initial_checkpoint": initial_checkpoint,
    }


def build_trainer(
    spec: WorkloadSpec,
    prepared: PreparedData,
    config: dict[str, Any],
    *,
    name: str,
    storage: str,
    callbacks: list[Any],
    loop: Callable[[dict[str, Any]], None] = train_loop,
) -> Any:
    """The TorchTrainer of one run: `orch run`'s, or one sweep trial's (`loop` wraps the loop)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker=spec.scaling.resources_per_worker,
            placement_strategy=spec.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=spec.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
            callbacks=callbacks,
        ),
        datasets=open_splits(prepared, seed=spec.train.seed, shuffle=spec.data.shuffle_buffer > 0),
        dataset_config=ingest_config(),
    )


def export_final(result: Any, config: dict[str, Any], spec: WorkloadSpec) -> str | None:
    """Export the run's last checkpoint as a plain fp32 model next to it; None without one."""
    if result.checkpoint is None:
        return None
    return _export(result.checkpoint, result.path, config, spec)


def _export(checkpoint: Any, run_path: str, config: dict[str, Any], spec: WorkloadSpec) -> str:
    with checkpoint.as_directory() as directory:
        return export_model(
            directory,
            os.path.join(local_dir(run_path), "model"),
            {"model": config["model"], "data": config["data_info"], "task": spec.model.kind},
        )


def _check_existing_checkpoints(
    storage: str, name: str, spec: WorkloadSpec, model_hash: str
) -> tuple[str, int] | None:
    """Refuse on the driver, before any worker starts, a run directory this run cannot resume.

    Returns the newest checkpoint (path, step), if any. The workers check again against the
    checkpoint Ray actually hands them.
    """
    import pyarrow.fs as pafs

    from orchestrator.train.checkpoint import MANIFEST, Manifest

    fs, root = (
        pafs.FileSystem.from_uri(storage) if "://" in storage else (pafs.LocalFileSystem(), storage)
    )
    run_dir = f"{root.rstrip('/')}/{name}"
    if fs.get_file_info(run_dir).type != pafs.FileType.Directory:
        return None
    steps = sorted(
        info.path
        for info in fs.get_file_info(pafs.FileSelector(run_dir))
        if info.type == pafs.FileType.Directory and info.base_name.startswith("step-")
    )
    for path in reversed(steps):
        manifest_path = f"{path}/{MANIFEST}"
        if fs.get_file_info(manifest_path).type != pafs.FileType.File:
            continue
        saved = manifest_in(fs, path)
        zero = spec.deepspeed.zero_stage if spec.deepspeed else None
        me = Manifest(0, 0, 0, spec.scaling.num_workers, zero, spec.train.precision, model_hash, {})
        try:
            saved.check_resumable_by(me, f"checkpoint {path}")
        except CheckpointMismatch as exc:
            raise RunError(str(exc)) from None
        return (f"{storage.rstrip('/')}/{name}/{path.rsplit('/', 1)[-1]}", saved.step)
    return None


def _already_finished(
    spec: WorkloadSpec,
    config: dict[str, Any],
    name: str,
    storage: str,
    latest: tuple[str, int],
    log: Callable[[str], None],
    started: float,
    tracker: Any,
) -> RunResult:
    """The run's newest checkpoint is its last step: keep it, export it if that is missing."""
    checkpoint, step = latest
    run_path = f"{storage}/{name}"
    model_dir = os.path.join(local_dir(run_path), "model")
    if not os.path.isfile(os.path.join(model_dir, "model.json")):
        model_dir = _export(_checkpoint(checkpoint), run_path, config, spec)
    log(f"{name} already finished; nothing to train (another --name starts a new run)")
    notes = tracker.finish("FINISHED", model_dir, checkpoint) if tracker is not None else []
    return RunResult(
        name=name,
        path=run_path,
        metrics={"step": step},
        checkpoint=checkpoint,
        model_dir=model_dir,
        seconds=time.monotonic() - started,
        notes=notes,
    )


def _checkpoint(uri: str) -> Any:
    import ray.train

    return ray.train.Checkpoint(uri)  # under storage_uri(): absolute or a URI already


def storage_uri(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def local_dir(path: str) -> str:
    if "://" in path:  # remote storage: export next to the working directory instead
        return os.path.abspath(os.path.join("orch_exports", path.rstrip("/").split("/")[-1]))
    return path


def explain(exc: Exception) -> Exception:
    """User mistakes found on a worker become RunError; anything else is a training failure."""
    failures = getattr(exc, "worker_failures", {}) or {}
    for error in failures.values():
        cause = error
        while cause is not None:
            if isinstance(cause, (CheckpointMismatch, ModelError)):
                return RunError(str(cause))
            cause = cause.__cause__
        text = str(error)
        for kind in ("CheckpointMismatch", "ModelError"):
            if kind in text:
                return RunError(_last_line(text, kind))
    return TrainingFailed(str(exc))


def _last_line(text: str, kind: str) -> str:
    lines = [line for line in text.splitlines() if kind in line]
    return lines[-1].split(f"{kind}: ", 1)[-1] if lines else text
