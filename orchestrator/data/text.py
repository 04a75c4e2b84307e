"""Text sources -> a trained tokenizer and packed token shards, and the readers of text formats.

Each text format has two readers (see `formats.FORMATS`): one that yields the texts of one
file on the driver, for tokenizer training, and one that opens the source as a Ray Data
dataset with a "text" column, for tokenizing in parallel.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.data.shards import ShardWriter, held_out, text_schema, write_file
from orchestrator.data.sources import DataError, Source
from orchestrator.data.tokenizer import special_tokens, tokenizer_facts, train_tokenizer
from orchestrator.spec import DataSpec

if TYPE_CHECKING:
    import ray.data

    from orchestrator.data.formats import TextFormat

__all__ = [
    "decoded_lines",
    "jsonl_dataset",
    "jsonl_texts",
    "line_dataset",
    "line_texts",
    "parquet_dataset",
    "parquet_texts",
    "prepare_text",
    "texts",
    "tokenized",
]


def prepare_text(
    data: DataSpec,
    fmt: TextFormat,
    source: Source,
    eval_source: Source | None,
    fs: pafs.FileSystem,
    root: str,
) -> dict[str, Any]:
    """Train the tokenizer, tokenize with Ray Data, pack and write shards; the manifest's body."""
    if source.total_bytes == 0:
        raise DataError(f"{source.uri}: the corpus is empty")
    tok = train_tokenizer(data.tokenizer, texts(source, fmt, data))
    specials = special_tokens(tok)
    write_file(fs, f"{root}/tokenizer.json", tok.to_str())
    writers = {
        s: ShardWriter(fs, f"{root}/{s}", text_schema(data.seq_len), data.shard_rows)
        for s in ("train", "eval")
    }
    packer = _Packer(data.seq_len, specials.sep, specials.cls)
    # An eval source replaces the held-out share: every training sequence trains.
    fraction = 0.0 if eval_source is not None else data.eval_fraction
    next_id = 0
    tokens = {"train": 0, "eval": 0}
    for src, forced in ((source, None), (eval_source, "eval")):
        if src is None:
            continue
        for doc_ids in tokenized(src, fmt, data, tok.to_str()):
            for seq in packer.add(doc_ids):
                split = forced or ("eval" if held_out(next_id, fraction) else "train")
                writers[split].add(next_id, seq)
                tokens[split] += len(seq)
                next_id += 1
        packer.reset()  # never pack across the train and eval sources
    splits = {s: w.close() | {"tokens": tokens[s]} for s, w in writers.items()}
    if splits["train"]["rows"] == 0:
        raise DataError(
            f"{source.uri}: the corpus yields no full sequence of data.seq_len={data.seq_len} "
            f"tokens ({packer.seen} tokens in all); use more text or a smaller seq_len"
        )
    return {
        "kind": "text",
        "seq_len": data.seq_len,
        "splits": splits,
        "tokenizer": tokenizer_facts(tok, data.tokenizer.kind),
    }


def texts(source: Source, fmt: TextFormat, data: DataSpec) -> Iterator[str]:
    """Stream the records' text on the driver, for tokenizer training."""
    count = 0
    for path in source.files:
        for text in fmt.file_texts(source, path, data.text_column):
            yield text
            count += 1
            if data.limit is not None and count >= data.limit:
                return


def tokenized(
    src: Source, fmt: TextFormat, data: DataSpec, tokenizer_json: str
) -> Iterator[np.ndarray]:
    """Tokenize in parallel with Ray Data; yield each record's ids in source order."""
    import ray.data

    # Shards and splits must be deterministic, so keep source order here; the setting is
    # process-wide and training ingest (in the same driver) must not inherit it.
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield from _tokenized_in_order(src, fmt, data, tokenizer_json)
    finally:
        options.preserve_order = before


def _tokenized_in_order(
    src: Source, fmt: TextFormat, data: DataSpec, tokenizer_json: str
) -> Iterator[np.ndarray]:
    ds = fmt.dataset(src, data.text_column)
    if data.limit is not None:
        ds = ds.limit(data.limit)
    ds = ds.map_batches(
        _tokenize_batch,
        fn_kwargs={"tokenizer_json": tokenizer_json},
        batch_format="pyarrow",
        batch_size=1024,
    )
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        column = batch.column("ids").combine_chunks()
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy()
        for start, end in itertools.pairwise(offsets):
            yield values[start:end]


_TOKENIZERS: dict[int, Any] = {}


def _tokenize_batch(batch: pa.Table, tokenizer_json: str) -> pa.Table:
    from tokenizers import Tokenizer

    key = hash(tokenizer_json)
    if key not in _TOKENIZERS:  # one parse per worker process, not per batch
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = Tokenizer.from_str(tokenizer_json)
    texts = [t for t in batch.column("text").to_pylist() if t and t.strip()]
    encodings = _TOKENIZERS[key].encode_batch_fast(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int32, count=len(encodings))
    offsets = np.zeros(len(encodings) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int32, count=offsets[-1])
    return pa.table({"ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))})


class _Packer:
    """Concatenate documents (a separator after each) and cut fixed-length sequences.

    BERT-style vocabularies get `[CLS] ... [SEP]` around each sequence; GPT-style ones
    are cut as they are. Tokens left over at the end of a source are dropped.
    """

    def __init__(self, seq_len: int, sep: int, cls: int | None):
        self.sep, self.cls = sep, cls
        self.body = seq_len - 2 if cls is not None else seq_len
        self.buffer = np.empty(0, dtype=np.int32)
        self.seen = 0

    def add(self, ids: np.ndarray) -> Iterator[np.ndarray]:
        self.seen += len(ids)
        self.buffer = np.concatenate([self.buffer, ids, np.array([self.sep], dtype=np.int32)])
        while len(self.buffer) >= self.body:
            chunk, self.buffer = self.buffer[: self.body], self.buffer[self.body :]
            if self.cls is None:
                yield chunk
            else:
                yield np.concatenate([[self.cls], chunk, [self.sep]]).astype(np.int32)

    def reset(self) -> None:
        self.buffer = np.empty(0, dtype=np.int32)


# --------------------------------------------------------------------------- readers
# The texts of one file, as (source, path, text column) -> texts: the driver trains the
# tokenizer on them, one file at a time, without Ray.
def line_texts(source: Source, path: str, column: str) -> Iterator[str]:
    """Plain text: every non-blank line is a record (the column does not apply)."""
    for _, line in decoded_lines(source, path):
        if line.strip():
            yield line


def jsonl_texts(source: Source, path: str, column: str) -> Iterator[str]:
    """JSON lines: the string field `column` of every non-blank line's object."""
    for lineno, line in decoded_lines(source, path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get(column), str):
            raise DataError(f"{path}:{lineno}: no string field {column!r} (data.text_column)")
        yield record[column]


def parquet_texts(source: Source, path: str, column: str) -> Iterator[str]:
    """Parquet: the non-empty values of the string column `column`."""
    try:
        reader = pq.ParquetFile(source.filesystem.open_input_file(path))
        names = reader.schema_arrow.names
        if column not in names:  # pyarrow would fail with a bare IndexError
            raise DataError(
                f"{path}: no text column {column!r} (data.text_column); the columns are: "
                f"{', '.join(names)}. A table of features and a label is data.format: tabular, "
                "texts with labels data.format: labeled_text"
            )
        for batch in reader.iter_batches(columns=[column]):
            yield from (t for t in batch.column(0).to_pylist() if t)
    except (pa.ArrowInvalid, KeyError) as exc:
        raise DataError(f"{path}: cannot read text column {column!r}: {exc}") from None


def decoded_lines(source: Source, path: str) -> Iterator[tuple[int, str]]:
    """The lines of a text file, numbered from 1, decoded; DataError names a non-UTF-8 line."""
    with source.filesystem.open_input_stream(path) as f:
        for lineno, raw in enumerate(_lines(f), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not UTF-8 text") from None
            yield lineno, line


def _lines(f: Any, chunk: int = 1 << 20) -> Iterator[bytes]:
    rest = b""
    while block := f.read(chunk):
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


# The same records as a Ray Data dataset with one "text" column, as (source, text column)
# -> dataset: tokenizing runs in parallel on it.
def line_dataset(src: Source, column: str) -> ray.data.Dataset:
    import ray.data

    return ray.data.read_text(list(src.files), filesystem=src.filesystem)


def jsonl_dataset(src: Source, column: str) -> ray.data.Dataset:
    import ray.data

    ds = ray.data.read_json(list(src.files), filesystem=src.filesystem)
    return ds.select_columns([column]).rename_columns({column: "text"})


def parquet_dataset(src: Source, column: str) -> ray.data.Dataset:
    import ray.data

    ds = ray.data.read_parquet(list(src.files), filesystem=src.filesystem, columns=[column])
    return ds.rename_columns({column: "text"})
