"""Image sources -> image shards, and the readers of image formats.

Each of these image formats has a reader (see `formats.FORMATS`) that yields the source as
ImageSets: MNIST idx files and CIFAR python batches, small enough to read on the driver. Image
folders, which can be ImageNet-size, are prepared in parallel by `image_folder.py`.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow.fs as pafs

from orchestrator.data.shards import ShardWriter, held_out, image_schema
from orchestrator.data.sources import DataError, Source
from orchestrator.spec import DataSpec

if TYPE_CHECKING:
    from orchestrator.data.formats import ImageFormat

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageSet",
    "looks_like_cifar",
    "looks_like_mnist",
    "prepare_images",
    "read_cifar",
    "read_mnist",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class ImageSet:
    """Images as raw uint8 HWC pixels (`raw`) or as encoded files (`encoded`), with labels."""

    images: list[bytes]
    labels: np.ndarray  # int64
    encoding: str  # "raw" or "encoded"
    shape: tuple[int, int, int] | None  # (H, W, C) for raw pixels
    class_names: list[str]
    split: str | None = None  # "train" / "eval" when the source itself says so


def prepare_images(
    data: DataSpec,
    fmt: ImageFormat,
    source: Source,
    eval_source: Source | None,
    fs: pafs.FileSystem,
    root: str,
) -> dict[str, Any]:
    """Read the image sets, split them and write shards; the manifest's body."""
    sets = list(fmt.read(source))
    if eval_source is not None:
        sets += [_with_split(s, "eval") for s in fmt.read(eval_source)]
    first = sets[0]
    writers = {
        s: ShardWriter(fs, f"{root}/{s}", image_schema(), data.shard_rows)
        for s in ("train", "eval")
    }
    # An eval source replaces the held-out share: every training image trains.
    fraction = 0.0 if eval_source is not None else data.eval_fraction
    next_id = 0
    for image_set in sets:
        n = len(image_set.images) if data.limit is None else min(data.limit, len(image_set.images))
        for i in range(n):
            split = image_set.split or ("eval" if held_out(next_id, fraction) else "train")
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


def _with_split(image_set: ImageSet, split: str) -> ImageSet:
    image_set.split = split
    return image_set


# --------------------------------------------------------------------------- readers
def looks_like_mnist(names: list[str]) -> bool:
    """Whether these (lower-case) file names are MNIST's, for guessing the format."""
    return any("idx3-ubyte" in n for n in names)


def looks_like_cifar(names: list[str]) -> bool:
    """Whether these (lower-case) file names are CIFAR's, for guessing the format."""
    # CIFAR-10 ships data_batch_1..5 and test_batch; CIFAR-100 ships train, test and meta.
    cifar10 = any(n.startswith(("data_batch_", "test_batch")) for n in names)
    return cifar10 or {"train", "meta"} <= set(names)


def read_mnist(source: Source) -> Iterator[ImageSet]:
    """Pairs of *-images-idx3-ubyte[.gz] and *-labels-idx1-ubyte[.gz]; t10k is the eval split."""
    by_prefix: dict[str, dict[str, str]] = {}
    for path in source.files:
        name = PurePosixPath(path).name
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            if kind in name:
                prefix = name.split("-" + kind)[0].split("_" + kind)[0]
                by_prefix.setdefault(prefix, {})[kind] = path
    pairs = {p: k for p, k in by_prefix.items() if len(k) == 2}
    if not pairs:
        raise DataError(
            f"{source.uri}: no pair of MNIST images-idx3-ubyte and labels-idx1-ubyte files"
        )
    many = len(pairs) > 1
    for prefix, files in sorted(pairs.items()):
        images = _idx(source, files["images-idx3-ubyte"], ndim=3)
        labels = _idx(source, files["labels-idx1-ubyte"], ndim=1).astype(np.int64)
        if len(images) != len(labels):
            raise DataError(
                f"{files['images-idx3-ubyte']}: {len(images)} images but "
                f"{files['labels-idx1-ubyte']} has {len(labels)} labels"
            )
        _check_labels(labels, 10, files["labels-idx1-ubyte"])
        split = ("eval" if prefix.startswith("t10k") else "train") if many else None
        yield ImageSet(
            images=[img.tobytes() for img in images[..., None]],
            labels=labels,
            encoding="raw",
            shape=(images.shape[1], images.shape[2], 1),
            class_names=[str(i) for i in range(10)],
            split=split,
        )


def _idx(source: Source, path: str, ndim: int) -> np.ndarray:
    raw = _read(source, path)
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: not a valid gzip file: {exc}") from None
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: too short to be an idx file")
    zero, dtype, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08 or dims != ndim:
        raise DataError(f"{path}: not an idx file of {ndim}-d unsigned bytes (bad magic number)")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but the file holds {body.size} bytes")
    return body.reshape(shape)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what they contain so a bad file cannot run code."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar(source: Source) -> Iterator[ImageSet]:
    """CIFAR-10 (data_batch_*, test_batch) or CIFAR-100 (train, test) python batches."""
    names = {PurePosixPath(p).name: p for p in source.files}
    meta = names.get("batches.meta") or names.get("meta")
    class_names: list[str] = []
    if meta:
        info = _unpickle(source, meta)
        raw_names = info.get(b"label_names") or info.get(b"fine_label_names") or []
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw_names]
    groups = {
        "train": sorted(p for n, p in names.items() if n.startswith("data_batch") or n == "train"),
        "eval": sorted(p for n, p in names.items() if n.startswith("test_batch") or n == "test"),
    }
    if not groups["train"] and not groups["eval"]:
        raise DataError(f"{source.uri}: no CIFAR data_batch_*/test_batch or train/test files")
    for split, paths in groups.items():
        if not paths:
            continue
        images, labels = [], []
        for path in paths:
            batch = _unpickle(source, path)
            data = batch.get(b"data")
            lab = batch.get(b"labels", batch.get(b"fine_labels"))
            if data is None or lab is None:
                raise DataError(f"{path}: a CIFAR batch needs 'data' and 'labels' entries")
            data = np.asarray(data, dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072:
                raise DataError(f"{path}: expected data of shape (N, 3072), got {data.shape}")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(lab, dtype=np.int64))
        pixels = np.concatenate(images)
        all_labels = np.concatenate(labels)
        num_classes = len(class_names) or int(all_labels.max()) + 1
        _check_labels(all_labels, num_classes, paths[0])
        yield ImageSet(
            images=[img.tobytes() for img in np.ascontiguousarray(pixels)],
            labels=all_labels,
            encoding="raw",
            shape=(32, 32, 3),
            class_names=class_names or [str(i) for i in range(num_classes)],
            split=split if groups["train"] and groups["eval"] else None,
        )


def _unpickle(source: Source, path: str) -> dict:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(_read(source, path)), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: not a CIFAR python batch: {exc}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR python batch (a {type(obj).__name__}, not a dict)")
    return obj


def _check_labels(labels: np.ndarray, num_classes: int, path: str) -> None:
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(
            f"{path}: label {int(bad[0])} is out of range; labels must be in [0, {num_classes})"
        )


def _read(source: Source, path: str) -> bytes:
    # compression=None: pyarrow would otherwise gunzip *.gz behind our back.
    with source.filesystem.open_input_stream(path, compression=None) as f:
        return f.read()
