"""What crosses the Ray boundary to each training worker: one typed, validated config.

The driver builds a `WorkerConfig` from the workload and the prepared data's manifest, dumps it
to JSON-safe values for Ray Train's `train_loop_config`, and the worker validates it again
(`WorkerConfig.model_validate`): a worker never reads a free-form dict, and a field added on one
side but not the other fails at the start of the run, not in the middle of it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.models import DataInfo
from orchestrator.spec import DeepSpeedSpec, ModelSpec, StreamSettings, TrainSpec

__all__ = [
    "DatasetFacts",
    "ImageFacts",
    "LabelFacts",
    "TabularFacts",
    "TokenizerFacts",
    "WorkerConfig",
]


class _Facts(BaseModel):
    # Manifests carry more than a worker needs (file names, hashes): ignore the rest.
    model_config = ConfigDict(frozen=True, extra="ignore")


class TokenizerFacts(_Facts):
    """The prepared tokenizer's vocabulary and special tokens (masking needs them)."""

    vocab_size: int
    pad_id: int | None = None
    sep_id: int | None = None
    cls_id: int | None = None
    mask_id: int | None = None

    def special_ids(self) -> list[int]:
        return [i for i in (self.pad_id, self.sep_id, self.cls_id, self.mask_id) if i is not None]


class ImageFacts(_Facts):
    """How the prepared images are stored: raw pixels of one shape, or encoded files."""

    encoding: str
    shape: list[int] | None = None
    num_classes: int


class TabularFacts(_Facts):
    """The width of the prepared feature vectors and the label classes (sorted names)."""

    num_features: int = Field(gt=0)
    num_classes: int = Field(gt=1)
    class_names: list[str]


class LabelFacts(_Facts):
    """The classes of labeled text: their names, in the order of their ids."""

    num_classes: int = Field(gt=1)
    names: list[str]


class DatasetFacts(_Facts):
    """What the prepared data's manifest says, as far as the training loop is concerned."""

    kind: Literal["text", "image", "tabular", "labeled_text"]
    train_rows: int = Field(ge=0)
    seq_len: int | None = None
    tokenizer: TokenizerFacts | None = None
    image: ImageFacts | None = None
    tabular: TabularFacts | None = None
    labels: LabelFacts | None = None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> DatasetFacts:
        return cls.model_validate(
            {
                "kind": manifest["kind"],
                "train_rows": manifest["splits"]["train"]["rows"],
                "seq_len": manifest.get("seq_len"),
                "tokenizer": manifest.get("tokenizer"),
                "image": manifest.get("image"),
                "tabular": manifest.get("tabular"),
                "labels": manifest.get("labels"),
            }
        )


class WorkerConfig(BaseModel):
    """The slice of the workload one training worker needs, and nothing else."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelSpec
    train: TrainSpec
    deepspeed: DeepSpeedSpec | None
    stream: StreamSettings
    dataset: DatasetFacts
    data_info: DataInfo
    model_config_hash: str
    # A checkpoint of another run to start from (a sweep's PBT exploit), as a path or URI;
    # the run's own checkpoints still come first when it restarts.
    initial_checkpoint: str | None = None

    def to_ray(self) -> dict[str, Any]:
        """JSON-safe values for `train_loop_config` (what Ray pickles to the workers)."""
        return self.model_dump(mode="json")
