"""Labeled text (JSONL, CSV or Parquet: a text and a label per record) -> classification shards.

Each record becomes one row: `[CLS] text [SEP]` padded (or cut) to `data.seq_len` token ids,
and its label's id. Label ids number the label names in sorted order (integers numerically,
before names), so the same data always gives the same ids; the names are kept in the manifest.
Records are few and short next to a pretraining corpus, so everything runs on the driver:
tokenizers' batch encoding is parallel already, and no Ray is needed.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.data.shards import ShardWriter, held_out, write_file
from orchestrator.data.sources import DataError, Source
from orchestrator.data.text import decoded_lines
from orchestrator.data.tokenizer import special_tokens, tokenizer_facts, train_tokenizer
from orchestrator.spec import DataSpec

if TYPE_CHECKING:
    from orchestrator.data.formats import LabeledTextFormat

__all__ = ["LABELED_SUFFIXES", "Record", "labeled_text_schema", "prepare_labeled_text", "records"]

_BATCH = 1024  # records tokenized at once


@dataclass(frozen=True)
class Record:
    where: str  # "file:line" or "file: row N", for errors
    text: str
    label: str  # the label's name; integers as their decimal string


def labeled_text_schema(seq_len: int) -> pa.Schema:
    return pa.schema(
        [
            ("sample_id", pa.int64()),
            ("input_ids", pa.list_(pa.int32(), seq_len)),
            ("label", pa.int64()),
        ]
    )


def prepare_labeled_text(
    data: DataSpec,
    fmt: LabeledTextFormat,
    source: Source,
    eval_source: Source | None,
    fs: pafs.FileSystem,
    root: str,
) -> dict[str, Any]:
    """Check the records, train (or load) the tokenizer, write the shards; the manifest's body."""
    counts: Counter[str] = Counter()
    sources = [(source, None), (eval_source, "eval")] if eval_source else [(source, None)]

    def train_texts() -> Iterator[str]:
        for record in fmt.read(source, data):
            counts[record.label] += 1
            yield record.text

    # One pass checks every record and counts the labels; the tokenizer learns from the
    # training source's texts on the way, unless it is a file (it then reads none of them).
    tok = train_tokenizer(data.tokenizer, train_texts())
    if data.tokenizer.kind == "file":
        counts.update(r.label for r in fmt.read(source, data))
    if eval_source is not None:
        counts.update(r.label for r in fmt.read(eval_source, data))
    names = sorted(counts, key=_label_order)
    if len(names) < 2:
        raise DataError(
            f"{source.uri}: every record has the label {names[0]!r} (data.label_column "
            f"{data.label_column!r}); a classifier needs at least two classes"
        )
    specials = special_tokens(tok)
    if specials.cls is None:
        raise DataError(
            f"{data.tokenizer.path or source.uri}: labeled_text needs a BERT-style vocabulary "
            "with [CLS], [SEP] and [PAD] (data.tokenizer.kind: wordpiece, or such a file)"
        )
    write_file(fs, f"{root}/tokenizer.json", tok.to_str())
    ids = {name: i for i, name in enumerate(names)}
    writers = {
        s: ShardWriter(fs, f"{root}/{s}", labeled_text_schema(data.seq_len), data.shard_rows)
        for s in ("train", "eval")
    }
    frame = _Framer(data.seq_len, cls=specials.cls, sep=specials.sep, pad=specials.pad)
    # An eval source is the eval split; the training source is then all training data.
    fraction = 0.0 if eval_source is not None else data.eval_fraction
    next_id = 0
    for src, forced in sources:
        assert src is not None
        for batch in _batches(fmt.read(src, data)):
            encodings = tok.encode_batch_fast([r.text for r in batch], add_special_tokens=False)
            for record, encoding in zip(batch, encodings, strict=True):
                split = forced or ("eval" if held_out(next_id, fraction) else "train")
                writers[split].add(next_id, frame(encoding.ids), ids[record.label])
                next_id += 1
    splits = {s: w.close() for s, w in writers.items()}
    if splits["train"]["rows"] == 0:
        raise DataError(f"{source.uri}: no training records after the split")
    return {
        "kind": "labeled_text",
        "seq_len": data.seq_len,
        "splits": splits,
        "truncated": frame.truncated,
        "tokenizer": tokenizer_facts(tok, data.tokenizer.kind),
        "labels": {
            "column": data.label_column,
            "num_classes": len(names),
            "names": names,
            "counts": [counts[n] for n in names],
        },
    }


def _label_order(name: str) -> tuple[int, int, str]:
    """Integers in numeric order (2 before 10), then names in string order."""
    digits = name.removeprefix("-")
    return (0, int(name), "") if digits.isdigit() else (1, 0, name)


def _batches(items: Iterator[Record]) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for item in items:
        batch.append(item)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


class _Framer:
    """Token ids -> `[CLS] ids [SEP]` cut or padded to `seq_len`; counts the records cut."""

    def __init__(self, seq_len: int, *, cls: int, sep: int, pad: int):
        self.seq_len, self.cls, self.sep, self.pad = seq_len, cls, sep, pad
        self.truncated = 0

    def __call__(self, ids: list[int]) -> np.ndarray:
        body = self.seq_len - 2
        if len(ids) > body:
            self.truncated += 1
            ids = ids[:body]
        row = np.full(self.seq_len, self.pad, dtype=np.int32)
        row[0] = self.cls
        row[1 : len(ids) + 1] = ids
        row[len(ids) + 1] = self.sep
        return row


# --------------------------------------------------------------------------- readers
def records(source: Source, data: DataSpec) -> Iterator[Record]:
    """Every record of the source, checked, in file order; at most `data.limit` of them."""
    count = 0
    for path in source.files:
        read = _reader(path)
        for record in read(source, path, data.text_column, data.label_column):
            if not record.text.strip():
                raise DataError(
                    f"{record.where}: the text ({data.text_column!r}, data.text_column) is empty"
                )
            yield record
            count += 1
            if data.limit is not None and count >= data.limit:
                return


_Reader = Callable[[Source, str, str, str], Iterator[Record]]


def _reader(path: str) -> _Reader:
    suffix = PurePosixPath(path).suffix.lower()
    for suffixes, read in _READERS:
        if suffix in suffixes:
            return read
    allowed = ", ".join(s for suffixes, _ in _READERS for s in suffixes)
    raise DataError(f"{path}: labeled_text reads {allowed} files, not {suffix or 'this file'}")


def _jsonl(source: Source, path: str, text_column: str, label_column: str) -> Iterator[Record]:
    for lineno, line in decoded_lines(source, path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON: {exc.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_column), str):
            raise DataError(f"{where}: no string field {text_column!r} (data.text_column)")
        yield Record(
            where, record[text_column], _label(record.get(label_column), where, label_column)
        )


def _csv(source: Source, path: str, text_column: str, label_column: str) -> Iterator[Record]:
    lines = (line.rstrip("\r") for _, line in decoded_lines(source, path))
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: empty CSV file (no header row)")
    columns = {}
    for name, what in ((text_column, "text_column"), (label_column, "label_column")):
        if name not in header:
            raise DataError(f"{path}:1: no column {name!r} (data.{what}); the header has {header}")
        columns[what] = header.index(name)
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{where}: {len(row)} fields, but the header has {len(header)}")
        label = row[columns["label_column"]]
        yield Record(where, row[columns["text_column"]], _label(label or None, where, label_column))


def _parquet(source: Source, path: str, text_column: str, label_column: str) -> Iterator[Record]:
    try:
        reader = pq.ParquetFile(source.filesystem.open_input_file(path))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    names = reader.schema_arrow.names
    for name, what in ((text_column, "text_column"), (label_column, "label_column")):
        if name not in names:
            raise DataError(f"{path}: no column {name!r} (data.{what}); the file has {names}")
    row = 0
    for batch in reader.iter_batches(columns=[text_column, label_column]):
        for text, label in zip(*(c.to_pylist() for c in batch.columns), strict=True):
            row += 1
            where = f"{path}: row {row}"
            if not isinstance(text, str):
                raise DataError(f"{where}: no text in {text_column!r} (data.text_column)")
            yield Record(where, text, _label(label, where, label_column))


_READERS: tuple[tuple[tuple[str, ...], _Reader], ...] = (
    ((".jsonl", ".json", ".ndjson"), _jsonl),
    ((".csv",), _csv),
    ((".parquet",), _parquet),
)
LABELED_SUFFIXES = tuple(s for suffixes, _ in _READERS for s in suffixes)


def _label(value: object, where: str, column: str) -> str:
    """A label's name: a non-empty string or an integer (booleans and fractions are neither)."""
    if value is None or value == "":
        raise DataError(f"{where}: no label in {column!r} (data.label_column)")
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(
        f"{where}: label {value!r} in {column!r} (data.label_column) is a "
        f"{type(value).__name__}; labels are names (strings) or integers"
    )
