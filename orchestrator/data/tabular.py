"""Tabular sources (CSV or Parquet) -> feature-vector shards with class labels.

Tabular data is small (a few numbers per row; a million rows is tens of megabytes), so the
driver reads it whole with pyarrow instead of streaming it through Ray Data: the statistics
that standardize it need every training row anyway.

The rules, each recorded in the manifest's `tabular` entry so that the same vectors can be
rebuilt from raw rows later (serving, export checks):
- split: row i of the sources is sample i (the eval source's rows after the training
  source's); `held_out(i, eval_fraction)` sends it to eval, unless an eval source is given.
- numeric columns: standardized, (x - mean) / std, with the mean and (population) standard
  deviation of the TRAINING split only, so nothing of the eval rows leaks into training; a
  constant column (std 0) becomes 0.
- categorical columns (`data.categorical`): values as text, one-hot over the training split's
  categories in sorted order, plus one last slot for a missing value; a category the
  training split never had is all zeros.
- missing values (empty, NA, NaN, null...): a numeric one becomes the training mean, i.e. 0
  after standardizing; a categorical one is its own category (the last slot).
- labels: classes in sorted order (numerically for numeric labels) -> ids 0..K-1, with their
  names in the manifest; a row without a label is an error, as is a label of one class.

A row's vector is its feature columns in the order of `data.features` (one value for a numeric
column, one per slot for a categorical one), stored as a fixed-size float32 list.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.data.shards import ShardWriter, held_out, tabular_schema
from orchestrator.data.sources import DataError, Source
from orchestrator.spec import DataSpec

if TYPE_CHECKING:
    from orchestrator.data.formats import TabularFormat

__all__ = ["TABLE_SUFFIXES", "prepare_tabular", "read_table"]

TABLE_SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class _Column:
    """How one feature column becomes part of the vector."""

    name: str
    categories: list[str] | None = None  # None: numeric
    mean: float = 0.0
    std: float = 1.0

    @property
    def width(self) -> int:
        return 1 if self.categories is None else len(self.categories) + 1  # + missing slot

    def describe(self) -> dict[str, Any]:
        if self.categories is None:
            return {"name": self.name, "kind": "numeric", "mean": self.mean, "std": self.std}
        return {"name": self.name, "kind": "categorical", "categories": self.categories}


def prepare_tabular(
    data: DataSpec,
    fmt: TabularFormat,
    source: Source,
    eval_source: Source | None,
    fs: pafs.FileSystem,
    root: str,
) -> dict[str, Any]:
    """Read the table(s), split, fit the encoding on the training rows, write shards; the
    manifest's body."""
    tables = [_limited(fmt.read(source), data.limit)]
    if eval_source is not None:
        tables.append(_limited(fmt.read(eval_source), data.limit))
    names = _feature_names(tables[0], data, source)
    for table, src in zip(tables, (source, eval_source), strict=False):
        assert src is not None
        _check_columns(table, [data.label_column, *names], data, src)
    table = pa.concat_tables([t.select([data.label_column, *names]) for t in tables])
    ids = np.arange(table.num_rows)
    in_eval = np.array([held_out(int(i), data.eval_fraction) for i in ids], dtype=bool)
    if eval_source is not None:
        in_eval = ids >= tables[0].num_rows
    if not (~in_eval).any():
        raise DataError(f"{source.uri}: no training rows after the split")
    labels, class_names = _labels(table.column(data.label_column), data.label_column, source)
    columns, parts = [], []
    for name in names:
        try:
            column, values = _encode(table.column(name), name, name in data.categorical, ~in_eval)
        except ValueError as exc:  # what is wrong with the column, said by _encode
            raise DataError(f"{source.uri}: {exc}") from None
        columns.append(column)
        parts.append(values)
    features = np.concatenate(parts, axis=1).astype(np.float32)
    writers = {
        s: ShardWriter(fs, f"{root}/{s}", tabular_schema(features.shape[1]), data.shard_rows)
        for s in ("train", "eval")
    }
    for i in ids:
        writers["eval" if in_eval[i] else "train"].add(int(i), features[i], int(labels[i]))
    return {
        "kind": "tabular",
        "splits": {s: w.close() for s, w in writers.items()},
        "tabular": {
            "label_column": data.label_column,
            "class_names": class_names,
            "num_classes": len(class_names),
            "num_features": features.shape[1],
            "columns": [c.describe() for c in columns],
        },
    }


# --------------------------------------------------------------------------- reading
def read_table(source: Source) -> pa.Table:
    """Every file of the source (CSV or Parquet, by suffix) as one table, on the driver."""
    tables = [_read_file(source, path) for path in source.files]
    first = tables[0].schema.names
    for path, table in zip(source.files[1:], tables[1:], strict=True):
        if table.schema.names != first:
            raise DataError(
                f"{path}: its columns differ from {source.files[0]}'s; every file of a "
                "tabular source needs the same columns"
            )
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as exc:
        raise DataError(f"{source.uri}: the files' column types disagree: {exc}") from None


def _read_file(source: Source, path: str) -> pa.Table:
    suffix = PurePosixPath(path).suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(source.filesystem.open_input_file(path))
        if suffix == ".csv":
            return _read_csv(source, path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable {suffix[1:]} table: {exc}") from None
    raise DataError(
        f"{path}: a tabular source holds {' or '.join(TABLE_SUFFIXES)} files, not {suffix!r}"
    )


def _read_csv(source: Source, path: str) -> pa.Table:
    with source.filesystem.open_input_stream(path) as f:
        raw = f.read()
    # Empty, NA, null... are missing values in text columns too, as in number columns.
    missing = pacsv.ConvertOptions(strings_can_be_null=True)
    try:
        return pacsv.read_csv(pa.BufferReader(raw), convert_options=missing)
    except pa.ArrowInvalid:
        # Types are guessed from the first block: a later text value in a column of numbers
        # fails the whole read. Read it as text then, so the column check can say where.
        names = pacsv.open_csv(pa.BufferReader(raw)).schema.names
        text = pacsv.ConvertOptions(
            column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=True
        )
        return pacsv.read_csv(pa.BufferReader(raw), convert_options=text)


def _limited(table: pa.Table, limit: int | None) -> pa.Table:
    return table if limit is None else table.slice(0, limit)


# --------------------------------------------------------------------------- checking
def _feature_names(table: pa.Table, data: DataSpec, source: Source) -> list[str]:
    if data.features is not None:
        return list(data.features)
    names = [n for n in table.schema.names if n != data.label_column]
    if not names:
        raise DataError(f"{source.uri}: no feature columns besides the label {data.label_column!r}")
    return names


def _check_columns(table: pa.Table, wanted: list[str], data: DataSpec, source: Source) -> None:
    have = table.schema.names
    label = data.label_column
    if label not in have:
        raise DataError(
            f"{source.uri}: no label column {label!r} (data.label_column){_nearest(label, have)}; "
            f"the columns are: {', '.join(have)}"
        )
    for field in ("features", "categorical"):
        missing = [c for c in getattr(data, field) or [] if c not in have]
        if missing:
            raise DataError(
                f"{source.uri}: data.{field} names {', '.join(map(repr, missing))}, which is not "
                f"a column{_nearest(missing[0], have)}; the columns are: {', '.join(have)}"
            )
    if table.num_rows == 0:
        raise DataError(f"{source.uri}: the table has no rows")


def _nearest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- encoding
def _labels(column: pa.ChunkedArray, name: str, source: Source) -> tuple[np.ndarray, list[str]]:
    """Label ids by sorted class; the class names as text."""
    if column.null_count:
        first = int(pc.index(pc.is_null(column), True).as_py())
        raise DataError(
            f"{source.uri}: {column.null_count} row(s) have no {name!r} (data.label_column), "
            f"the first is data row {first + 1}; drop or fill them"
        )
    values = column.to_numpy(zero_copy_only=False)
    # Sorted by value (numbers numerically), named as text in the manifest.
    classes, ids = np.unique(values, return_inverse=True)
    names = [_text(c) for c in classes.tolist()]
    if len(classes) < 2:
        raise DataError(
            f"{source.uri}: the label column {name!r} (data.label_column) has one class only "
            f"({names[0]!r}); a classifier needs two or more"
        )
    return ids.astype(np.int64), names


def _encode(
    column: pa.ChunkedArray, name: str, categorical: bool, train: np.ndarray
) -> tuple[_Column, np.ndarray]:
    """One feature column -> its description and its (rows, width) block of the vectors."""
    if categorical:
        values = [None if v is None else _text(v) for v in column.to_pylist()]
        categories = sorted({v for v, t in zip(values, train, strict=True) if t and v is not None})
        slot = {c: i for i, c in enumerate(categories)}
        block = np.zeros((len(values), len(categories) + 1), dtype=np.float32)
        for row, value in enumerate(values):
            at = len(categories) if value is None else slot.get(value)
            if at is not None:  # None: a category the training split never had
                block[row, at] = 1.0
        return _Column(name, categories=categories), block
    numbers = _numbers(column, name)
    seen = numbers[train][~np.isnan(numbers[train])]
    if seen.size == 0:
        raise ValueError(f"feature column {name!r} has no values in the training split")
    mean, std = float(seen.mean()), float(seen.std())
    std = std if std > 0 else 1.0
    scaled = np.where(np.isnan(numbers), 0.0, (numbers - mean) / std)
    return _Column(name, mean=mean, std=std), scaled[:, None]


def _numbers(column: pa.ChunkedArray, name: str) -> np.ndarray:
    """A numeric feature column as float64, NaN where a value is missing."""
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            column = pc.cast(column, pa.float64())
        except pa.ArrowInvalid:
            example = next(v for v in column.to_pylist() if v is not None and not _number(v))
            raise ValueError(
                f"feature column {name!r} holds text, such as {example!r}, among numbers; "
                "list it in data.categorical if it holds categories, or fix that value"
            ) from None
    elif not (
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_decimal(kind)
        or pa.types.is_null(kind)
    ):
        raise ValueError(
            f"feature column {name!r} is {kind}: neither numbers nor categories (data.categorical)"
        )
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False)


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _text(value: Any) -> str:
    # 1.0 and 1 are the same class; name it "1", as the file most likely wrote it.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
