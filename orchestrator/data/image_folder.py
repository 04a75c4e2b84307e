"""Image folders at ImageNet scale -> encoded image shards, written in parallel.

The layout is one sub-folder per class (ImageNet's `train/<wnid>/*.JPEG`). Classes are numbered
in sorted order and listed in the manifest. An eval source is either the same layout (its
classes must be training classes) or a flat folder with a label file (`data.eval_labels`, as
ImageNet ships its validation split).

The driver lists the files (names and sizes only) and cuts the list into batches of about one
shard; each batch is one Ray Data task that reads its images, checks that each decodes, and
writes its shards. So the driver's memory grows with the number of files, never with their
bytes. A sample id is the image's position in the sorted listing (train first, then eval).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from orchestrator.data.images import IMAGE_SUFFIXES
from orchestrator.data.parallel import merged_splits, run_tasks
from orchestrator.data.shards import ShardWriter, held_out, image_schema
from orchestrator.data.sources import DataError, Source, find_source
from orchestrator.spec import DataSpec

__all__ = ["ImageBatch", "ImageJob", "prepare_image_folder", "write_image_batch"]

BATCH_BYTES = 256 << 20  # at most this many image bytes in one task (ImageNet: ~2,300 images)
_SHOWN = 20  # skipped images named in the manifest


@dataclass(frozen=True)
class ImageBatch:
    index: int
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    first_id: int  # sample ids run first_id, first_id + 1, ... (with gaps where skipped)


@dataclass(frozen=True)
class ImageJob:
    source_fs: pafs.FileSystem
    out_fs: pafs.FileSystem
    root: str
    shard_rows: int
    eval_fraction: float  # 1.0 for an eval source
    skip_bad: bool


def prepare_image_folder(
    data: DataSpec,
    source: Source,
    eval_source: Source | None,
    fs: pafs.FileSystem,
    root: str,
    ray_address: str | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """List the folders, write shards batch by batch on the cluster; the manifest's body."""
    classes, train_paths, train_labels = _class_folders(source, known=None)
    paths, labels = _limited(train_paths, train_labels, data.limit)
    batches = _batches(paths, labels, source.sizes, source.files, data.shard_rows, 0, 0)
    fraction = 0.0 if eval_source is not None else data.eval_fraction
    reports = run_tasks(
        write_image_batch,
        batches,
        ImageJob(source.filesystem, fs, root, data.shard_rows, fraction, data.skip_bad_images),
        address=ray_address,
        verbose=verbose,
    )
    if eval_source is not None:
        if data.eval_labels is not None:
            eval_paths, eval_labels = _labelled_folder(eval_source, data.eval_labels, classes)
        else:
            _, eval_paths, eval_labels = _class_folders(eval_source, known=classes)
        eval_paths, eval_labels = _limited(eval_paths, eval_labels, data.limit)
        eval_batches = _batches(
            eval_paths, eval_labels, eval_source.sizes, eval_source.files, data.shard_rows,
            len(batches), len(train_paths),
        )  # fmt: skip
        job = ImageJob(eval_source.filesystem, fs, root, data.shard_rows, 1.0, data.skip_bad_images)
        reports += run_tasks(
            write_image_batch, eval_batches, job, address=ray_address, verbose=verbose
        )
    splits = merged_splits(reports)
    if splits["train"]["rows"] == 0:
        raise DataError(f"{source.uri}: no training images after the split")
    skipped = [path for r in reports for path in r["skipped"]]
    return {
        "kind": "image",
        "splits": splits,
        "image": {
            "encoding": "encoded",
            "shape": None,
            "num_classes": len(classes),
            "class_names": classes,
        },
        "skipped_images": {"count": len(skipped), "first": skipped[:_SHOWN]},
    }


# --------------------------------------------------------------------------- listing (driver)
def _class_folders(
    source: Source, known: list[str] | None
) -> tuple[list[str], list[str], list[int]]:
    """Classes (sorted), and every image's path and label, in sorted path order."""
    base = _base(source)
    by_class: dict[str, list[str]] = {}
    for path in source.files:
        if PurePosixPath(path).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rel = PurePosixPath(path[len(base) :].lstrip("/"))
        if len(rel.parts) < 2:
            raise DataError(f"{path}: images must sit in one sub-folder per class under {base}")
        by_class.setdefault(rel.parts[0], []).append(path)
    if not by_class:
        raise DataError(f"{source.uri}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    for info in source.filesystem.get_file_info(pafs.FileSelector(base)):
        name = PurePosixPath(info.path).name
        if info.type == pafs.FileType.Directory and name not in by_class and name[0] not in "._":
            raise DataError(
                f"{info.path}: class folder without images ({', '.join(IMAGE_SUFFIXES)}); "
                "remove it or add its images"
            )
    classes = sorted(by_class)
    if known is not None:
        strays = [c for c in classes if c not in known]
        if strays:
            raise DataError(
                f"{source.uri}: eval classes {strays[:5]} are not among the "
                f"{len(known)} training classes (folders of data.train)"
            )
    index = {c: i for i, c in enumerate(known if known is not None else classes)}
    paths = [p for c in classes for p in by_class[c]]
    labels = [index[c] for c in classes for _ in by_class[c]]
    return classes, paths, labels


def _labelled_folder(
    source: Source, label_file: str, classes: list[str]
) -> tuple[list[str], list[int]]:
    """A flat folder of images and a file of `image,class` lines (or `image class`); the image
    named by its file name or its stem, the class by the first word of the second field (as in
    ImageNet's LOC_val_solution.csv)."""
    images = [p for p in source.files if PurePosixPath(p).suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise DataError(f"{source.uri}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    by_name: dict[str, str] = {}
    for path in images:
        name = PurePosixPath(path)
        by_name[name.name] = path
        by_name.setdefault(name.stem, path)
    index = {c: i for i, c in enumerate(classes)}
    labelled: dict[str, int] = {}
    labels_source = find_source(label_file)
    with labels_source.filesystem.open_input_stream(labels_source.files[0]) as f:
        text = f.read()
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{label_file}: not UTF-8 text (data.eval_labels)") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("," if "," in line else "\t" if "\t" in line else None, 1)
        if len(fields) < 2 or not fields[1].split():
            raise DataError(f"{label_file}:{lineno}: expected 'image,class' (data.eval_labels)")
        image, label = fields[0].strip(), fields[1].split()[0]
        if label not in index:
            if lineno == 1:
                continue  # a header line, such as ImageId,PredictionString
            raise DataError(
                f"{label_file}:{lineno}: class {label!r} is not among the {len(classes)} "
                "training classes (folders of data.train)"
            )
        if image not in by_name:
            raise DataError(
                f"{label_file}:{lineno}: names image {image!r}, which is not in {source.uri}"
            )
        labelled[by_name[image]] = index[label]
    missing = [p for p in images if p not in labelled]
    if missing:
        raise DataError(
            f"{missing[0]}: has no label in {label_file} (data.eval_labels); "
            f"{len(missing)} image(s) of {source.uri} have none"
        )
    return images, [labelled[p] for p in images]


def _limited(paths: list[str], labels: list[int], limit: int | None) -> tuple[list[str], list[int]]:
    """`data.limit` images spread evenly over the sorted listing, so every class keeps some."""
    if limit is None or limit >= len(paths):
        return paths, labels
    picked = np.unique(np.linspace(0, len(paths) - 1, limit).astype(np.int64))
    return [paths[i] for i in picked], [labels[i] for i in picked]


def _batches(
    paths: list[str],
    labels: list[int],
    sizes: tuple[int, ...],
    files: tuple[str, ...],
    rows: int,
    first_index: int,
    first_id: int,
) -> list[ImageBatch]:
    size_of = dict(zip(files, sizes, strict=True))
    batches: list[ImageBatch] = []
    start = 0
    while start < len(paths):
        end, total = start, 0
        while end < len(paths) and end - start < rows and (end == start or total < BATCH_BYTES):
            total += size_of.get(paths[end], 0)
            end += 1
        batches.append(
            ImageBatch(
                first_index + len(batches),
                tuple(paths[start:end]),
                tuple(labels[start:end]),
                first_id + start,
            )
        )
        start = end
    return batches


def _base(source: Source) -> str:
    """The folder the user named: classes are the first folders below it."""
    if "://" in source.uri:
        return source.uri.split("://", 1)[1].rstrip("/")
    return os.path.abspath(source.uri)


# --------------------------------------------------------------------------- one batch (task)
def write_image_batch(batch: ImageBatch, job: ImageJob) -> dict[str, Any]:
    """Read, check and write one batch of images; report the shards and the skipped files."""
    prefix = f"part-{batch.index:05d}-"
    writers = {
        s: ShardWriter(job.out_fs, f"{job.root}/{s}", image_schema(), job.shard_rows, prefix)
        for s in ("train", "eval")
    }
    skipped: list[str] = []
    for offset, (path, label) in enumerate(zip(batch.paths, batch.labels, strict=True)):
        sample_id = batch.first_id + offset
        encoded, problem = _read_checked(job.source_fs, path)
        if problem is not None:
            if not job.skip_bad:
                raise DataError(
                    f"{path}: {problem}; set data.skip_bad_images: true to skip such files "
                    "(they are counted in the manifest)"
                )
            skipped.append(path)
            continue
        split = "eval" if held_out(sample_id, job.eval_fraction) else "train"
        writers[split].add(sample_id, encoded, label)
    return {
        "batch": batch.index,
        "skipped": skipped,
        **{s: w.close() for s, w in writers.items()},
    }


def _read_checked(fs: pafs.FileSystem, path: str) -> tuple[bytes, str | None]:
    """The file's bytes, and what is wrong with it if it does not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        # compression=None: pyarrow would otherwise gunzip *.gz behind our back.
        with fs.open_input_stream(path, compression=None) as f:
            encoded = f.read()
    except OSError as exc:
        return b"", f"cannot be read ({exc})"
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            # A JPEG decodes at 1/8 scale through its DCT: every byte is still checked (a cut
            # or damaged file fails) at a fraction of a full decode's cost.
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return b"", f"not a readable image ({exc})"
    return encoded, None
