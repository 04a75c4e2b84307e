"""Raw data -> cached, sharded Parquet: tokenized and packed text, or images with labels.

A prepared dataset lives in `<cache_dir>/<source>-<key>/` with `train/` and `eval/` shards,
`tokenizer.json` for text and `manifest.json`, which is written last: a directory without a
manifest is an interrupted preparation and is rebuilt, never used. The key hashes the source
fingerprint and every setting that changes the output, so a changed tokenizer or setting makes
a new entry instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.data.images import ImageSet, read_cifar, read_image_folder, read_mnist
from orchestrator.data.sources import DataError, Source, detect_format, find_source
from orchestrator.data.tokenizer import special_tokens, tokenizer_hash, train_tokenizer
from orchestrator.spec import DataSpec

__all__ = ["MANIFEST", "PreparedData", "image_schema", "prepare", "text_schema"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # bump when the shard layout changes, so old caches are not reused


@dataclass(frozen=True)
class PreparedData:
    """A prepared dataset: where its shards are and what its manifest says."""

    root: str
    filesystem: pafs.FileSystem
    manifest: dict[str, Any]

    def files(self, split: str) -> list[str]:
        """Shard paths of a split ("train" or "eval"); empty when there is none."""
        shards = self.manifest["splits"].get(split, {}).get("shards", [])
        return [f"{self.root}/{name}" if self.root else name for name in shards]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]


def text_schema(seq_len: int) -> pa.Schema:
    return pa.schema([("sample_id", pa.int64()), ("input_ids", pa.list_(pa.int32(), seq_len))])


def image_schema() -> pa.Schema:
    return pa.schema([("sample_id", pa.int64()), ("image", pa.binary()), ("label", pa.int64())])


def prepare(
    data: DataSpec,
    log: Callable[[str], None] = lambda _: None,
    ray_address: str | None = None,
    verbose: bool = False,
) -> PreparedData:
    """Prepare (or reuse from the cache) the dataset a `data` section describes.

    Ray is started (or joined at `ray_address`) only when text must be tokenized.
    """
    source = find_source(data.train)
    fmt = detect_format(source, data.format)
    eval_source = find_source(data.eval) if data.eval else None
    if fmt == "parquet" and _is_prepared(source):
        return _already_prepared(source, eval_source)
    settings = _settings(data, fmt)
    key = _cache_key(settings, source, eval_source, data)
    fs, cache_root = _cache_location(data.cache_dir)
    root = f"{cache_root}/{_slug(source.uri)}-{key[:16]}"
    manifest_path = f"{root}/{MANIFEST}"
    if fs.get_file_info(manifest_path).type == pafs.FileType.File:
        with fs.open_input_stream(manifest_path) as f:
            manifest = json.loads(f.read())
        log(f"reusing prepared data {root}")
        return PreparedData(root, fs, manifest)
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        fs.delete_dir(root)  # an interrupted earlier preparation
    log(f"preparing {source.uri} ({fmt}) into {root}")
    fs.create_dir(root, recursive=True)
    started = time.monotonic()
    if fmt in ("text", "jsonl", "parquet"):
        from orchestrator.ray_session import ray_session

        with ray_session(ray_address, verbose):
            manifest = _prepare_text(data, fmt, source, eval_source, fs, root)
    else:
        manifest = _prepare_images(data, fmt, source, eval_source, fs, root)
    manifest.update(
        version=FORMAT_VERSION,
        cache_key=key,
        format=fmt,
        source=source.uri,
        source_fingerprint=source.fingerprint,
        eval_source=eval_source.uri if eval_source else None,
        eval_fingerprint=eval_source.fingerprint if eval_source else None,
        settings=settings,
        seconds=round(time.monotonic() - started, 2),
    )
    _write(fs, manifest_path, json.dumps(manifest, indent=2))  # last: marks the entry complete
    log(
        f"prepared {manifest['splits']['train']['rows']} train / "
        f"{manifest['splits']['eval']['rows']} eval rows in {manifest['seconds']} s"
    )
    return PreparedData(root, fs, manifest)


# --------------------------------------------------------------------------- text
def _prepare_text(
    data: DataSpec,
    fmt: str,
    source: Source,
    eval_source: Source | None,
    fs: pafs.FileSystem,
    root: str,
) -> dict[str, Any]:
    if source.total_bytes == 0:
        raise DataError(f"{source.uri}: the corpus is empty")
    tok = train_tokenizer(data.tokenizer, _texts(source, fmt, data))
    specials = special_tokens(tok)
    _write(fs, f"{root}/tokenizer.json", tok.to_str())
    writers = {
        s: _ShardWriter(fs, f"{root}/{s}", text_schema(data.seq_len), data.shard_rows)
        for s in ("train", "eval")
    }
    packer = _Packer(data.seq_len, specials.sep, specials.cls)
    next_id = 0
    tokens = {"train": 0, "eval": 0}
    for src, forced in ((source, None), (eval_source, "eval")):
        if src is None:
            continue
        for doc_ids in _tokenized(src, fmt, data, tok.to_str()):
            for seq in packer.add(doc_ids):
                split = forced or ("eval" if _held_out(next_id, data.eval_fraction) else "train")
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
        "tokenizer": {
            "file": "tokenizer.json",
            "kind": data.tokenizer.kind,
            "hash": tokenizer_hash(tok),
            "vocab_size": specials.vocab_size,
            "pad_id": specials.pad,
            "sep_id": specials.sep,
            "cls_id": specials.cls,
            "mask_id": specials.mask,
        },
    }


def _texts(source: Source, fmt: str, data: DataSpec) -> Iterator[str]:
    """Stream the records' text on the driver, for tokenizer training."""
    count = 0
    for path in source.files:
        for text in _file_texts(source, path, fmt, data.text_column):
            yield text
            count += 1
            if data.limit is not None and count >= data.limit:
                return


def _file_texts(source: Source, path: str, fmt: str, column: str) -> Iterator[str]:
    if fmt == "parquet":
        try:
            reader = pq.ParquetFile(source.filesystem.open_input_file(path))
            for batch in reader.iter_batches(columns=[column]):
                yield from (t for t in batch.column(0).to_pylist() if t)
        except (pa.ArrowInvalid, KeyError) as exc:
            raise DataError(f"{path}: cannot read text column {column!r}: {exc}") from None
        return
    with source.filesystem.open_input_stream(path) as f:
        for lineno, raw in enumerate(_lines(f), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not UTF-8 text") from None
            if fmt == "text":
                if line.strip():
                    yield line
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get(column), str):
                raise DataError(f"{path}:{lineno}: no string field {column!r} (data.text_column)")
            yield record[column]


def _lines(f: Any, chunk: int = 1 << 20) -> Iterator[bytes]:
    rest = b""
    while block := f.read(chunk):
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _tokenized(src: Source, fmt: str, data: DataSpec, tokenizer_json: str) -> Iterator[np.ndarray]:
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
    src: Source, fmt: str, data: DataSpec, tokenizer_json: str
) -> Iterator[np.ndarray]:
    import ray.data

    if fmt == "text":
        ds = ray.data.read_text(list(src.files), filesystem=src.filesystem)
    elif fmt == "jsonl":
        ds = ray.data.read_json(list(src.files), filesystem=src.filesystem)
        ds = ds.select_columns([data.text_column]).rename_columns({data.text_column: "text"})
    else:
        ds = ray.data.read_parquet(
            list(src.files), filesystem=src.filesystem, columns=[data.text_column]
        )
        ds = ds.rename_columns({data.text_column: "text"})
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


# --------------------------------------------------------------------------- images
def _prepare_images(
    data: DataSpec,
    fmt: str,
    source: Source,
    eval_source: Source | None,
    fs: pafs.FileSystem,
    root: str,
) -> dict[str, Any]:
    sets = list(_image_sets(source, fmt))
    if eval_source is not None:
        sets += [_with_split(s, "eval") for s in _image_sets(eval_source, fmt)]
    first = sets[0]
    writers = {
        s: _ShardWriter(fs, f"{root}/{s}", image_schema(), data.shard_rows)
        for s in ("train", "eval")
    }
    next_id = 0
    for image_set in sets:
        n = len(image_set.images) if data.limit is None else min(data.limit, len(image_set.images))
        for i in range(n):
            split = image_set.split or (
                "eval" if _held_out(next_id, data.eval_fraction) else "train"
            )
            writers[split].add(next_id, image_set.images[i], int(image_set.labels[i]))
            next_id += 1
    splits = {s: w.close() for s, w in writers.items()}
    if splits["train"]["rows"] == 0:
        raise DataError(f"{source.uri}: no training images after the split")
    return {
        "kind": "image",
        "splits": splits,
        "image": {
            "encoding": first.encoding,
            "shape": list(first.shape) if first.shape else None,
            "num_classes": max(len(s.class_names) for s in sets),
            "class_names": first.class_names,
        },
    }


def _image_sets(source: Source, fmt: str) -> Iterator[ImageSet]:
    if fmt == "mnist":
        yield from read_mnist(source)
    elif fmt == "cifar":
        yield from read_cifar(source)
    else:
        base = source.uri if "://" not in source.uri else source.uri.split("://", 1)[1]
        yield read_image_folder(source, os.path.abspath(base) if "://" not in source.uri else base)


def _with_split(image_set: ImageSet, split: str) -> ImageSet:
    image_set.split = split
    return image_set


# --------------------------------------------------------------------------- shards
class _ShardWriter:
    """Write rows to part-NNNNN.parquet files of `rows` rows each."""

    def __init__(self, fs: pafs.FileSystem, root: str, schema: pa.Schema, rows: int):
        self.fs, self.root, self.schema, self.rows = fs, root, schema, rows
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
        name = f"part-{len(self.shards):05d}.parquet"
        pq.write_table(table, f"{self.root}/{name}", filesystem=self.fs)
        self.shards.append(f"{PurePosixPath(self.root).name}/{name}")
        self.total += len(self.pending)
        self.pending = []

    def close(self) -> dict[str, Any]:
        self._flush()
        return {"rows": self.total, "shards": self.shards}


# --------------------------------------------------------------------------- helpers
def _held_out(sample_id: int, fraction: float) -> bool:
    """A deterministic, well-mixed split by id (Knuth's multiplicative hash)."""
    return (((sample_id + 0x9E3779B9) * 2654435761) % 2**32) / 2**32 < fraction


def _settings(data: DataSpec, fmt: str) -> dict[str, Any]:
    keep = ["eval_fraction", "limit", "shard_rows"]
    if fmt in ("text", "jsonl", "parquet"):
        keep += ["text_column", "tokenizer", "seq_len"]
    return data.model_dump(mode="json", include=set(keep))


def _cache_key(
    settings: dict[str, Any], source: Source, eval_source: Source | None, data: DataSpec
) -> str:
    tokenizer_file = ""
    if data.tokenizer.kind == "file" and data.tokenizer.path:
        try:
            with open(data.tokenizer.path, "rb") as f:
                tokenizer_file = hashlib.sha256(f.read()).hexdigest()
        except OSError as exc:
            raise DataError(
                f"{data.tokenizer.path}: cannot read tokenizer: {exc.strerror}"
            ) from None
    payload = {
        "version": FORMAT_VERSION,
        "source": source.fingerprint,
        "eval": eval_source.fingerprint if eval_source else None,
        "settings": settings,
        "tokenizer_file": tokenizer_file,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _cache_location(cache_dir: str) -> tuple[pafs.FileSystem, str]:
    if "://" in cache_dir:
        fs, path = pafs.FileSystem.from_uri(cache_dir)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(cache_dir)


def _slug(uri: str) -> str:
    name = PurePosixPath(uri.rstrip("/").replace("*", "")).name or "data"
    return (
        "".join(c if c.isalnum() or c in "-_" else "-" for c in name.split(".")[0])[:40] or "data"
    )


def _write(fs: pafs.FileSystem, path: str, text: str) -> None:
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def _is_prepared(source: Source) -> bool:
    schema = _read_schema(source, source.files[0])
    return "input_ids" in schema.names or {"image", "label"} <= set(schema.names)


def _read_schema(source: Source, path: str) -> pa.Schema:
    try:
        return pq.read_schema(source.filesystem.open_input_file(path))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None


def _already_prepared(source: Source, eval_source: Source | None) -> PreparedData:
    """Shards prepared elsewhere (same columns as ours): used in place, described by a manifest."""
    schema = _read_schema(source, source.files[0])
    kind = "text" if "input_ids" in schema.names else "image"
    splits = {}
    for split, src in (("train", source), ("eval", eval_source)):
        rows = 0
        for path in src.files if src else ():
            with src.filesystem.open_input_file(path) as f:
                rows += pq.ParquetFile(f).metadata.num_rows
        splits[split] = {"rows": rows, "shards": list(src.files) if src else []}
    manifest: dict[str, Any] = {
        "kind": kind,
        "splits": splits,
        "source": source.uri,
        "source_fingerprint": source.fingerprint,
    }
    if kind == "text":
        field_type = schema.field("input_ids").type
        if not pa.types.is_fixed_size_list(field_type):
            raise DataError(
                f"{source.files[0]}: column input_ids must be a fixed-size list of int32 "
                f"(one packed sequence per row), not {field_type}"
            )
        manifest.update(seq_len=field_type.list_size, tokenizer=None)
    return PreparedData("", source.filesystem, manifest)
