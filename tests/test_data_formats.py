"""The data-format table: it covers DataSpec.format, and "auto" guesses from file names."""

from __future__ import annotations

import typing

import pyarrow.fs as pafs
import pytest

from orchestrator.data import DataError
from orchestrator.data.formats import (
    FORMATS,
    ImageFolderFormat,
    ImageFormat,
    LabeledTextFormat,
    TabularFormat,
    TextFormat,
    detect_format,
)
from orchestrator.data.prepare import _settings
from orchestrator.data.sources import Source
from orchestrator.spec import DataSpec


def _source(*names: str) -> Source:
    files = tuple(f"/data/{n}" for n in names)
    return Source("/data", pafs.LocalFileSystem(), files, (1,) * len(files), "fingerprint")


def test_table_covers_every_declarable_format() -> None:
    declarable = set(typing.get_args(DataSpec.model_fields["format"].annotation)) - {"auto"}
    assert set(FORMATS) == declarable


def test_each_format_has_the_readers_of_its_kind() -> None:
    for name, fmt in FORMATS.items():
        if fmt.kind == "text":
            assert isinstance(fmt, TextFormat), name
            assert callable(fmt.chunks) and callable(fmt.records), name
        elif fmt.kind == "tabular":
            assert isinstance(fmt, TabularFormat), name
            assert callable(fmt.read), name
        elif fmt.kind == "labeled_text":
            assert isinstance(fmt, LabeledTextFormat), name
            assert callable(fmt.read), name
        elif isinstance(fmt, ImageFolderFormat):  # lists files; its tasks read them
            assert fmt.kind == "image" and name == "image_folder", name
        else:
            assert isinstance(fmt, ImageFormat), name
            assert callable(fmt.read), name


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["a.parquet", "b.parquet"], "parquet"),
        (["a.txt"], "text"),
        (["a.txt", "B.TEXT"], "text"),
        (["a.jsonl"], "jsonl"),
        (["a.json", "b.ndjson"], "jsonl"),
        (["cat/a.png", "dog/b.JPG", "dog/c.jpeg"], "image_folder"),
        (["x/a.bmp", "y/b.gif", "y/c.webp"], "image_folder"),
        (["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"], "mnist"),
        (["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "readme.txt"], "mnist"),
        (["data_batch_1", "data_batch_2", "test_batch", "batches.meta"], "cifar"),
        (["test_batch"], "cifar"),
        (["train", "test", "meta"], "cifar"),  # CIFAR-100
        (["a.csv", "b.CSV"], "tabular"),
    ],
)
def test_auto_guesses_from_file_names(names: list[str], expected: str) -> None:
    assert detect_format(_source(*names), "auto") == expected


def test_a_declared_format_is_taken_as_it_is() -> None:
    assert detect_format(_source("a.txt"), "jsonl") == "jsonl"


@pytest.mark.parametrize("names", [["a.tsv"], ["a.txt", "b.jsonl"], ["a.png", "b.txt"], ["train"]])
def test_no_guess_names_what_to_set(names: list[str]) -> None:
    with pytest.raises(DataError) as err:
        detect_format(_source(*names), "auto")
    assert "/data: cannot tell the format from the file names (found [" in str(err.value)
    assert str(err.value).endswith(
        "set data.format to one of parquet, text, jsonl, mnist, cifar, image_folder, tabular"
        + "".join(f", {name}" for name in list(FORMATS)[7:])  # formats added later
    )


def test_settings_in_the_cache_key() -> None:
    data = DataSpec(train="x")
    common = {"eval_fraction", "limit", "shard_rows"}
    text_keys = common | {"text_column", "tokenizer", "seq_len", "chunk_mb"}
    for name in ("parquet", "text", "jsonl"):
        assert set(_settings(data, FORMATS[name])) == text_keys, name
    for name in ("mnist", "cifar"):
        assert set(_settings(data, FORMATS[name])) == common
    assert set(_settings(data, FORMATS["image_folder"])) == common | {
        "eval_labels",
        "skip_bad_images",
    }
    assert set(_settings(data, FORMATS["tabular"])) == {
        "eval_fraction",
        "limit",
        "shard_rows",
        "label_column",
        "features",
        "categorical",
    }
