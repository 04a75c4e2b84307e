"""The prepared-data cache under faults: a damaged manifest, two preparations of one dataset at
once, an interrupted preparation. Image data needs no Ray, so these run without one."""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator.data import prepare
from orchestrator.data.prepare import PreparedData
from orchestrator.spec import DataSpec


def mnist_like(folder: Path, images: int) -> Path:
    """A generated MNIST pair of idx files (the real set's format, random pixels)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (images, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, images, dtype=np.uint8)
    (folder / "train-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, images, 28, 28) + pixels.tobytes()
    )
    (folder / "train-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 2049, images) + labels.tobytes()
    )
    return folder


def rows(prepared: PreparedData, split: str) -> int:
    return sum(pq.read_metadata(path).num_rows for path in prepared.files(split))


def spec(tmp_path: Path, images: int = 600, shard_rows: int = 100) -> DataSpec:
    source = tmp_path / "mnist"
    if not source.exists():
        mnist_like(source, images)
    return DataSpec(train=str(source), cache_dir=str(tmp_path / "cache"), shard_rows=shard_rows)


def test_damaged_manifest_is_rebuilt_not_fatal(tmp_path: Path) -> None:
    data = spec(tmp_path)
    prepare(data)
    (manifest,) = (tmp_path / "cache").glob("*/manifest.json")
    told: list[str] = []
    for damage in ("", manifest.read_text()[:40], "[]", '{"splits": 3}'):
        manifest.write_text(damage)  # empty, cut short, or not a manifest at all
        again = prepare(data, log=told.append)
        assert rows(again, "train") + rows(again, "eval") == 600, damage
        assert any("damaged" in line and str(manifest) in line for line in told), told
        told.clear()
    assert prepare(data, log=told.append).root == again.root  # the rebuilt one is reused
    assert told == [f"reusing prepared data {again.root}"]


def test_concurrent_preparations_of_one_dataset_both_finish(tmp_path: Path) -> None:
    # Small shards make the preparation slow enough for the second to start mid-way.
    data = spec(tmp_path, images=6000, shard_rows=20)
    results: dict[str, PreparedData | BaseException] = {}

    def run(who: str) -> None:
        try:
            results[who] = prepare(data)
        except BaseException as exc:
            results[who] = exc

    first = threading.Thread(target=run, args=("first",))
    first.start()
    cache = tmp_path / "cache"
    deadline = time.monotonic() + 30
    while not list(cache.glob("**/train/part-*.parquet")):
        assert time.monotonic() < deadline and first.is_alive(), "the first never started"
        time.sleep(0.01)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    first.join()
    second.join()
    for who, result in results.items():
        assert isinstance(result, PreparedData), f"{who}: {result!r}"
        assert rows(result, "train") + rows(result, "eval") == 6000, who
    # Whichever finished second uses the first's data or its own whole copy: never a torn one.
    assert len(list(cache.glob("*/manifest.json"))) == 1


def test_interrupted_preparation_leaves_no_partial_data(tmp_path: Path) -> None:
    data = spec(tmp_path)
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 2049, 600) + bytes([11]) * 600  # label 11: fails mid-way
    )
    with pytest.raises(Exception, match="label"):
        prepare(data)
    assert not list((tmp_path / "cache").glob("*/attempt-*"))
