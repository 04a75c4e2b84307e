"""Checkpoint manifests (checked before any resume) and the final, consolidated model export."""

from __future__ import annotations

import json
import os
import platform
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.files import write_atomic

if TYPE_CHECKING:
    import pyarrow.fs as pafs
    import ray.train

__all__ = [
    "CheckpointMismatch",
    "Manifest",
    "TornCheckpoint",
    "checkpoint_manifest",
    "checkpoint_uri",
    "export_model",
    "library_versions",
    "manifest_in",
    "read_manifest",
    "write_manifest",
]

MANIFEST = "orch_checkpoint.json"


class CheckpointMismatch(Exception):
    """A checkpoint that does not fit the run that wants to resume from it."""


class TornCheckpoint(CheckpointMismatch):
    """A checkpoint whose manifest cannot be read (empty, cut short, edited): never resumed from."""


@dataclass(frozen=True)
class Manifest:
    step: int
    epoch: int
    batches_in_epoch: int  # micro batches of `epoch` already consumed: where data resumes
    world_size: int
    zero_stage: int | None  # None: plain DDP
    precision: str
    model_config_hash: str
    versions: dict[str, str]

    def check_resumable_by(self, other: Manifest, where: str) -> None:
        """Refuse, with the reason and the fix, a checkpoint this run cannot continue from."""
        fresh = "start a fresh run with another name (--name) or remove that run's directory"
        if self.model_config_hash != other.model_config_hash:
            raise CheckpointMismatch(
                f"{where} was written for another model or dataset "
                f"(config {self.model_config_hash}, this run {other.model_config_hash}); {fresh}"
            )
        if self.zero_stage != other.zero_stage:
            raise CheckpointMismatch(
                f"{where} was written with {_zero(self.zero_stage)}, this run uses "
                f"{_zero(other.zero_stage)}; {fresh}"
            )
        sharded = self.zero_stage is not None and self.zero_stage > 0
        if sharded and self.world_size != other.world_size:
            raise CheckpointMismatch(
                f"{where} holds ZeRO-{self.zero_stage} shards of {self.world_size} workers, "
                f"this run has {other.world_size}; use scaling.num_workers={self.world_size} "
                f"or {fresh}"
            )
        if self.zero_stage is not None and self.precision != other.precision:
            raise CheckpointMismatch(
                f"{where} was written in {self.precision}, this run uses {other.precision}; "
                f"DeepSpeed optimizer state differs between them; {fresh}"
            )


def _zero(stage: int | None) -> str:
    return "plain DDP (no deepspeed)" if stage is None else f"DeepSpeed ZeRO-{stage}"


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("orch", "torch", "ray", "deepspeed", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def write_manifest(directory: str, manifest: Manifest) -> None:
    # Written last and atomically: a checkpoint with a readable manifest is a whole one.
    write_atomic(Path(directory, MANIFEST), json.dumps(asdict(manifest), indent=2))


def read_manifest(directory: str) -> Manifest:
    path = Path(directory, MANIFEST)
    if not path.is_file():
        raise CheckpointMismatch(f"{directory} is not an orch checkpoint (no {MANIFEST})")
    return _parse(path.read_bytes(), directory)


def manifest_in(fs: pafs.FileSystem, directory: str) -> Manifest:
    """The manifest of a checkpoint directory on a pyarrow filesystem (local or remote)."""
    try:
        with fs.open_input_stream(f"{directory}/{MANIFEST}") as f:
            return _parse(f.read(), directory)
    except FileNotFoundError:
        raise CheckpointMismatch(f"{directory} is not an orch checkpoint (no {MANIFEST})") from None


def _parse(text: bytes, directory: str) -> Manifest:
    try:
        fields = json.loads(text)
        manifest = Manifest(**fields)
    except (ValueError, TypeError):  # not JSON, not an object, or other fields
        raise TornCheckpoint(f"{directory}/{MANIFEST} is damaged (cut short or edited)") from None
    if not isinstance(manifest.step, int) or not isinstance(manifest.model_config_hash, str):
        raise TornCheckpoint(f"{directory}/{MANIFEST} is damaged (cut short or edited)")
    return manifest


def checkpoint_manifest(checkpoint: ray.train.Checkpoint) -> Manifest:
    """The manifest of a `ray.train.Checkpoint`, read where it lies (no download of weights)."""
    return manifest_in(checkpoint.filesystem, checkpoint.path)


def checkpoint_uri(checkpoint: ray.train.Checkpoint) -> str:
    """Where a Ray checkpoint lies, as one string a worker can open again: a local path, or a
    URI on the checkpoint's remote filesystem."""
    import pyarrow.fs as pafs

    fs = checkpoint.filesystem
    if fs is None or isinstance(fs, pafs.LocalFileSystem):
        return str(checkpoint.path)
    scheme = {"gcs": "gs"}.get(fs.type_name, fs.type_name)
    return f"{scheme}://{checkpoint.path}"


def export_model(checkpoint_dir: str, out_dir: str, meta: dict[str, Any]) -> str:
    """Write state_dict.pt (fp32, consolidated across ZeRO shards) and model.json to out_dir."""
    import torch

    from orchestrator.train.engines import DS_TAG

    manifest = read_manifest(checkpoint_dir)
    if manifest.zero_stage is None:
        state = torch.load(os.path.join(checkpoint_dir, "state.pt"), map_location="cpu")["model"]
    elif manifest.zero_stage == 0:  # nothing is partitioned: the module states are whole
        path = os.path.join(checkpoint_dir, DS_TAG, "mp_rank_00_model_states.pt")
        state = torch.load(path, map_location="cpu", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed narrates the merge with prints and a progress bar; orch reports the result.
        with open(os.devnull, "w") as quiet, redirect_stdout(quiet), redirect_stderr(quiet):
            state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=DS_TAG)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    os.makedirs(out_dir, exist_ok=True)
    weights = Path(out_dir, "state_dict.pt")
    partial = weights.with_name(".state_dict.pt.tmp")
    torch.save(state, partial)
    os.replace(partial, weights)
    meta = {**meta, "checkpoint": asdict(manifest)}
    # model.json last: load_exported needs it, so a directory without it is no model at all.
    write_atomic(Path(out_dir, "model.json"), json.dumps(meta, indent=2))
    return out_dir
