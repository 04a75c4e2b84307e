"""Data: raw sources -> cached Parquet shards (prepare) -> streams to training workers (stream)."""

from orchestrator.data.prepare import PreparedData, prepare
from orchestrator.data.sources import DataError
from orchestrator.data.stream import check_shards, epoch_batches, open_splits

__all__ = ["DataError", "PreparedData", "check_shards", "epoch_batches", "open_splits", "prepare"]
