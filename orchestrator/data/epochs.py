"""A worker's epochs of training data, each one's stream started before the last one ends.

Every epoch is a new Ray Data execution of the split (so the file order can be reseeded), and a
streaming split starts it only when every worker has asked for it (the coordinator's barrier).
Asked for when the previous epoch's batches run out, it stalled every worker once per epoch:
the new execution's read tasks, then the local shuffle buffer refilling, before the first
batch (the quickstart fell from about 290 to 100 samples/s; bench/train_overhead.py measures
the windows that cross a boundary).

A worker's split has received its last block well before its last batch: the local shuffle
buffer and the prefetched batches still hold a few hundred rows. From that moment the worker
can join the next epoch's barrier without disturbing the current one, so the next epoch's
stream starts then, in a thread, and its first batch is ready when the last one is trained on.
Each epoch reads through its own copy of the split: a split iterator remembers the epoch it
is consuming, and reports that epoch finished when its consumer stops (which, for the old
epoch, is after the new one has begun).

Ray Data seeds each execution's file order with the execution's number, counted by whoever
executes the dataset (a streaming split's coordinator, else the dataset's reader) from the
count the dataset was created with. A run resumed in epoch 5 starts a new count at 0: it read
epoch 5 in epoch 0's file order, and skipping the batches its checkpoint had trained on skipped
other samples than those. So the count is set to the epoch's number before the epoch starts.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Iterator
from typing import Any

import ray
from ray.data import DataIterator

from orchestrator.data.stream import Batch, Feed, StartedEarly, epoch_batches

__all__ = ["EpochStreams"]


class EpochStreams:
    """Epochs `first` .. `end - 1` of a worker's `split`, seeded as `epoch_batches` seeds them.

    `epoch(e)` must be called for each epoch in order; the stream of epoch e + 1 starts once
    epoch e's last block has arrived (never beyond `end`). The first epoch's stream starts on
    creation, so that it overlaps whatever the worker does before its first step.
    """

    def __init__(
        self, split: Any, feed: Feed, seed: int, shuffle_buffer: int, first: int, end: int
    ) -> None:
        self._split, self._feed, self._seed, self._buffer = split, feed, seed, shuffle_buffer
        self._first, self._end = first, end
        self._next: tuple[int, _Fetched, Iterator[Batch]] | None = None
        if first < end:
            self._next = self._start(first)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of `epoch`, which must be the next epoch of this worker's."""
        if self._next is None or self._next[0] != epoch:
            raise ValueError(f"epoch {epoch} was not the next epoch to stream")
        _, fetched, batches = self._next
        self._next = None
        for batch in batches:
            if self._next is None and fetched.done.is_set() and epoch + 1 < self._end:
                self._next = self._start(epoch + 1)
            yield batch

    def started(self, epoch: int) -> bool:
        """Whether `epoch`'s stream has started, ahead of its first batch being asked for."""
        return self._next is not None and self._next[0] == epoch

    def _start(self, epoch: int) -> tuple[int, _Fetched, Iterator[Batch]]:
        copy = pickle.loads(pickle.dumps(self._split))  # see the module's doc
        _number_execution(copy, epoch, epoch == self._first)
        split = _Fetched(copy)
        batches = epoch_batches(split, self._feed, self._seed, epoch, self._buffer)
        return epoch, split, StartedEarly(batches)


def _number_execution(split: DataIterator, epoch: int, first: bool) -> None:
    """Make `split`'s next execution Ray Data's execution number `epoch` (see the module's doc).

    A streaming split's coordinator, shared by every worker, counts its executions: each
    worker sets the count once, before it asks for its first epoch (so before the coordinator
    starts it), and the coordinator's own count then follows the epochs. Read in this process,
    each epoch reads a copy of the dataset, whose count is set here.
    """
    from ray.data._internal.iterator.iterator_impl import DataIteratorImpl
    from ray.data._internal.iterator.stream_split_iterator import StreamSplitDataIterator

    if isinstance(split, StreamSplitDataIterator):
        if first:
            ray.get(split._coord_actor.__ray_call__.remote(_number_first_execution, epoch))
    elif isinstance(split, DataIteratorImpl):
        split._base_dataset.context._execution_idx = epoch
    else:
        raise TypeError(f"cannot seed the file order of epochs read through {type(split)}")


def _number_first_execution(coordinator: Any, epoch: int) -> None:
    with coordinator._lock:
        if coordinator._cur_epoch == -1:  # no epoch started: the other workers' call is late
            coordinator._base_dataset.context._execution_idx = epoch


class _Fetched(DataIterator):
    """A data iterator that says when the stream below it has handed over its last block."""

    def __init__(self, inner: DataIterator) -> None:
        self._inner = inner
        self.done = threading.Event()

    def _to_ref_bundle_iterator(self) -> Any:
        blocks, stats, executor = self._inner._to_ref_bundle_iterator()
        return self._signal_end(blocks), stats, executor

    def _signal_end(self, blocks: Iterator[Any]) -> Iterator[Any]:
        yield from blocks
        self.done.set()

    def _on_iteration_end(self, executor: Any) -> None:
        self._inner._on_iteration_end(executor)

    def _get_dataset_tag(self) -> Any:
        return self._inner._get_dataset_tag()

    def stats(self) -> str:
        return self._inner.stats()

    def schema(self) -> Any:
        return self._inner.schema()

    def get_context(self) -> Any:
        return self._inner.get_context()
