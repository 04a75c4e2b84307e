"""The collate step of a worker's stream: Arrow batches to the torch tensors the loop trains on.

Ray calls it in its prefetch threads, off the training thread, so image decoding runs there,
on the worker's spare CPU time. Its output is tensors only, which Ray then pins (when asked)
and copies to the worker's device without blocking the step.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from orchestrator.data.stream import ImageDecoding, decode_to_uint8

__all__ = ["Collate"]


class Collate(ArrowBatchCollateFn):
    """Arrow batch -> torch tensors: fixed-size token lists as one (batch, seq_len) tensor
    (one copy of the batch, not one per row), images decoded to uint8 (a quarter of float32's
    bytes to copy). The copy is needed: Arrow's buffers of a block may live in Ray's object
    store, read-only and released once the block is consumed, while a tensor outlives it."""

    def __init__(self, images: ImageDecoding | None):
        super().__init__()
        self.images = images

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name in batch.column_names:
            column = batch.column(name).combine_chunks()
            if name == "image":
                if self.images is None:
                    raise ValueError("image data streamed without its decoding settings")
                out[name] = decode_to_uint8(column.to_pylist(), self.images)
            elif pa.types.is_fixed_size_list(column.type):
                width = column.type.list_size
                flat = column.flatten().to_numpy(zero_copy_only=False)
                out[name] = torch.from_numpy(flat.reshape(len(column), width).copy())
            else:
                out[name] = torch.from_numpy(column.to_numpy(zero_copy_only=False).copy())
        return out
