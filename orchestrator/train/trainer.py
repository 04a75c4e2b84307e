"""One Ray Train run of a workload, as `orch run`, a sweep's trials and a cluster job start it.

`prepare_run` does what every run of a workload shares (data prepared once, facts checked
against the model, the plan checked), `worker_config` makes the typed config each worker gets,
`build_trainer` the TorchTrainer, `export_final` the plain fp32 model at the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.errors import RunError, TrainingFailed
from orchestrator.models import DataInfo, ModelError, config_hash, resolve_custom
from orchestrator.spec import WorkloadSpec
from orchestrator.train.checkpoint import CheckpointMismatch, Manifest, export_model, manifest_in
from orchestrator.train.config import DatasetFacts, WorkerConfig
from orchestrator.train.engines import accumulation_steps
from orchestrator.train.loop import steps_per_epoch, train_loop

if TYPE_CHECKING:
    import ray.train

    from orchestrator.data import PreparedData

__all__ = [
    "PreparedRun",
    "build_trainer",
    "check_inputs",
    "explain",
    "export_checkpoint",
    "export_final",
    "local_dir",
    "named_read_failure",
    "prepare_run",
    "resumable_checkpoint",
    "storage_uri",
    "worker_config",
]


@dataclass(frozen=True)
class PreparedRun:
    """What every run of a workload shares: the data, prepared once, and what it holds."""

    prepared: PreparedData
    dataset: DatasetFacts
    info: DataInfo  # what the model takes from the data: vocabulary, classes, channels


def check_inputs(spec: WorkloadSpec) -> None:
    """Refuse, as RunError, a data source that is not there or a custom model that does not
    import: before Ray starts (seconds), not after."""
    from orchestrator.data import DataError
    from orchestrator.data.sources import find_source

    try:
        if spec.model.kind == "custom":
            resolve_custom(spec.model.build)
        for source in (spec.data.train, spec.data.eval):
            if source is not None:
                find_source(source)
    except DataError as exc:
        raise RunError(f"data: {exc}") from None
    except ModelError as exc:
        raise RunError(str(exc)) from None


def prepare_run(
    spec: WorkloadSpec,
    *,
    address: str | None,
    verbose: bool,
    log: Callable[[str], None],
) -> PreparedRun:
    """Prepare the data (or find it cached) and refuse, as RunError, what no run could train.

    Needs a Ray session, started after `check_inputs`. Checks against this machine's resources
    only when `address` is None: a cluster's fit is judged by `orch submit`, before the job
    exists.
    """
    from orchestrator.data import DataError, prepare
    from orchestrator.plan import PlanError, check_here

    try:
        prepared = prepare(spec.data, log=log, ray_address=address, verbose=verbose)
    except DataError as exc:
        raise RunError(f"data: {exc}") from None
    dataset = DatasetFacts.from_manifest(prepared.manifest)
    run = PreparedRun(prepared, dataset, _data_info(spec, dataset))
    try:
        if address is None:
            check_here(spec, run.info)
    except (PlanError, ModelError) as exc:
        raise RunError(str(exc)) from None
    worker_config(spec, run)  # the workload's batches must fit the data
    return run


def _data_info(spec: WorkloadSpec, dataset: DatasetFacts) -> DataInfo:
    """What the model takes from the data, checked against what the spec says of it."""
    if dataset.kind == "text":
        return DataInfo(vocab_size=dataset.tokenizer.vocab_size if dataset.tokenizer else None)
    image = dataset.image
    assert image is not None, "an image dataset's manifest describes its images"
    num_classes = image.num_classes
    model_classes = getattr(spec.model, "num_classes", None)
    if model_classes is not None and model_classes < num_classes:
        raise RunError(
            f"model.num_classes is {model_classes} but the data has {num_classes} classes "
            f"(labels up to {num_classes - 1}); set model.num_classes: {num_classes}"
        )
    channels = image.shape[2] if image.shape else getattr(spec.model, "in_channels", 3)
    model_channels = getattr(spec.model, "in_channels", channels)
    if model_channels != channels:
        raise RunError(f"model.in_channels is {model_channels} but the images have {channels}")
    return DataInfo(num_classes=model_classes or num_classes, channels=channels)


def worker_config(
    spec: WorkloadSpec, run: PreparedRun, initial_checkpoint: str | None = None
) -> WorkerConfig:
    """The config each worker gets; RunError if the data cannot serve this workload.

    `initial_checkpoint` (a path or URI) starts a new run from another run's weights.
    """
    dataset = run.dataset
    if spec.model.task == "masked_lm" and not (dataset.tokenizer and dataset.tokenizer.mask_id):
        raise RunError(
            f"data: {spec.model.kind} trains a masked LM, which needs a tokenizer with a [MASK] "
            "token (use data.tokenizer.kind wordpiece)"
        )
    workers = spec.scaling.num_workers
    if steps_per_epoch(dataset.train_rows, spec.train, workers) == 0:
        accum = accumulation_steps(spec.train, workers)
        raise RunError(
            f"data: the training split ({dataset.train_rows} rows) is smaller than one global "
            f"batch ({spec.train.micro_batch_size} x {workers} workers x {accum} accumulation); "
            "use more data or smaller batches"
        )
    return WorkerConfig(
        model=spec.model,
        train=spec.train,
        deepspeed=spec.deepspeed,
        stream=spec.data.stream_settings(),
        dataset=dataset,
        data_info=run.info,
        model_config_hash=config_hash(spec.model, run.info),
        initial_checkpoint=initial_checkpoint,
    )


def build_trainer(
    spec: WorkloadSpec,
    run: PreparedRun,
    config: WorkerConfig,
    *,
    name: str,
    storage: str,
    callbacks: list[Any],
    loop: Callable[[dict[str, Any]], None] = train_loop,
) -> Any:
    """The TorchTrainer of one run: `orch run`'s, or one sweep trial's (`loop` wraps the loop)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestrator.data import open_splits
    from orchestrator.data.stream import ingest_config

    return TorchTrainer(
        loop,
        train_loop_config=config.to_ray(),
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
        datasets=open_splits(
            run.prepared, seed=spec.train.seed, shuffle=spec.data.shuffle_buffer > 0
        ),
        dataset_config=ingest_config(),
    )


def export_final(result: ray.train.Result, config: WorkerConfig) -> str | None:
    """Export the run's last checkpoint as a plain fp32 model next to it; None without one."""
    if result.checkpoint is None:
        return None
    return export_checkpoint(result.checkpoint, result.path, config)


def export_checkpoint(checkpoint: ray.train.Checkpoint, run_path: str, config: WorkerConfig) -> str:
    with checkpoint.as_directory() as directory:
        return export_model(
            directory,
            os.path.join(local_dir(run_path), "model"),
            {
                "model": config.model.model_dump(mode="json"),
                "data": config.data_info.__dict__,
                "kind": config.model.kind,
                "task": config.model.task,
            },
        )


def resumable_checkpoint(
    storage: str, name: str, spec: WorkloadSpec, model_hash: str
) -> tuple[str, int] | None:
    """Refuse on the driver, before any worker starts, a run directory this run cannot resume.

    Returns the newest checkpoint (URI, step), if any. The workers check again against the
    checkpoint Ray actually hands them.
    """
    from orchestrator.train.session import checkpoint_dirs, filesystem_of

    saved_dirs = checkpoint_dirs(f"{storage.rstrip('/')}/{name}")  # those with a manifest
    if not saved_dirs:
        return None
    newest = saved_dirs[-1]
    saved = manifest_in(*filesystem_of(newest))
    zero = spec.deepspeed.zero_stage if spec.deepspeed else None
    me = Manifest(0, 0, 0, spec.scaling.num_workers, zero, spec.train.precision, model_hash, {})
    try:
        saved.check_resumable_by(me, f"checkpoint {newest}")
    except CheckpointMismatch as exc:
        raise RunError(str(exc)) from None
    return newest, saved.step


def storage_uri(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def local_dir(path: str) -> str:
    if "://" in path:  # remote storage: export next to the working directory instead
        return os.path.abspath(os.path.join("orch_exports", path.rstrip("/").split("/")[-1]))
    return path


def explain(exc: Exception, prepared: PreparedData) -> Exception:
    """User mistakes found on a worker become RunError, as does a shard that could not be read
    (named); anything else is a training failure."""
    failures = getattr(exc, "worker_failures", {}) or {}
    if (bad := named_read_failure(exc, prepared)) is not None:
        return bad
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


def named_read_failure(exc: BaseException, prepared: PreparedData) -> RunError | None:
    """A failure to read the shards, as RunError naming the shard; None for other failures."""
    from orchestrator.data.stream import read_failed, unreadable_shard

    failures = getattr(exc, "worker_failures", {}) or {}
    if not any(read_failed(error) for error in [exc, *failures.values()]):
        return None
    bad = unreadable_shard(prepared)
    return RunError(str(bad)) if bad is not None else None


def _last_line(text: str, kind: str) -> str:
    lines = [line for line in text.splitlines() if kind in line]
    return lines[-1].split(f"{kind}: ", 1)[-1] if lines else text
