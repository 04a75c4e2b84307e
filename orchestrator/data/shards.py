"""The shard layout prepare writes: row schemas, fixed-size Parquet shards and the split rule."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.files import write_atomic

__all__ = ["ShardWriter", "held_out", "image_schema", "tabular_schema", "text_schema", "write_file"]


def text_schema(seq_len: int) -> pa.Schema:
    return pa.schema([("sample_id", pa.int64()), ("input_ids", pa.list_(pa.int32(), seq_len))])


def image_schema() -> pa.Schema:
    return pa.schema([("sample_id", pa.int64()), ("image", pa.binary()), ("label", pa.int64())])


def tabular_schema(num_features: int) -> pa.Schema:
    return pa.schema(
        [
            ("sample_id", pa.int64()),
            ("features", pa.list_(pa.float32(), num_features)),
            ("label", pa.int64()),
        ]
    )


class ShardWriter:
    """Write rows to <prefix>NNNNN.parquet files of `rows` rows each."""

    def __init__(
        self, fs: pafs.FileSystem, root: str, schema: pa.Schema, rows: int, prefix: str = "part-"
    ):
        self.fs, self.root, self.schema, self.rows = fs, root, schema, rows
        self.prefix = prefix  # one per writer when several write into one directory
        self.pending: list[tuple[Any, ...]] = []
        self.shards: list[str] = []
        self.total = 0
        fs.create_dir(root, recursive=True)

    def add(self, *row: Any) -> None:
        self.pending.append(row)
        if len(self.pending) >= self.rows:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        columns = list(zip(*self.pending, strict=True))
        arrays = []
        for field, values in zip(self.schema, columns, strict=True):
            if pa.types.is_fixed_size_list(field.type):
                flat = pa.array(np.concatenate(values), type=field.type.value_type)
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, field.type.list_size))
            else:
                arrays.append(pa.array(values, type=field.type))
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        name = f"{self.prefix}{len(self.shards):05d}.parquet"
        pq.write_table(table, f"{self.root}/{name}", filesystem=self.fs)
        self.shards.append(f"{PurePosixPath(self.root).name}/{name}")
        self.total += len(self.pending)
        self.pending = []

    def close(self) -> dict[str, Any]:
        self._flush()
        return {"rows": self.total, "shards": self.shards}


def held_out(sample_id: int, fraction: float) -> bool:
    """A deterministic, well-mixed split by id (Knuth's multiplicative hash)."""
    return (((sample_id + 0x9E3779B9) * 2654435761) % 2**32) / 2**32 < fraction


def write_file(fs: pafs.FileSystem, path: str, text: str) -> None:
    """Write a small file whole or not at all: an object store's put is atomic already, a local
    file is written beside and renamed."""
    if isinstance(fs, pafs.LocalFileSystem):
        write_atomic(path, text)
        return
    with fs.open_output_stream(path) as f:
        f.write(text.encode())
