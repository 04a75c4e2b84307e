"""Text sources -> a trained tokenizer and packed token shards, and the readers of text formats.

The corpus is cut into chunks (`chunks.py`); each chunk is read, tokenized, packed and written
to shards of its own by one task, on whichever node of the cluster Ray Data puts it, and the
driver gathers only what the tasks report (rows, tokens, shard names). The tokenizer is trained
on the driver beforehand, on a bounded sample spread evenly over the chunks
(`data.tokenizer.sample_mb`), so neither step holds the corpus in one process.

A sample id is the chunk's index in its high 32 bits and the sequence's number within the chunk
in the low ones: unique and the same however many nodes prepare the data, without the chunks
waiting on each other to count.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.data.chunks import Chunk, Piece, line_count_before, lines_of
from orchestrator.data.parallel import merged_splits, run_tasks
from orchestrator.data.shards import ShardWriter, held_out, text_schema, write_file
from orchestrator.data.sources import DataError, Source
from orchestrator.data.tokenizer import special_tokens, tokenizer_facts, train_tokenizer
from orchestrator.spec import DataSpec

if TYPE_CHECKING:
    from orchestrator.data.formats import TextFormat

__all__ = [
    "TextJob",
    "decoded_lines",
    "jsonl_records",
    "line_records",
    "parquet_records",
    "prepare_chunk",
    "prepare_text",
    "tokenizer_sample",
]

_BATCH = 1024  # records tokenized at once
CHUNK_ID_BITS = 32  # a sample id: chunk index << 32 | sequence number in the chunk


@dataclass(frozen=True)
class TextJob:
    """What every chunk task needs: small, and pickled once per task."""

    format: str  # a key of formats.FORMATS (its functions are looked up on the worker)
    column: str
    seq_len: int
    shard_rows: int
    eval_fraction: float
    tokenizer_json: str
    source_fs: pafs.FileSystem
    out_fs: pafs.FileSystem
    root: str


def prepare_text(
    data: DataSpec,
    fmt: TextFormat,
    fmt_name: str,
    source: Source,
    eval_source: Source | None,
    fs: pafs.FileSystem,
    root: str,
    ray_address: str | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Train the tokenizer on a sample, then tokenize, pack and write shards chunk by chunk."""
    if source.total_bytes == 0:
        raise DataError(f"{source.uri}: the corpus is empty")
    chunk_bytes = max(1, int(data.chunk_mb * 2**20))
    train_chunks = fmt.chunks(source, chunk_bytes, 0)
    eval_chunks = (
        fmt.chunks(eval_source, chunk_bytes, len(train_chunks)) if eval_source is not None else []
    )
    started = time.monotonic()
    tok = train_tokenizer(
        data.tokenizer, tokenizer_sample(source.filesystem, fmt, train_chunks, data)
    )
    tokenizer_json = tok.to_str()
    write_file(fs, f"{root}/tokenizer.json", tokenizer_json)
    trained = time.monotonic()

    def job(src: Source, fraction: float) -> TextJob:
        return TextJob(
            fmt_name, data.text_column, data.seq_len, data.shard_rows, fraction, tokenizer_json,
            src.filesystem, fs, root,
        )  # fmt: skip

    # An eval source replaces the held-out share: every training sequence trains.
    train_job = job(source, 0.0 if eval_source is not None else data.eval_fraction)
    reports = _run(train_job, train_chunks, data.limit, ray_address, verbose)
    if eval_source is not None:
        reports += _run(job(eval_source, 1.0), eval_chunks, data.limit, ray_address, verbose)
    splits = merged_splits(reports, counts=("tokens",))
    if splits["train"]["rows"] == 0:
        seen = sum(r["tokens_seen"] for r in reports)
        raise DataError(
            f"{source.uri}: the corpus yields no full sequence of data.seq_len={data.seq_len} "
            f"tokens ({seen} tokens in all); use more text or a smaller seq_len"
        )
    nodes: dict[str, int] = {}
    for r in reports:
        nodes[r["node"]] = nodes.get(r["node"], 0) + 1
    return {
        "kind": "text",
        "seq_len": data.seq_len,
        "splits": splits,
        "tokenizer": tokenizer_facts(tok, data.tokenizer.kind),
        "chunks": len(reports),
        "chunks_by_node": dict(sorted(nodes.items())),
        "timings": {
            "tokenizer_s": round(trained - started, 2),
            "chunks_s": round(time.monotonic() - trained, 2),
        },
    }


def _run(
    job: TextJob, chunks: list[Chunk], limit: int | None, address: str | None, verbose: bool
) -> list[dict[str, Any]]:
    if limit is None:
        return run_tasks(prepare_chunk, chunks, job, address=address, verbose=verbose)
    # `data.limit` takes the first records in source order: a sample small enough for this
    # process, read chunk after chunk until it is full.
    reports = []
    for chunk in chunks:
        if limit <= 0:
            break
        reports.append(prepare_chunk(chunk, job, max_records=limit))
        limit -= reports[-1]["records"]
    return reports


def tokenizer_sample(
    fs: pafs.FileSystem, fmt: TextFormat, chunks: list[Chunk], data: DataSpec
) -> Iterator[str]:
    """The texts the tokenizer learns from: with `data.limit`, the records used; otherwise
    the first `sample_mb / len(chunks)` of every chunk, the whole corpus if it is smaller."""
    if data.limit is not None:
        left = data.limit
        for chunk in chunks:
            for text in _chunk_texts(fs, fmt, chunk, data.text_column):
                if left <= 0:
                    return
                left -= 1
                yield text
        return
    budget = int(data.tokenizer.sample_mb * 2**20) // max(1, len(chunks))
    for chunk in chunks:
        taken = 0
        for text in _chunk_texts(fs, fmt, chunk, data.text_column):
            if taken >= budget:
                break
            taken += len(text)
            yield text


def _chunk_texts(fs: pafs.FileSystem, fmt: TextFormat, chunk: Chunk, column: str) -> Iterator[str]:
    for piece in chunk.pieces:
        yield from fmt.records(fs, piece, column)


def prepare_chunk(chunk: Chunk, job: TextJob, max_records: int | None = None) -> dict[str, Any]:
    """Read, tokenize, pack and write one chunk's shards; report what was written (a task)."""
    from tokenizers import Tokenizer

    from orchestrator.data.formats import FORMATS

    fmt = FORMATS[job.format]
    assert fmt.kind == "text"
    tok = Tokenizer.from_str(job.tokenizer_json)
    specials = special_tokens(tok)
    packer = _Packer(job.seq_len, specials.sep, specials.cls)
    prefix = f"part-{chunk.index:05d}-"
    writers = {
        s: ShardWriter(job.out_fs, f"{job.root}/{s}", text_schema(job.seq_len), job.shard_rows,
                       prefix=prefix)
        for s in ("train", "eval")
    }  # fmt: skip
    tokens = {"train": 0, "eval": 0}
    local = records = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal local
        encodings = tok.encode_batch_fast(batch, add_special_tokens=False)
        batch.clear()
        for seq in packer.add([e.ids for e in encodings]):
            sample_id = chunk.index << CHUNK_ID_BITS | local
            split = "eval" if held_out(sample_id, job.eval_fraction) else "train"
            writers[split].add(sample_id, seq)
            tokens[split] += len(seq)
            local += 1

    for text in _chunk_texts(job.source_fs, fmt, chunk, job.column):
        if max_records is not None and records >= max_records:
            break
        batch.append(text)
        records += 1
        if len(batch) >= _BATCH:
            flush()
    flush()
    return {
        "chunk": chunk.index,
        "node": _node_id(),
        "records": records,
        "tokens_seen": packer.seen,
        **{s: w.close() | {"tokens": tokens[s]} for s, w in writers.items()},
    }


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


class _Packer:
    """Concatenate documents (a separator after each) and cut fixed-length sequences.

    BERT-style vocabularies get `[CLS] ... [SEP]` around each sequence; GPT-style ones
    are cut as they are. Tokens left over at the end of a chunk are dropped. A batch of
    documents is packed at once, in numpy: documents are often a line of a dozen tokens, and
    a step of Python per document cost more than the tokenizing.
    """

    def __init__(self, seq_len: int, sep: int, cls: int | None):
        self.sep, self.cls = sep, cls
        self.body = seq_len - 2 if cls is not None else seq_len
        self.buffer = np.empty(0, dtype=np.int32)
        self.seen = 0

    def add(self, docs: list[list[int]]) -> np.ndarray:
        """The full sequences that this batch of documents completes, one per row."""
        lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        total = int(lengths.sum())
        self.seen += total
        flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int32, count=total)
        # a separator after each document: insert before where the next one starts
        flat = np.insert(flat, np.cumsum(lengths), self.sep).astype(np.int32, copy=False)
        self.buffer = np.concatenate([self.buffer, flat])
        count = len(self.buffer) // self.body
        rows = self.buffer[: count * self.body].reshape(count, self.body)
        self.buffer = self.buffer[count * self.body :].copy()
        if self.cls is None:
            return rows
        framed = np.empty((count, self.body + 2), dtype=np.int32)
        framed[:, 0], framed[:, 1:-1], framed[:, -1] = self.cls, rows, self.sep
        return framed


# --------------------------------------------------------------------------- readers
# The records of one piece of a chunk, as (filesystem, piece, text column) -> texts.
def line_records(fs: pafs.FileSystem, piece: Piece, column: str) -> Iterator[str]:
    """Plain text: every non-blank line is a record (the column does not apply)."""
    for _, line in _decoded(fs, piece):
        if line.strip():
            yield line


def jsonl_records(fs: pafs.FileSystem, piece: Piece, column: str) -> Iterator[str]:
    """JSON lines: the string field `column` of every non-blank line's object."""
    for offset, line in _decoded(fs, piece):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            where = _line_at(fs, piece.path, offset)
            raise DataError(f"{where}: invalid JSON: {exc.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get(column), str):
            where = _line_at(fs, piece.path, offset)
            raise DataError(f"{where}: no string field {column!r} (data.text_column)")
        yield record[column]


def parquet_records(fs: pafs.FileSystem, piece: Piece, column: str) -> Iterator[str]:
    """Parquet: the non-empty values of the string column `column` in one row group."""
    try:
        with fs.open_input_file(piece.path) as f:
            reader = pq.ParquetFile(f)
            names = reader.schema_arrow.names
            if column not in names:  # pyarrow would fail with a bare IndexError
                raise DataError(
                    f"{piece.path}: no text column {column!r} (data.text_column); the columns "
                    f"are: {', '.join(names)}. A table of features and a label is data.format: "
                    "tabular, texts with labels data.format: labeled_text"
                )
            group = reader.read_row_group(piece.row_group or 0, columns=[column])
    except (pa.ArrowInvalid, KeyError, OSError) as exc:
        raise DataError(f"{piece.path}: cannot read text column {column!r}: {exc}") from None
    values = group.column(0)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise DataError(
            f"{piece.path}: column {column!r} (data.text_column) holds {values.type}, not text"
        )
    yield from (t for t in values.to_pylist() if t)


def _decoded(fs: pafs.FileSystem, piece: Piece) -> Iterator[tuple[int, str]]:
    for offset, raw in lines_of(fs, piece):
        try:
            yield offset, raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{_line_at(fs, piece.path, offset)}: not UTF-8 text") from None


def _line_at(fs: pafs.FileSystem, path: str, offset: int) -> str:
    return f"{path}:{line_count_before(fs, path, offset) + 1}"


def decoded_lines(source: Source, path: str) -> Iterator[tuple[int, str]]:
    """The lines of a whole text file, numbered from 1, decoded; DataError names a bad line."""
    size = source.sizes[source.files.index(path)] if path in source.files else 1 << 62
    for lineno, (_, line) in enumerate(_decoded(source.filesystem, Piece(path, 0, size)), 1):
        yield lineno, line
