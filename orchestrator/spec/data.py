"""The `data:` section: where the data is, its format, tokenizer and streaming settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from orchestrator.spec.base import (
    Inputs,
    NonNegativeInt,
    PositiveInt,
    Problem,
    Section,
    SpecFieldError,
)

__all__ = ["FORMAT_INPUTS", "DataFormat", "DataSpec", "StreamSettings", "TokenizerSpec"]

DataFormat = Literal[
    "auto", "parquet", "text", "jsonl", "mnist", "cifar", "image_folder", "tabular", "labeled_text"
]
# What each source format yields; None where only the data itself can tell (checked at prepare).
FORMAT_INPUTS: dict[DataFormat, Inputs | None] = {
    "auto": None,
    "parquet": None,
    "text": "tokens",
    "jsonl": "tokens",
    "mnist": "images",
    "cifar": "images",
    "image_folder": "images",
    "tabular": "features",
    "labeled_text": "labeled_tokens",
}


class TokenizerSpec(Section):
    kind: Literal["wordpiece", "bpe", "file"] = Field(
        "wordpiece",
        description="wordpiece (BERT) or byte-level bpe (GPT) trained on the corpus, or a file.",
    )
    vocab_size: PositiveInt = Field(30522, ge=64, description="Vocabulary size to train.")
    path: str | None = Field(None, description="An existing tokenizer.json (kind: file).")
    lowercase: bool = Field(True, description="Lowercase text before WordPiece training.")
    sample_mb: float = Field(
        256,
        gt=0,
        description="Train the tokenizer on at most this many MB of text, taken evenly from "
        "the whole corpus (the same sample every time); a smaller corpus is used whole.",
    )

    @model_validator(mode="after")
    def _path_iff_file(self) -> TokenizerSpec:
        if self.kind == "file" and not self.path:
            raise SpecFieldError([(("path",), "kind 'file' needs a path to a tokenizer.json")])
        if self.kind != "file" and self.path:
            raise SpecFieldError(
                [(("path",), f"a path is only used with kind 'file', not '{self.kind}'")]
            )
        return self


class _DataSource(Section):
    # What is prepared, and how: changing any of these prepares the data anew.
    train: str = Field(
        description="Training data: Parquet shards (dir, glob) or a raw source "
        "(.txt/.jsonl corpus, MNIST idx, CIFAR batches, image folder, .csv table); "
        "local path or s3:// gs://."
    )
    eval: str | None = Field(
        None, description="Evaluation data; null splits eval_fraction off the training source."
    )
    format: DataFormat = Field("auto", description="Source format; auto guesses from the path.")
    eval_labels: str | None = Field(
        None,
        description="Image folders: a file of 'image,class' lines labelling a flat eval folder "
        "(ImageNet's validation split); null: the eval folder has one sub-folder per class.",
    )
    skip_bad_images: bool = Field(
        False,
        description="Image folders: skip (and count) images that do not decode, instead of "
        "stopping at the first one.",
    )
    text_column: str = Field("text", description="Column or JSON key holding the text.")
    label_column: str = Field(
        "label", description="Column (or JSON key) holding the class label of labeled data."
    )
    features: list[str] | None = Field(
        None,
        min_length=1,
        description="Tabular feature columns, in order; null: every column but the label.",
    )
    categorical: list[str] = Field(
        default_factory=list,
        description="Tabular feature columns holding categories, not numbers (one-hot encoded).",
    )
    tokenizer: TokenizerSpec = Field(
        default_factory=TokenizerSpec, description="Tokenizer for text sources."
    )
    seq_len: PositiveInt = Field(128, ge=8, description="Tokens per packed training sequence.")
    eval_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of the source held out for eval when eval is null."
    )
    limit: PositiveInt | None = Field(
        None, description="Use at most this many source records (lines, documents, images)."
    )
    shard_rows: PositiveInt = Field(8192, description="Rows per prepared Parquet shard.")
    chunk_mb: float = Field(
        64,
        gt=0,
        description="Text is prepared in chunks of about this many MB, one task each, spread "
        "over the cluster; sequences are packed within a chunk.",
    )
    cache_dir: str = Field(".orch/data", description="Where prepared datasets are cached.")

    @model_validator(mode="after")
    def _tabular_columns_agree(self) -> _DataSource:
        problems: list[Problem] = []
        label, features = self.label_column, self.features
        if features is not None and label in features:
            problems.append((("features",), f"lists the label column {label!r}; drop it there"))
        if features is not None and len(set(features)) < len(features):
            twice = sorted({c for c in features if features.count(c) > 1})
            problems.append((("features",), f"lists {twice} more than once"))
        if self.eval_labels is not None and self.eval is None:
            problems.append((("eval_labels",), "labels an eval folder; set data.eval to it"))
        strays = [c for c in self.categorical if c == label or (features and c not in features)]
        if strays:
            problems.append(
                (
                    ("categorical",),
                    f"{strays} are not feature columns; list them in data.features (or set "
                    "features: null to take every column but the label)",
                )
            )
        if problems:
            raise SpecFieldError(problems)
        return self


class StreamSettings(Section):
    """The data settings read when the data is streamed to the workers, not when it is prepared:
    all a worker gets of `data`, and all of it a sweep may search (its trials share the data,
    prepared once)."""

    mlm_probability: float = Field(
        0.15, gt=0, lt=1, description="Share of tokens masked for masked-LM training."
    )
    shuffle_buffer: NonNegativeInt = Field(
        2048, description="Rows in each worker's local shuffle buffer; 0 turns shuffling off."
    )
    augment: bool = Field(False, description="Random crop and flip for image training data.")
    prefetch_batches: PositiveInt = Field(
        2,
        description="Batches each worker's stream fetches ahead of the one being trained on "
        "(Ray Data's prefetch_batches).",
    )
    pin_memory: bool = Field(
        True,
        description="On GPU workers, stage batches in pinned host memory, so the copy to the "
        "GPU overlaps the step (ignored on CPU).",
    )


# Stream settings last: pydantic orders inherited fields by reversed MRO, so the file's,
# the schema's and `orch show`'s order stays source first, then streaming.
class DataSpec(StreamSettings, _DataSource):
    def stream_settings(self) -> StreamSettings:
        return StreamSettings.model_validate(
            self.model_dump(include=set(StreamSettings.model_fields))
        )
