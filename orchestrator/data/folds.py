"""k-fold cross-validation folds of a prepared training split, by sample id.

A sample's fold is a function of its id alone: the id is mixed by SplitMix64's finalizer (a
bijection of 64-bit integers whose output bits each depend on every input bit) and the top 32
bits of the mix are scaled to [0, folds) (Lemire's multiply-shift: `(h * folds) >> 32`). So the
folds are deterministic (no seed, no order: the same id is in the same fold in every run, on
every machine), every sample is in exactly one fold, and fold sizes vary as a uniform random
assignment's would (within a few percent from a few thousand rows), whatever the ids look
like. The mix is independent of `shards.held_out`'s hash, which chose the eval split: the
training split's ids (those not held out) still spread evenly.

The rule is written once, as a pyarrow expression (`_fold_expression`): the shards are filtered
by it as they are read (`open_splits`), and the driver counts the folds with the same
expression over the sample_id column (`fold_sizes`), so the rows a run trains on are exactly
the rows it was told of.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from orchestrator.data.prepare import PreparedData
from orchestrator.data.sources import DataError

__all__ = ["Fold", "fold_filter", "fold_of", "fold_sizes"]

_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


@dataclass(frozen=True)
class Fold:
    """Fold `index` of `count`: a run that trains on the other folds and evaluates on this."""

    index: int
    count: int


def _fold_expression(ids: pc.Expression, folds: int) -> pc.Expression:
    """The fold of each id, as an expression over an int64 column (uint64 math wraps)."""

    def u64(value: int) -> pc.Expression:
        return pc.scalar(pa.scalar(value, pa.uint64()))

    x = pc.add(ids.cast(pa.uint64(), safe=False), u64(_GOLDEN))
    x = pc.multiply(pc.bit_wise_xor(x, pc.shift_right(x, u64(30))), u64(_MIX1))
    x = pc.multiply(pc.bit_wise_xor(x, pc.shift_right(x, u64(27))), u64(_MIX2))
    x = pc.bit_wise_xor(x, pc.shift_right(x, u64(31)))
    return pc.shift_right(pc.multiply(pc.shift_right(x, u64(32)), u64(folds)), u64(32))


def fold_filter(fold: Fold, split: str) -> pc.Expression:
    """The rows of `split` ("train": every other fold, "eval": this fold) as a read filter."""
    in_fold = pc.equal(
        _fold_expression(pc.field("sample_id"), fold.count),
        pc.scalar(pa.scalar(fold.index, pa.uint64())),
    )
    return in_fold if split == "eval" else pc.invert(in_fold)


def fold_of(sample_ids: np.ndarray | list[int], folds: int) -> np.ndarray:
    """The fold of each sample id (what the read filter selects by)."""
    table = pa.table({"sample_id": pa.array(np.asarray(sample_ids), pa.int64())})
    projected = pads.dataset(table).to_table(
        columns={"fold": _fold_expression(pc.field("sample_id"), folds)}
    )
    return projected.column("fold").to_numpy().astype(np.int64)


def fold_sizes(prepared: PreparedData, folds: int) -> list[int]:
    """Rows of the training split in each fold, counted from the shards' sample_id column."""
    counts = np.zeros(folds, dtype=np.int64)
    for path in prepared.files("train"):
        with prepared.filesystem.open_input_file(path) as f:
            file = pq.ParquetFile(f)
            if "sample_id" not in file.schema_arrow.names:
                raise DataError(
                    f"{path}: shard has no sample_id column, which cross-validation assigns "
                    "folds by; let orch prepare the data from its source"
                )
            ids = file.read(columns=["sample_id"]).column("sample_id").to_numpy()
        counts += np.bincount(fold_of(ids, folds), minlength=folds)
    return [int(c) for c in counts]
