"""Raw data -> cached, sharded Parquet: tokenized and packed text, and images, tabular feature
vectors or tokenized texts with labels.

A prepared dataset lives in `<cache_dir>/<source>-<key>/`: `manifest.json`, written last
(atomically), names the `attempt-<id>/` directory holding `train/` and `eval/` shards and
`tokenizer.json` for text. An attempt without a manifest naming it is unfinished (or lost a race
to another preparation of the same data) and is never used; a damaged manifest is rebuilt.
The key hashes the source fingerprint and every setting that changes the output, so a changed
tokenizer or setting makes a new entry instead of reusing a stale one.

This module is the cache-keyed driver: `formats.FORMATS` says how each format is read,
`text.py`, `images.py`, `tabular.py` and `labeled_text.py` turn a source of their kind into
shards (`shards.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.data.formats import (
    COMMON_SETTINGS,
    FORMATS,
    Format,
    ImageFolderFormat,
    LabeledTextFormat,
    TabularFormat,
    TextFormat,
    detect_format,
)
from orchestrator.data.image_folder import prepare_image_folder
from orchestrator.data.images import prepare_images
from orchestrator.data.labeled_text import prepare_labeled_text
from orchestrator.data.shards import image_schema, text_schema, write_file
from orchestrator.data.sources import DataError, Source, filesystem_of, find_source
from orchestrator.data.tabular import prepare_tabular
from orchestrator.data.text import prepare_text
from orchestrator.spec import DataSpec

__all__ = ["MANIFEST", "PreparedData", "image_schema", "prepare", "text_schema"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 3  # bump when the shard layout or split changes, so old caches are not reused


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

    def tokenizer_json(self) -> str | None:
        """The prepared tokenizer.json's text; None for data without one."""
        name = (self.manifest.get("tokenizer") or {}).get("file")
        if not name:
            return None
        with self.filesystem.open_input_stream(f"{self.root}/{name}" if self.root else name) as f:
            return f.read().decode()


def prepare(
    data: DataSpec,
    log: Callable[[str], None] = lambda _: None,
    ray_address: str | None = None,
    verbose: bool = False,
) -> PreparedData:
    """Prepare (or reuse from the cache) the dataset a `data` section describes.

    Ray is started (or joined at `ray_address`) only when the work is more than one task.
    """
    source = find_source(data.train)
    fmt_name = detect_format(source, data.format)
    fmt = FORMATS[fmt_name]
    eval_source = find_source(data.eval) if data.eval else None
    if fmt.may_be_prepared and _is_prepared(source):
        return _already_prepared(source, eval_source)
    settings = _settings(data, fmt)
    key = _cache_key(settings, source, eval_source, data)
    fs, cache_root = _cache_location(data.cache_dir)
    root = f"{cache_root}/{_slug(source.uri)}-{key[:16]}"
    if (ready := _ready(fs, root, log)) is not None:
        log(f"reusing prepared data {ready.root}")
        return ready
    # Each preparation writes into a directory of its own and never deletes another's: two
    # preparations of one corpus at once both finish, and the first manifest wins.
    attempt = f"attempt-{secrets.token_hex(6)}"
    log(f"preparing {source.uri} ({fmt_name}) into {root}")
    try:
        fs.create_dir(f"{root}/{attempt}", recursive=True)
    except OSError as exc:  # a missing bucket, or credentials that may not write there
        from orchestrator.storage import storage_error

        raise DataError(storage_error(data.cache_dir, exc, "data.cache_dir")) from None
    started = time.monotonic()
    try:
        if isinstance(fmt, TextFormat):
            manifest = prepare_text(
                data, fmt, fmt_name, source, eval_source, fs, f"{root}/{attempt}",
                ray_address, verbose,
            )  # fmt: skip
        elif isinstance(fmt, ImageFolderFormat):
            manifest = prepare_image_folder(
                data, source, eval_source, fs, f"{root}/{attempt}", ray_address, verbose
            )
        elif isinstance(fmt, TabularFormat):
            manifest = prepare_tabular(data, fmt, source, eval_source, fs, f"{root}/{attempt}")
        elif isinstance(fmt, LabeledTextFormat):
            manifest = prepare_labeled_text(data, fmt, source, eval_source, fs, f"{root}/{attempt}")
        else:
            manifest = prepare_images(data, fmt, source, eval_source, fs, f"{root}/{attempt}")
    except BaseException:
        fs.delete_dir(f"{root}/{attempt}")  # an interrupted preparation leaves nothing behind
        raise
    manifest.update(
        version=FORMAT_VERSION,
        cache_key=key,
        format=fmt_name,
        source=source.uri,
        source_fingerprint=source.fingerprint,
        eval_source=eval_source.uri if eval_source else None,
        eval_fingerprint=eval_source.fingerprint if eval_source else None,
        settings=settings,
        seconds=round(time.monotonic() - started, 2),
        dir=attempt,
    )
    if (ready := _ready(fs, root, log)) is not None:  # another preparation finished first
        fs.delete_dir(f"{root}/{attempt}")
        log(f"using the same data prepared meanwhile in {ready.root}")
        return ready
    write_file(fs, f"{root}/{MANIFEST}", json.dumps(manifest, indent=2))  # last: marks it done
    log(
        f"prepared {manifest['splits']['train']['rows']} train / "
        f"{manifest['splits']['eval']['rows']} eval rows in {manifest['seconds']} s"
    )
    return PreparedData(f"{root}/{attempt}", fs, manifest)


def _ready(fs: pafs.FileSystem, root: str, log: Callable[[str], None]) -> PreparedData | None:
    """The finished preparation in `root`, if any. A damaged manifest (cut short, edited) is
    reported and ignored, so the data is prepared again instead of every run failing."""
    path = f"{root}/{MANIFEST}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        text = f.read()
    try:
        manifest = json.loads(text)
        rows = manifest["splits"]["train"]["rows"]
        folder = manifest.get("dir", "")
        if not isinstance(rows, int) or not isinstance(folder, str) or "/" in folder:
            raise ValueError(path)
    except (ValueError, KeyError, TypeError):
        log(f"warning: {path} is damaged (cut short or edited); preparing the data again")
        return None
    # Caches from before attempt directories hold their shards in `root` itself.
    return PreparedData(f"{root}/{folder}" if folder else root, fs, manifest)


# --------------------------------------------------------------------------- cache
def _settings(data: DataSpec, fmt: Format) -> dict[str, Any]:
    """The settings that change the shards: part of the cache key, recorded in the manifest."""
    return data.model_dump(mode="json", include={*COMMON_SETTINGS, *fmt.settings})


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
    # A label file is data too: an edited one must not reuse the shards of the old.
    labels = find_source(data.eval_labels).fingerprint if data.eval_labels else None
    payload = {
        "version": FORMAT_VERSION,
        "eval_labels": labels,
        "source": source.fingerprint,
        "eval": eval_source.fingerprint if eval_source else None,
        "settings": settings,
        "tokenizer_file": tokenizer_file,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _cache_location(cache_dir: str) -> tuple[pafs.FileSystem, str]:
    if "://" in cache_dir:
        fs, path = filesystem_of(cache_dir, "data.cache_dir")
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(cache_dir)


def _slug(uri: str) -> str:
    name = PurePosixPath(uri.rstrip("/").replace("*", "")).name or "data"
    return (
        "".join(c if c.isalnum() or c in "-_" else "-" for c in name.split(".")[0])[:40] or "data"
    )


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
        if src is not None:
            for path in src.files:
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
