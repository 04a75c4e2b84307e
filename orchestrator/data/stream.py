"""Streaming prepared shards to training workers with Ray Data.

The driver builds one lazy `read_parquet` Dataset per split; Ray Train splits each across
the workers as a stream (`streaming_split`, equal rows per worker so DDP stays in lockstep),
so no worker and no driver ever holds a split whole. Order is seeded twice: the file order
is reshuffled for every epoch (`FileShuffleConfig`, reseeded per execution) and each worker
shuffles rows through a local buffer seeded with `seed + epoch`.

The shards are read through Ray Data's first Parquet datasource (V1), not Ray 2.60's default
(V2): V2 lists the files in a task of its own at every execution, which needs a free CPU, so
each epoch, evaluation and sweep trial waited seconds for its first batch
(bench/ray_data_read.py, 2 cores: a trial's first batch 0.7 s against 4.2 s, a new epoch's
0.6 s against 3.1 s). V1's read errors do not name the file; `unreadable_shard` finds it after
a read has failed.

Batch transforms run on the worker, on whole batches: image decoding in the collate step
(orchestrator/data/collate.py, in Ray's prefetch threads), MLM masking and image augmentation
in the loop on the worker's device (vectorized, no loop per sample), while a Ray Data
`map_batches` stage needs CPUs that Ray Train has reserved for its workers and moves a second
column through the object store. Measured for MLM masking (bench/data_pipeline.py, 2 cores):
masking in the worker streams at 1.02x the rate of no masking, a map_batches stage at 0.79x
of that.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from orchestrator.data.labeled_text import labeled_text_schema
from orchestrator.data.prepare import PreparedData, image_schema
from orchestrator.data.shards import tabular_schema
from orchestrator.data.sources import DataError

if TYPE_CHECKING:
    from orchestrator.data.folds import Fold

__all__ = [
    "Batch",
    "Feed",
    "ImageDecoding",
    "StartedEarly",
    "check_shards",
    "decode_images",
    "decode_to_uint8",
    "epoch_batches",
    "eval_batches",
    "ingest_config",
    "ingest_options",
    "mask_tokens",
    "open_splits",
    "read_failed",
    "to_float_images",
    "unreadable_shard",
]

T = TypeVar("T")


def open_splits(
    prepared: PreparedData, seed: int, shuffle: bool = True, fold: Fold | None = None
) -> dict[str, Any]:
    """Lazy Ray Datasets for the train (and, if present, eval) shards.

    With a cross-validation `fold`, both come from the training shards, filtered as they are
    read: train is every other fold, eval this one (the eval shards are not read).
    """
    import ray.data
    from ray.data import FileShuffleConfig

    check_shards(prepared)
    order = FileShuffleConfig(seed=seed, reseed_after_execution=True) if shuffle else None
    if fold is not None:
        from orchestrator.data.folds import fold_filter

        # A pyarrow filter, pushed into V1's scan of each file. Ray deprecates it for
        # Dataset.filter(expr=...), whose expressions have no bitwise operations to hash with,
        # and which would be a map stage after the read.
        with _reading_context(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The `filter` argument", DeprecationWarning)
            return {
                split: ray.data.read_parquet(
                    prepared.files("train"),
                    filesystem=prepared.filesystem,
                    shuffle=order if split == "train" else None,
                    filter=fold_filter(fold, split),
                )
                for split in ("train", "eval")
            }
    with _reading_context():
        splits = {
            "train": ray.data.read_parquet(
                prepared.files("train"), filesystem=prepared.filesystem, shuffle=order
            )
        }
        if prepared.files("eval"):
            splits["eval"] = ray.data.read_parquet(
                prepared.files("eval"), filesystem=prepared.filesystem
            )
    return splits


@contextlib.contextmanager
def _reading_context() -> Iterator[None]:
    """`read_parquet` builds V1 datasets here (see the module's doc), without the progress bar
    V1 draws while it samples the files (orch prints its own progress). The caller's Ray Data
    context is left as it was; a dataset keeps a copy of the one it was built in."""
    from ray.data import DataContext

    context = DataContext.get_current()
    before = context.use_datasource_v2, context.enable_progress_bars
    context.use_datasource_v2, context.enable_progress_bars = False, False
    try:
        yield
    finally:
        context.use_datasource_v2, context.enable_progress_bars = before


def ingest_config() -> Any:
    """How Ray Train feeds the splits to workers: streamed, split equally, in seeded order."""
    from ray.train import DataConfig

    return DataConfig(execution_options=ingest_options())


def ingest_options() -> Any:
    """Ray Data's execution options for training input, in a Train run or a sweep trial.

    Read tasks finish in whatever order the machine's load dictates; `preserve_order` keeps
    the seeded file order, so the same seed gives the same sample order.
    """
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def check_shards(prepared: PreparedData) -> None:
    """Read every shard's footer: a missing, corrupt or mis-typed shard fails here, by name."""
    expected = _expected_schema(prepared)
    for split in ("train", "eval"):
        for path in prepared.files(split):
            try:
                with prepared.filesystem.open_input_file(path) as f:
                    schema = pq.ParquetFile(f).schema_arrow
            except FileNotFoundError:
                raise DataError(f"{path}: shard is missing") from None
            except (pa.ArrowInvalid, OSError) as exc:
                raise DataError(f"{path}: corrupt Parquet shard: {exc}") from None
            for field in expected:
                if field.name not in schema.names:
                    raise DataError(
                        f"{path}: shard has no column {field.name!r} (has {schema.names})"
                    )
                got = schema.field(field.name).type
                if got != field.type:
                    raise DataError(
                        f"{path}: column {field.name!r} is {got}, expected {field.type}"
                    )


def read_failed(error: BaseException) -> bool:
    """Whether a training failure came from reading the shards (a V1 Parquet read task)."""
    return "ReadParquet" in str(error)


def unreadable_shard(prepared: PreparedData) -> DataError | None:
    """The first shard that cannot be read through, by name; None if all can.

    For use after a read has failed: V1's errors do not say which file failed, and finding it
    reads every page of every shard (footers alone do not show a corrupt page).
    """

    def problem(path: str) -> DataError | None:
        try:
            with prepared.filesystem.open_input_file(path) as f:
                for _ in pq.ParquetFile(f).iter_batches():
                    pass
        except FileNotFoundError:
            return DataError(f"{path}: shard is missing")
        except (pa.ArrowException, OSError) as exc:
            return DataError(f"{path}: corrupt Parquet shard: {exc}")
        return None

    paths = prepared.files("train") + prepared.files("eval")
    with ThreadPoolExecutor(4, thread_name_prefix="orch-shard-scan") as pool:
        # Arrow reads outside the GIL: a few files at once, the first problem in file order.
        return next((found for found in pool.map(problem, paths) if found is not None), None)


class Batch(TypedDict, total=False):
    """A batch as the training loop gets it: the prepared columns, text's or images'."""

    sample_id: torch.Tensor
    input_ids: torch.Tensor  # text, labeled text: (batch, seq_len) token ids
    image: torch.Tensor  # images: uint8 (batch, channels, size, size), decoded on the worker
    features: torch.Tensor  # tabular: (batch, num_features) float32, standardized
    label: torch.Tensor


def _expected_schema(prepared: PreparedData) -> pa.Schema:
    if prepared.kind == "text":
        return pa.schema([("input_ids", pa.list_(pa.int32(), prepared.manifest["seq_len"]))])
    if prepared.kind == "tabular":
        return tabular_schema(prepared.manifest["tabular"]["num_features"])
    if prepared.kind == "labeled_text":
        return labeled_text_schema(prepared.manifest["seq_len"])
    return image_schema()


@dataclass(frozen=True)
class Feed:
    """How a worker's stream hands batches over: prefetch depth, pinned staging, and for
    image data what the collate step decodes to."""

    batch_size: int
    prefetch_batches: int = 2
    pin_memory: bool = False
    images: ImageDecoding | None = None


@dataclass(frozen=True)
class ImageDecoding:
    """Stored images -> uint8 (N, C, size, size): `encoding` raw (pixels of `shape`) or
    encoded (PNG/JPEG files)."""

    encoding: str
    shape: list[int] | None
    size: int
    channels: int


def epoch_batches(
    shard: Any, feed: Feed | int, seed: int, epoch: int, shuffle_buffer: int
) -> Iterator[Batch]:
    """One epoch of a worker's shard as torch batches, shuffled by a seeded local buffer
    (`feed` an int: batches of that size, fed as `Feed`'s defaults).

    `drop_last` keeps every worker at the same number of steps, which DDP and ZeRO need.
    """
    feed = Feed(feed) if isinstance(feed, int) else feed
    yield from shard.iter_torch_batches(
        batch_size=feed.batch_size,
        drop_last=True,
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=seed + epoch if shuffle_buffer else None,
        **_feeding(feed),
    )


def _feeding(feed: Feed) -> dict[str, Any]:
    """Ray's settings for `feed`. The collate step runs in Ray's prefetch threads, off the
    training thread: image decoding happens there. Its output is all tensors, so Ray pins it
    (when asked) and copies it to the worker's device without blocking the step."""
    from orchestrator.data.collate import Collate  # imports Ray Data: on the worker only

    return {
        "prefetch_batches": feed.prefetch_batches,
        "pin_memory": feed.pin_memory,
        "collate_fn": Collate(feed.images),
    }


class StartedEarly(Iterator[T]):
    """An iterator whose first item is already being fetched, in a thread, from creation on.

    Ray Data starts a stream on the first `next()`; starting it early overlaps its start-up
    with other work of the caller's. Items after the first come in the caller's thread.
    """

    def __init__(self, items: Iterator[T]):
        self._items = items
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="orch-first-batch")
        self._first: Future[Any] | None = self._pool.submit(next, items, _END)

    def __next__(self) -> T:
        if self._first is None:
            return next(self._items)
        first, self._first = self._first.result(), None
        self._pool.shutdown()
        if first is _END:
            raise StopIteration
        return first


_END = object()


def eval_batches(shard: Any, feed: Feed | int) -> Iterator[Batch]:
    """A worker's eval shard in stored order, every row of it (a cross-validation evaluates
    each sample of its fold): the last batch may be short. Ray Train splits eval data equally
    (`streaming_split(equal=True)`), so every worker still runs as many batches, which ZeRO-3's
    gathers in the forward pass need."""
    feed = Feed(feed) if isinstance(feed, int) else feed
    yield from shard.iter_torch_batches(
        batch_size=feed.batch_size, drop_last=False, **_feeding(feed)
    )


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: list[int],
    probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick `probability` of the ordinary tokens; 80% [MASK], 10% random, 10% kept.

    Returns (inputs, labels) on `input_ids`' device, labels -100 where no prediction is made.
    The random draws come from `generator` on the CPU and are copied to that device: the same
    seed masks the same tokens on a CPU or a GPU, and a batch that Ray put on the GPU never
    meets a CPU tensor in an operation (CUDA refuses that).
    """
    device = input_ids.device
    chosen_draw = torch.rand(input_ids.shape, generator=generator)
    roll_draw = torch.rand(input_ids.shape, generator=generator)
    swaps = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    specials = torch.tensor(special_ids, dtype=input_ids.dtype, device=device)
    ordinary = ~torch.isin(input_ids, specials)
    chosen = (chosen_draw.to(device, non_blocking=True) < probability) & ordinary
    labels = torch.where(chosen, input_ids, -100)
    roll = roll_draw.to(device, non_blocking=True)
    inputs = torch.where(chosen & (roll < 0.8), mask_id, input_ids)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs = torch.where(swap, swaps.to(device, non_blocking=True), inputs)
    return inputs, labels


def decode_images(
    images: list[bytes],
    *,
    encoding: str,
    shape: list[int] | None,
    size: int,
    channels: int,
    augment: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """Bytes -> float tensor (N, C, size, size) in [0, 1], with optional crop-and-flip."""
    pixels = decode_to_uint8(images, ImageDecoding(encoding, shape, size, channels))
    return to_float_images(pixels, augment=augment, generator=generator)


def decode_to_uint8(images: list[bytes], how: ImageDecoding) -> torch.Tensor:
    """Stored images -> uint8 (N, C, size, size), resized where they are not that size."""
    if how.encoding == "raw":
        assert how.shape is not None
        pixels = np.frombuffer(b"".join(images), dtype=np.uint8).reshape(len(images), *how.shape)
        batch = torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2)
        if batch.shape[-2:] == (how.size, how.size):
            return batch.contiguous()
        resized = F.interpolate(batch.float(), size=(how.size, how.size), mode="bilinear")
        return resized.round().clamp(0, 255).to(torch.uint8)
    from torchvision.io import ImageReadMode, decode_image

    mode = ImageReadMode.GRAY if how.channels == 1 else ImageReadMode.RGB
    decoded = [
        decode_image(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=mode) for b in images
    ]
    return torch.stack(
        [
            d
            if d.shape[-2:] == (how.size, how.size)
            else F.interpolate(d[None].float(), size=(how.size, how.size))[0].to(torch.uint8)
            for d in decoded
        ]
    )


def to_float_images(
    pixels: torch.Tensor, *, augment: bool, generator: torch.Generator
) -> torch.Tensor:
    """uint8 (N, C, H, W) on any device -> float in [0, 1] there, with optional crop-and-flip
    (its random draws from `generator` on the CPU)."""
    batch = pixels.float() / 255.0
    return _crop_and_flip(batch, generator) if augment else batch


def _crop_and_flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crops of the reflect-padded images (pad = size/8) and horizontal flips, for the
    whole batch in one gather on the batch's device."""
    n, c, h, w = batch.shape
    pad = max(1, h // 8)
    padded = F.pad(batch, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.arange(w)
    cols = (
        torch.where(flip[:, None], cols.flip(0), cols)[:, None, None, :] + dx[:, None, None, None]
    )
    rows = torch.arange(h)[None, None, :, None] + dy[:, None, None, None]
    device = batch.device
    index = (
        torch.arange(n)[:, None, None, None].to(device),
        torch.arange(c)[None, :, None, None].to(device),
        rows.to(device, non_blocking=True),
        cols.to(device, non_blocking=True),
    )
    return padded[index]
