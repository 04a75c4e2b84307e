"""The training loop's tensors follow the engine's device, checked without a GPU.

PyTorch's `meta` device stands in for CUDA here. Like CUDA, an operation that mixes a meta
tensor with a CPU tensor raises ("Tensor on device meta is not on the expected device cpu!"),
where on a GPU the same line raises "Expected all tensors to be on the same device". The
process group `meta:fake` (PyTorch's own fake backend, registered for meta tensors only)
stands in for NCCL: like NCCL, which serves CUDA tensors only, it refuses a CPU tensor with
NCCL's own error, "No backend type associated with device type cpu". Meta tensors hold no
data, so these tests check where the tensors are, not their values (the CPU tests of the
loop and the integration runs check the values).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from orchestrator.data.stream import mask_tokens
from orchestrator.train.loop import _all_sum, _EvalTotals, _Window

META = torch.device("meta")


@pytest.fixture
def nccl_like_group() -> Iterator[None]:
    """A two-rank process group that, like NCCL, reduces tensors of one device type only."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("meta:fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_the_stand_in_group_refuses_cpu_tensors_as_nccl_does(nccl_like_group: None) -> None:
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.ones(3))
    dist.all_reduce(torch.ones(3, device=META))


def test_masking_stays_on_the_batch_device() -> None:
    # On a GPU worker Ray hands the loop batches already on the GPU; masking drew on a CPU
    # generator and combined the draws with the batch there.
    ids = torch.randint(5, 500, (4, 16)).to(META)
    inputs, labels = mask_tokens(
        ids,
        mask_id=4,
        vocab_size=500,
        special_ids=[0, 1, 2, 3, 4],
        probability=0.15,
        generator=torch.Generator().manual_seed(0),
    )
    assert inputs.device == META and labels.device == META
    assert inputs.shape == labels.shape == ids.shape


def test_masking_is_the_same_whatever_the_device_of_the_batch() -> None:
    ids = torch.randint(5, 500, (4, 16))
    kwargs = {"mask_id": 4, "vocab_size": 500, "special_ids": [0, 1, 2, 3, 4]}
    on_cpu = mask_tokens(ids, probability=0.5, generator=torch.Generator().manual_seed(1), **kwargs)
    again = mask_tokens(ids, probability=0.5, generator=torch.Generator().manual_seed(1), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(on_cpu, again, strict=True))
    assert (on_cpu[1] != -100).any()


def test_report_window_reduces_on_the_engine_device(nccl_like_group: None) -> None:
    # The window's loss stays on the device between reports (no sync per step), and its
    # totals reach all_reduce there: under NCCL a CPU tensor failed the first log flush.
    window = _Window(META)
    for _ in range(3):
        window.add_loss(torch.tensor(2.5, device=META), 8)
    assert window.loss_sum.device == META
    assert window.count == 3 and window.samples == 24
    assert _all_sum(window.totals()).device == META


@pytest.mark.parametrize(
    ("task", "classes"), [("classification", 3), ("classification", 2), ("masked_lm", 1)]
)
def test_evaluation_sums_on_the_engine_device(
    nccl_like_group: None, task: str, classes: int
) -> None:
    # The confusion matrix was a CPU float64 tensor that a CUDA bincount was added to, and
    # the eval totals were reduced as CPU tensors.
    totals = _EvalTotals(META, classes, task)
    logits = torch.empty(6, max(classes, 5), device=META)
    target = torch.empty(6, dtype=torch.long, device=META)
    totals.add(logits, target)
    for tensor in (totals.sums, totals.confusion, totals.scores):
        assert tensor.device == META
        assert _all_sum(tensor).device == META


def test_evaluation_totals_on_cpu() -> None:
    totals = _EvalTotals(torch.device("cpu"), 2, "classification")
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 1.0]])
    totals.add(logits, torch.tensor([0, 1, 1, -100]))
    metrics = totals.metrics()
    assert metrics["eval_accuracy"] == pytest.approx(2 / 3)
    assert totals.confusion.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert metrics["eval_roc_auc"] == pytest.approx(0.75)


def _evaluate_on_rank(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        totals = _EvalTotals(torch.device("cpu"), 2, "classification")
        logits, target = _EVAL_HALVES[rank]
        totals.add(logits, target)
        torch.save(totals.metrics(), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


_EVAL_HALVES = [
    (torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])),
    (torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, -100, 0])),
]


def test_evaluation_sums_every_table_across_two_real_workers(tmp_path: Path) -> None:
    """Two gloo processes, each with part of the eval data: both get the metrics of the whole
    (the loss sums, the confusion matrix and the ROC histograms travel in one all-reduce)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_evaluate_on_rank, args=(f"tcp://127.0.0.1:{port}", str(tmp_path)), nprocs=2)
    whole = _EvalTotals(torch.device("cpu"), 2, "classification")
    for logits, target in _EVAL_HALVES:
        whole.add(logits, target)
    expected = whole.metrics()
    assert {"eval_loss", "eval_f1", "eval_roc_auc"} <= set(expected)
    for rank in range(2):
        assert torch.load(tmp_path / f"{rank}.pt") == pytest.approx(expected)
