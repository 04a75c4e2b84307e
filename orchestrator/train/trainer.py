"""One Ray Train run of a workload, as `orch run`, a sweep's trials and a cluster job start it.

`prepare_run` does what every run of a workload shares (data prepared once, facts checked
against the model, the plan checked), `worker_config` makes the typed config each worker gets,
`build_trainer` the TorchTrainer, `export_final` the plain fp32 model at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from orchestrator.errors import RunError, TrainingFailed
from orchestrator.files import write_atomic
from orchestrator.models import DataInfo, ModelError, config_hash, resolve_custom
from orchestrator.spec import BINARY_METRICS, CVSpec, DataFormat, WorkloadSpec, fold_workloads
from orchestrator.spec.workload import inputs_mismatch
from orchestrator.storage import is_remote, join, upload_dir
from orchestrator.train.checkpoint import CheckpointMismatch, Manifest, export_model, manifest_in
from orchestrator.train.config import DatasetFacts, WorkerConfig
from orchestrator.train.custom_step import check_optimizers, load_step
from orchestrator.train.engines import accumulation_steps
from orchestrator.train.loop import steps_per_epoch, train_loop

if TYPE_CHECKING:
    import ray.train

    from orchestrator.data import PreparedData
    from orchestrator.data.folds import Fold

__all__ = [
    "PreparedRun",
    "build_trainer",
    "check_inputs",
    "explain",
    "export_checkpoint",
    "export_final",
    "local_dir",
    "model_workdir",
    "named_read_failure",
    "prepare_run",
    "publish_model",
    "resumable_checkpoint",
    "storage_uri",
    "worker_config",
    "workload_fold",
]


@dataclass(frozen=True)
class PreparedRun:
    """What every run of a workload shares: the data, prepared once, and what it holds."""

    prepared: PreparedData
    dataset: DatasetFacts
    info: DataInfo  # what the model takes from the data: vocabulary, classes, channels
    # Training rows in each cross-validation fold (`cv.folds` of them); empty without cv.
    fold_sizes: tuple[int, ...] = ()


def check_inputs(spec: WorkloadSpec) -> None:
    """Refuse, as RunError, a data source that is not there or a custom model that does not
    import: before Ray starts (seconds), not after."""
    from orchestrator.data import DataError
    from orchestrator.data.formats import detect_format
    from orchestrator.data.sources import find_source
    from orchestrator.storage import check_location, storage_error

    # Object storage first: a missing bucket or refused credentials, named, before anything else.
    for field, location in (
        ("data.train", spec.data.train),
        ("data.eval", spec.data.eval),
        ("data.cache_dir", spec.data.cache_dir),
        ("train.storage_path", spec.train.storage_path),
    ):
        if location is not None:
            check_location(location, field)
    try:
        if spec.model.kind == "custom":
            resolve_custom(spec.model.build)
        if spec.train.step is not None:
            load_step(spec.train.step)  # imports it, checks its parameters and its hooks
            if spec.model.kind == "custom":  # built without data facts: its optimizers now
                check_optimizers(spec.model, spec.train, DataInfo())
        for source in (spec.data.train, spec.data.eval):
            if source is not None:
                find_source(source)
    except DataError as exc:
        raise RunError(f"data: {exc}") from None
    except ModelError as exc:
        raise RunError(str(exc)) from None
    except OSError as exc:  # the object store refused to list a source (credentials, policy)
        sources = [s for s in (spec.data.train, spec.data.eval) if s is not None]
        raise RunError(storage_error(" or ".join(sources), exc, "data")) from None
    # What `auto` makes of the files, against what the model takes: a classifier pointed at
    # plain JSONL would otherwise have its data prepared as a language model's.
    with contextlib.suppress(DataError):  # a format it cannot tell: prepare says so, in full
        guessed = detect_format(find_source(spec.data.train), spec.data.format)
        if (mismatch := inputs_mismatch(spec.model, cast(DataFormat, guessed))) is not None:
            raise RunError(f"data.format: {spec.data.train} reads as {guessed}: {mismatch}")


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
        check_optimizers(spec.model, spec.train, run.info)
    except (PlanError, ModelError) as exc:
        raise RunError(str(exc)) from None
    if spec.cv is not None:
        run = dataclasses.replace(run, fold_sizes=_fold_sizes(spec.cv, prepared))
    for each in fold_workloads(spec):  # the workload's batches must fit the data (each fold's)
        worker_config(each, run)
    if spec.tune is not None and spec.tune.metric in BINARY_METRICS and run.info.num_classes != 2:
        raise RunError(
            f"tune.metric: {spec.tune.metric} is reported for two classes only, and the data "
            f"has {run.info.num_classes or 'no'} classes; sweep on eval_f1 or eval_accuracy"
        )
    return run


def _fold_sizes(cv: CVSpec, prepared: PreparedData) -> tuple[int, ...]:
    """Rows of each fold of the training split; RunError when a fold would be empty."""
    from orchestrator.data import DataError
    from orchestrator.data.folds import fold_sizes

    try:
        sizes = fold_sizes(prepared, cv.folds)
    except DataError as exc:
        raise RunError(f"data: {exc}") from None
    if empty := [i for i, n in enumerate(sizes) if n == 0]:
        raise RunError(
            f"cv.folds: {cv.folds} folds of {sum(sizes)} training rows leave fold(s) "
            f"{', '.join(map(str, empty))} without a sample to evaluate; use fewer folds "
            "or more data"
        )
    return tuple(sizes)


def workload_fold(spec: WorkloadSpec) -> Fold | None:
    """The cross-validation fold a workload trains for, if it is one fold of a cv."""
    from orchestrator.data.folds import Fold

    if spec.cv is None or spec.cv.fold is None:
        return None
    return Fold(spec.cv.fold, spec.cv.folds)


def _data_info(spec: WorkloadSpec, dataset: DatasetFacts) -> DataInfo:
    """What the model takes from the data, checked against what the spec says of it."""
    takes_features = spec.model.inputs == "features"
    if takes_features != (dataset.kind == "tabular") and spec.model.inputs is not None:
        raise RunError(
            f"data: {spec.model.kind} cannot train on {dataset.kind} data "
            f"({spec.data.train}): mlp trains on tabular data (data.format: tabular), "
            "and on nothing else"
        )
    if dataset.tabular is not None:
        return DataInfo(
            num_classes=dataset.tabular.num_classes, num_features=dataset.tabular.num_features
        )
    if dataset.kind == "text":
        return DataInfo(vocab_size=dataset.tokenizer.vocab_size if dataset.tokenizer else None)
    if dataset.labels is not None and dataset.tokenizer is not None:  # labeled text
        return DataInfo(
            vocab_size=dataset.tokenizer.vocab_size,
            num_classes=dataset.labels.num_classes,
            pad_id=dataset.tokenizer.pad_id,
            seq_len=dataset.seq_len,
        )
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
    if (fold := workload_fold(spec)) is not None:  # trains on every fold but its own
        rows = dataset.train_rows - run.fold_sizes[fold.index]
        dataset = dataset.model_copy(update={"train_rows": rows})
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
            run.prepared,
            seed=spec.train.seed,
            shuffle=spec.data.shuffle_buffer > 0,
            fold=workload_fold(spec),
        ),
        dataset_config=ingest_config(),
    )


def export_final(
    result: ray.train.Result,
    config: WorkerConfig,
    data: PreparedData | None = None,
    model_dir: str | None = None,
) -> str | None:
    """Export the run's last checkpoint as a plain fp32 model next to it (or into the local
    `model_dir`); None without one."""
    if result.checkpoint is None:
        return None
    return export_checkpoint(result.checkpoint, result.path, config, data, model_dir)


@contextlib.contextmanager
def model_workdir(run_path: str) -> Iterator[str]:
    """The local directory a run's model is exported into: `<run_path>/model` for a local run,
    a temporary one for a run on object storage (`publish_model` uploads it from there)."""
    if not is_remote(run_path):
        yield os.path.join(run_path, "model")
        return
    with tempfile.TemporaryDirectory(prefix="orch-model-") as scratch:
        yield os.path.join(scratch, "model")


def publish_model(model_dir: str, run_path: str) -> str:
    """Where the run's model lives for good: `<run_path>/model`, uploaded there (with every
    format exported beside it) when the run is on object storage."""
    if not is_remote(run_path):
        return model_dir
    return upload_dir(model_dir, join(run_path, "model"))


def export_checkpoint(
    checkpoint: ray.train.Checkpoint,
    run_path: str,
    config: WorkerConfig,
    data: PreparedData | None = None,
    model_dir: str | None = None,
) -> str:
    """`data`: the run's prepared data, recorded so that `orch export` checks on real batches.

    `model_dir`: a local directory to write the model to; by default `<run_path>/model`. A run
    on object storage exports into a local one, then uploads it (`publish_model`).
    """
    from orchestrator.exporting.samples import check_data

    dataset = config.dataset.model_dump(mode="json")
    model_dir = model_dir or os.path.join(local_dir(run_path), "model")
    if data is not None and (tokenizer := data.tokenizer_json()) is not None:
        # Beside the weights, for the workload that fine-tunes them (data.tokenizer.kind: file);
        # before model.json, which export_model writes last.
        os.makedirs(model_dir, exist_ok=True)
        write_atomic(os.path.join(model_dir, "tokenizer.json"), tokenizer)
    with checkpoint.as_directory() as directory:
        return export_model(
            directory,
            model_dir,
            {
                "model": config.model.model_dump(mode="json"),
                "data": config.data_info.__dict__,
                "kind": config.model.kind,
                "task": config.model.task,
                **({"check_data": check_data(data, dataset)} if data is not None else {}),
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
    """A local directory for what a run keeps on this machine (tracking reports not sent yet,
    a sweep's trial models): the run's own directory, or `orch_exports/<name>` when the run is
    on object storage. A run's final model goes to `<run_path>/model` either way."""
    if is_remote(path):
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
