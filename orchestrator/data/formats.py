"""The data formats prepare reads: one table entry per `data.format`, and the guess for "auto".

Adding a format: write its reader(s) (in `text.py` or `images.py`, or a module of their own),
add its entry to FORMATS and its name to `DataSpec.format`; prepare, the guess, the cache key's
settings and the error messages all read this table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Literal

from orchestrator.data import images, labeled_text, tabular, text
from orchestrator.data.chunks import Chunk, Piece, line_chunks, row_group_chunks
from orchestrator.data.images import ImageSet
from orchestrator.data.labeled_text import Record
from orchestrator.data.sources import DataError, Source

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

    from orchestrator.spec import DataSpec

__all__ = [
    "FORMATS",
    "Format",
    "ImageFolderFormat",
    "ImageFormat",
    "LabeledTextFormat",
    "TabularFormat",
    "TextFormat",
    "detect_format",
]

# DataSpec fields that change the shards of every format; each kind adds its own.
COMMON_SETTINGS = ("eval_fraction", "limit", "shard_rows")


@dataclass(frozen=True)
class TextFormat:
    """A text format: tokenized with a trained tokenizer and packed into token sequences."""

    # (source, chunk bytes, first chunk index) -> the source cut into chunks (chunks.py)
    chunks: Callable[[Source, int, int], list[Chunk]]
    # (filesystem, piece of a chunk, text column) -> the piece's texts, in order
    records: Callable[[pafs.FileSystem, Piece, str], Iterator[str]]
    # "auto" picks this format when every file ends in one of these (lower-case)
    suffixes: tuple[str, ...] = ()
    # "auto" picks this format, before any suffix rule, when this says yes to the file names
    recognize: Callable[[list[str]], bool] | None = None
    # a source in this format may be orch's own shards already, to be used in place
    may_be_prepared: bool = False
    # DataSpec fields, beyond COMMON_SETTINGS, that change the shards (and so the cache key)
    settings: tuple[str, ...] = ("text_column", "tokenizer", "seq_len", "chunk_mb")
    kind: Literal["text"] = field(default="text", init=False)


@dataclass(frozen=True)
class ImageFormat:
    """An image format: images and labels, written as they are (raw pixels or encoded files)."""

    read: Callable[[Source], Iterator[ImageSet]]
    suffixes: tuple[str, ...] = ()
    recognize: Callable[[list[str]], bool] | None = None
    may_be_prepared: bool = False
    settings: tuple[str, ...] = ()
    kind: Literal["image"] = field(default="image", init=False)


@dataclass(frozen=True)
class TabularFormat:
    """A table of feature columns and a label column: standardized, encoded feature vectors."""

    read: Callable[[Source], pa.Table]  # the whole source as one table, on the driver
    suffixes: tuple[str, ...] = ()
    recognize: Callable[[list[str]], bool] | None = None
    may_be_prepared: bool = False
    settings: tuple[str, ...] = ("label_column", "features", "categorical")
    kind: Literal["tabular"] = field(default="tabular", init=False)


@dataclass(frozen=True)
class LabeledTextFormat:
    """Texts with a class label each: tokenized, framed as [CLS] text [SEP] and padded."""

    # (source, data section) -> the checked records, on the driver
    read: Callable[[Source, DataSpec], Iterator[Record]]
    suffixes: tuple[str, ...] = ()  # never guessed: its files look like other formats' files
    recognize: Callable[[list[str]], bool] | None = None
    may_be_prepared: bool = False
    settings: tuple[str, ...] = ("text_column", "label_column", "tokenizer", "seq_len")
    kind: Literal["labeled_text"] = field(default="labeled_text", init=False)


@dataclass(frozen=True)
class ImageFolderFormat:
    """Encoded image files in one folder per class: listed on the driver, read and written by
    tasks on the cluster (`image_folder.py`)."""

    suffixes: tuple[str, ...] = ()
    recognize: Callable[[list[str]], bool] | None = None
    may_be_prepared: bool = False
    settings: tuple[str, ...] = ("eval_labels", "skip_bad_images")
    kind: Literal["image"] = field(default="image", init=False)


Format = TextFormat | ImageFormat | ImageFolderFormat | TabularFormat | LabeledTextFormat

# The order is the order of the guess's suffix rules, and of the names in error messages.
FORMATS: dict[str, Format] = {
    "parquet": TextFormat(
        row_group_chunks, text.parquet_records, suffixes=(".parquet",), may_be_prepared=True
    ),
    "text": TextFormat(line_chunks, text.line_records, suffixes=(".txt", ".text")),
    "jsonl": TextFormat(line_chunks, text.jsonl_records, suffixes=(".jsonl", ".json", ".ndjson")),
    "mnist": ImageFormat(images.read_mnist, recognize=images.looks_like_mnist),
    "cifar": ImageFormat(images.read_cifar, recognize=images.looks_like_cifar),
    "image_folder": ImageFolderFormat(suffixes=images.IMAGE_SUFFIXES),
    # CSV or Parquet; "auto" picks it for .csv files only (.parquet is the text format's).
    "tabular": TabularFormat(tabular.read_table, suffixes=(".csv",)),
    # JSONL, CSV or Parquet with a text and a label column; only when named in data.format.
    "labeled_text": LabeledTextFormat(labeled_text.records),
}


def detect_format(source: Source, declared: str) -> str:
    """The source's format: the declared one, or a guess from file names."""
    if declared != "auto":
        return declared
    names = [PurePosixPath(f).name.lower() for f in source.files]
    # Formats known by their file names (MNIST, CIFAR) come first: their suffixes say little.
    for name, fmt in FORMATS.items():
        if fmt.recognize is not None and fmt.recognize(names):
            return name
    suffixes = {PurePosixPath(n).suffix for n in names}
    for name, fmt in FORMATS.items():
        if fmt.suffixes and suffixes <= set(fmt.suffixes):
            return name
    raise DataError(
        f"{source.uri}: cannot tell the format from the file names (found {sorted(suffixes)}); "
        f"set data.format to one of {', '.join(FORMATS)}"
    )
