"""Where the training loop runs, behind the few calls the loop makes of it.

`TrainSession`: a Ray Train worker. Ray Train hands out the worker's data shard and the
checkpoint to resume from, and persists what the loop reports.

`TrialSession`: a one-worker sweep trial, run in the Tune trial's own process with no Ray Train
run around it (no controller, worker group or split coordinator to start for every trial). The
trial reads whole splits, persists its checkpoints itself into the same `step-NNNNNNNN`
directories a Train run writes (so resuming, exporting and `orch runs` read them alike), and
reports to Tune what Tune should see: the reports that carry the sweep's metric.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from orchestrator.train.checkpoint import MANIFEST, TornCheckpoint, checkpoint_uri, manifest_in

if TYPE_CHECKING:
    import pyarrow.fs as pafs
    import ray.train

__all__ = [
    "REPORT",
    "Session",
    "TrainSession",
    "TrialSession",
    "checkpoint_dirs",
    "filesystem_of",
    "intact_checkpoint",
    "step_dir_name",
]

_log = logging.getLogger(__name__)

REPORT = "orch_report.json"  # the metrics of the report a persisted checkpoint came with


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class Session(Protocol):
    """What the training loop asks of where it runs."""

    rank: int
    world: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def resume_from(self) -> ray.train.Checkpoint | None:
        """The run's own latest checkpoint (after a restart), if any."""
        ...

    def dataset(self, split: str) -> Any:
        """This worker's iterator of `split`; None when the run has no such split."""
        ...

    def report(self, metrics: dict[str, Any], directory: str | None, step: int) -> None:
        """Report metrics, with the checkpoint written to `directory` when there is one. The
        session owns `directory` from then on, and removes it once it has been stored."""
        ...


class TrainSession:
    """A Ray Train worker's session."""

    def __init__(self, checkpoint_upload: str = "inline") -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        # auto: in the background where an upload would hold GPUs idle; on CPU (a laptop, a
        # test) checkpoints go to local disk and a run's order of events stays simple.
        self.upload_in_background = checkpoint_upload == "background" or (
            checkpoint_upload == "auto" and self.device.type == "cuda"
        )

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def resume_from(self) -> ray.train.Checkpoint | None:
        import ray.train

        return ray.train.get_checkpoint()

    def dataset(self, split: str) -> Any:
        import ray.train

        try:
            return ray.train.get_dataset_shard(split)
        except (KeyError, ValueError):
            return None

    def report(self, metrics: dict[str, Any], directory: str | None, step: int) -> None:
        import ray.train
        from ray.train import CheckpointUploadMode

        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        # In the background, Ray uploads the checkpoint (to a cluster's storage or s3, seconds
        # to minutes for a large model) while training goes on, and removes the directory
        # after; a failed upload still fails the run. Ray waits for the last upload before the
        # run ends.
        mode = (
            CheckpointUploadMode.ASYNC if self.upload_in_background else CheckpointUploadMode.SYNC
        )
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=step_dir_name(step),
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=True,
        )


@dataclass
class TrialSession:
    """A one-worker sweep trial's session: the loop in the Tune trial's process.

    run_dir: where this trial's checkpoints go (a local path or URI), as a Train run's would.
    to_tune: turns one of the loop's reports, and the URI of the checkpoint persisted with it
    (or None), into the call to Tune it makes, if any (trial.py decides what Tune sees).
    """

    run_dir: str
    datasets: dict[str, Any]  # split -> ray.data.Dataset
    keep: int | None  # checkpoints kept (train.keep_checkpoints); None: all
    to_tune: Callable[[dict[str, Any], str | None], None]
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: _trial_device())

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def resume_from(self) -> ray.train.Checkpoint | None:
        import ray.train

        dirs = checkpoint_dirs(self.run_dir)
        return ray.train.Checkpoint(dirs[-1]) if dirs else None

    def dataset(self, split: str) -> Any:
        dataset = self.datasets.get(split)
        return dataset.iterator() if dataset is not None else None

    def report(self, metrics: dict[str, Any], directory: str | None, step: int) -> None:
        uri = None
        if directory is not None:
            with open(os.path.join(directory, REPORT), "w") as f:
                json.dump(metrics, f)
            uri = f"{self.run_dir.rstrip('/')}/{step_dir_name(step)}"
            try:
                persist(directory, uri)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            self._prune()
        self.to_tune(metrics, uri)

    def _prune(self) -> None:
        if self.keep is None:
            return
        fs, _ = filesystem_of(self.run_dir)
        for old in checkpoint_dirs(self.run_dir)[: -self.keep]:
            with contextlib.suppress(FileNotFoundError):
                fs.delete_dir(filesystem_of(old)[1])


def _trial_device() -> torch.device:
    """The GPU Ray gave the trial (it sets CUDA_VISIBLE_DEVICES to it), else the CPU."""
    import ray

    return torch.device("cuda", 0) if ray.get_gpu_ids() else torch.device("cpu")


def persist(directory: str, uri: str) -> None:
    """Copy a checkpoint directory to `uri`, its manifest last: a copy cut short has none, and
    `checkpoint_dirs` passes it over."""
    import pyarrow.fs as pafs

    fs, path = filesystem_of(uri)
    files = [
        os.path.relpath(os.path.join(parent, name), directory)
        for parent, _, names in os.walk(directory)
        for name in names
    ]
    for relative in sorted(files, key=lambda f: f == MANIFEST):
        target = f"{path}/{relative.replace(os.sep, '/')}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(os.path.join(directory, relative), target, pafs.LocalFileSystem(), fs)


def checkpoint_dirs(run_dir: str) -> list[str]:
    """The complete checkpoints of a run directory (they have an intact manifest), oldest first,
    as paths or URIs like `run_dir`. A damaged one is passed over with a warning: resuming from
    the checkpoint before it loses some steps, failing the run loses all of them."""
    import pyarrow.fs as pafs

    fs, root = filesystem_of(run_dir)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    found = sorted(
        info.base_name
        for info in fs.get_file_info(pafs.FileSelector(root))
        if info.type == pafs.FileType.Directory and info.base_name.startswith("step-")
    )
    prefix = run_dir.rstrip("/")
    intact = []
    for name in found:
        if fs.get_file_info(f"{root}/{name}/{MANIFEST}").type != pafs.FileType.File:
            continue  # a copy cut short: the manifest is written last
        try:
            manifest_in(fs, f"{root}/{name}")
        except TornCheckpoint as exc:
            _log.warning("skipping checkpoint %s: %s", f"{prefix}/{name}", exc)
            continue
        intact.append(f"{prefix}/{name}")
    return intact


def intact_checkpoint(checkpoint: ray.train.Checkpoint) -> ray.train.Checkpoint | None:
    """`checkpoint`, or when its manifest is damaged the newest intact one beside it (None if
    there is none: the run starts afresh)."""
    import ray.train

    try:
        manifest_in(checkpoint.filesystem, checkpoint.path)
        return checkpoint
    except TornCheckpoint as exc:
        _log.warning("not resuming from %s: %s", checkpoint.path, exc)
    earlier = checkpoint_dirs(checkpoint_uri(checkpoint).rstrip("/").rsplit("/", 1)[0])
    if not earlier:
        return None
    _log.warning("resuming from %s instead", earlier[-1])
    return ray.train.Checkpoint(filesystem_of(earlier[-1])[1], filesystem=checkpoint.filesystem)


def filesystem_of(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a local path or URI, and the path on it."""
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)
