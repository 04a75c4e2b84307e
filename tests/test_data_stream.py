"""Streaming prepared shards to real Ray Train workers: exactly once, seeded, failing loudly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.data import DataError, check_shards, epoch_batches, open_splits, prepare
from orchestrator.data.stream import (
    Feed,
    ingest_config,
    ingest_options,
    mask_tokens,
    unreadable_shard,
)
from orchestrator.errors import RunError
from orchestrator.spec import DataSpec
from orchestrator.train.trainer import named_read_failure

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


@pytest.fixture(scope="module")
def prepared(shared_data: Path, data_cache: Path):
    spec = DataSpec(
        train=str(shared_data / "tinyshakespeare.txt"),
        limit=4000,
        seq_len=32,
        tokenizer={"vocab_size": 500},
        shard_rows=100,
        cache_dir=str(data_cache),
    )
    return prepare(spec)


def _collect(
    prepared, out: Path, num_workers: int, epochs: int, seed: int = 7, first: int = 0
) -> None:
    """Run a real TorchTrainer whose workers record the sample ids they see per epoch, from
    epoch `first` (a run resumed in that epoch) to `epochs - 1`."""
    import ray.train
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:
        from orchestrator.data.epochs import EpochStreams

        rank = ray.train.get_context().get_world_rank()
        shard = ray.train.get_dataset_shard("train")
        epochs, first = config["epochs"], config["first"]
        streams = EpochStreams(shard, Feed(16), config["seed"], 64, first, epochs)
        for epoch in range(first, epochs):
            ids, ahead = [], False
            for batch in streams.epoch(epoch):
                ids.append(batch["sample_id"].numpy())
                ahead = streams.started(epoch + 1)
            np.save(f"{config['out']}/ids-{rank}-{epoch}.npy", np.concatenate(ids))
            # At the epoch's last batch, the next epoch's stream had already started: its
            # last block had been fetched while the shuffle buffer still held rows.
            np.save(f"{config['out']}/ahead-{rank}-{epoch}.npy", np.array(ahead))

    trainer = TorchTrainer(
        loop,
        train_loop_config={"epochs": epochs, "seed": seed, "out": str(out), "first": first},
        # Half a CPU per worker leaves Ray Data a core on a 2-CPU machine: no stall.
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, resources_per_worker={"CPU": 0.5}
        ),
        run_config=ray.train.RunConfig(storage_path=str(out / "runs"), name="stream"),
        datasets={"train": open_splits(prepared, seed=seed)["train"]},
        dataset_config=ingest_config(),
    )
    trainer.fit()


@pytest.mark.timeout(300)
def test_each_sample_once_per_epoch_across_two_workers(prepared, tmp_path: Path) -> None:
    _collect(prepared, tmp_path, num_workers=2, epochs=2)
    all_ids = set(
        pq.read_table(prepared.files("train"), columns=["sample_id"])["sample_id"].to_pylist()
    )
    for epoch in range(2):
        per_worker = [np.load(tmp_path / f"ids-{rank}-{epoch}.npy") for rank in range(2)]
        seen = np.concatenate(per_worker)
        assert len(seen) == len(set(seen.tolist())), "a sample was seen twice"
        # drop_last may hold back less than one batch per worker; everything else is seen.
        assert set(seen.tolist()) <= all_ids
        assert len(all_ids) - len(seen) < 2 * 16
        assert len(per_worker[0]) == len(per_worker[1])  # lockstep for DDP
    # The second epoch's stream started before the first's last batch; none after the last.
    assert [bool(np.load(tmp_path / f"ahead-{r}-0.npy")) for r in range(2)] == [True, True]
    assert [bool(np.load(tmp_path / f"ahead-{r}-1.npy")) for r in range(2)] == [False, False]
    first, second = (
        np.concatenate([np.load(tmp_path / f"ids-{r}-{e}.npy") for r in range(2)]) for e in range(2)
    )
    assert not np.array_equal(first, second), "epochs must be reshuffled"


@pytest.mark.timeout(300)
def test_same_seed_same_order(prepared, tmp_path: Path) -> None:
    orders = []
    for run in range(2):
        out = tmp_path / str(run)
        out.mkdir()
        _collect(prepared, out, num_workers=1, epochs=1, seed=11)
        orders.append(np.load(out / "ids-0-0.npy"))
    assert np.array_equal(orders[0], orders[1])
    out = tmp_path / "other"
    out.mkdir()
    _collect(prepared, out, num_workers=1, epochs=1, seed=12)
    assert not np.array_equal(orders[0], np.load(out / "ids-0-0.npy"))


@pytest.mark.timeout(300)
def test_a_run_resumed_in_an_epoch_streams_it_in_that_epochs_order(
    prepared, tmp_path: Path
) -> None:
    """A resumed run skips the batches its checkpoint had trained on, so the epoch it resumes
    in must come in the order the first run streamed it: each epoch's file order is seeded
    with its number, not with how many times this run's split has been read."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    whole.mkdir(), resumed.mkdir()
    _collect(prepared, whole, num_workers=1, epochs=2, seed=11)
    _collect(prepared, resumed, num_workers=1, epochs=2, seed=11, first=1)
    assert np.array_equal(np.load(whole / "ids-0-1.npy"), np.load(resumed / "ids-0-1.npy"))
    assert not np.array_equal(np.load(whole / "ids-0-0.npy"), np.load(whole / "ids-0-1.npy"))


def test_epochs_of_a_dataset_read_in_one_process_are_reshuffled_and_resume(prepared) -> None:
    """A one-worker sweep trial reads the dataset itself (no streaming split): each epoch's
    file order is its own, and an epoch started first is the same as when it comes second."""
    from orchestrator.data.epochs import EpochStreams

    def orders(first: int) -> list[np.ndarray]:
        dataset = open_splits(prepared, seed=5)["train"]
        dataset.context.execution_options = ingest_options()  # as a trial sets it
        split = dataset.iterator()
        # No local shuffle buffer: the order is the files' order, and the rows' within them.
        streams = EpochStreams(split, Feed(50), 5, 0, first, 2)
        return [
            np.concatenate([b["sample_id"].numpy() for b in streams.epoch(e)])
            for e in range(first, 2)
        ]

    zero, one = orders(0)
    assert not np.array_equal(zero, one), "the second epoch read the files in the same order"
    assert sorted(zero.tolist()) == sorted(one.tolist())
    (resumed,) = orders(1)
    assert np.array_equal(resumed, one)


def _copy(prepared, tmp_path: Path):
    """A private copy of the prepared shards that a test may damage."""
    import shutil

    from orchestrator.data.prepare import PreparedData

    root = tmp_path / "copy"
    shutil.copytree(prepared.root, root)
    return PreparedData(str(root), prepared.filesystem, prepared.manifest)


def test_corrupt_shard_footer_is_named(prepared, tmp_path: Path) -> None:
    copy = _copy(prepared, tmp_path)
    bad = copy.files("train")[1]
    Path(bad).write_bytes(Path(bad).read_bytes()[:-40])
    with pytest.raises(DataError, match=rf"{bad}: corrupt Parquet shard"):
        check_shards(copy)


def test_missing_shard_is_named(prepared, tmp_path: Path) -> None:
    copy = _copy(prepared, tmp_path)
    Path(copy.files("eval")[0]).unlink()
    with pytest.raises(DataError, match=r"eval/part-00000-00000\.parquet: shard is missing"):
        check_shards(copy)


def test_shard_with_wrong_columns_or_dtypes(prepared, tmp_path: Path) -> None:
    copy = _copy(prepared, tmp_path)
    path = copy.files("train")[0]
    pq.write_table(pa.table({"sample_id": [1], "tokens": [[1, 2]]}), path)
    with pytest.raises(DataError, match=rf"{path}: shard has no column 'input_ids'"):
        check_shards(copy)
    pq.write_table(pa.table({"sample_id": [1], "input_ids": [[1.0] * 32]}), path)
    with pytest.raises(
        DataError,
        match=rf"{path}: column 'input_ids' is list<\w+: double>, expected fixed_size_list",
    ):
        check_shards(copy)


@pytest.mark.timeout(240)
def test_corrupt_shard_mid_epoch_fails_with_its_name(prepared, tmp_path: Path) -> None:
    """A shard whose footer is fine but whose data pages are garbage fails the read, by name."""
    copy = _copy(prepared, tmp_path)
    path = Path(copy.files("train")[2])
    table = pq.read_table(path)
    pq.write_table(table, path, compression="snappy", use_dictionary=False)
    raw = bytearray(path.read_bytes())
    footer = int.from_bytes(raw[-8:-4], "little")
    for i in range(8, len(raw) - footer - 8, 7):  # scribble over the pages, not the footer
        raw[i] = 0xFF
    path.write_bytes(bytes(raw))
    check_shards(copy)  # the footer still reads fine
    assert unreadable_shard(prepared) is None  # the intact original reads through
    ds = open_splits(copy, seed=0, shuffle=False)["train"]
    with pytest.raises(Exception) as info:
        for _ in epoch_batches(ds.iterator(), 16, 0, 0, shuffle_buffer=0):
            pass
    # Ray Data's own error does not say which file; the run's failure does.
    named = named_read_failure(info.value, copy)
    assert isinstance(named, RunError)
    assert str(named).startswith(f"{path}: corrupt Parquet shard: ")
    assert named_read_failure(RuntimeError("CUDA out of memory"), copy) is None


def test_mlm_masking_rates() -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 500, (64, 128), generator=gen, dtype=torch.int32)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    inputs, labels = mask_tokens(
        ids, mask_id=4, vocab_size=500, special_ids=[0, 1, 2, 3, 4], probability=0.15, generator=gen
    )
    chosen = labels != -100
    assert 0.13 < chosen.float().mean() < 0.17
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # specials are never masked
    assert torch.equal(labels[chosen], ids[chosen])
    masked = (inputs == 4) & chosen
    kept = (inputs == ids) & chosen
    assert 0.75 < masked.sum() / chosen.sum() < 0.85
    assert 0.05 < kept.sum() / chosen.sum() < 0.16  # 10% kept, plus random draws of the same id
    assert torch.equal(inputs[~chosen], ids[~chosen])
