"""On a GPU machine: BERT, GPT, the CNN and ResNet on CUDA, with NCCL, bf16 and ZeRO.

Skipped without a GPU (CI has none): `bench/gpu/check.sh` runs them on one. Each run checks
that training went (the loss fell, or stayed finite for the short image runs), that the GPU
metrics were reported, and that the export is an fp32 model. With two or more visible GPUs,
two workers also train over NCCL (the collectives the CPU tests stand in for with the meta
device, tests/test_device_placement.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import LOCAL, _load, quoted, tiny_bert, tiny_cnn

from orchestrator.driver import run_workload
from orchestrator.models import load_exported

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.usefixtures("local_ray"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# One CPU a worker: the session Ray of the tests has 2 (pyproject), and Ray Data needs one.
GPU = ["scaling.use_gpu=true", "scaling.resources_per_worker={CPU: 1, GPU: 1}"]

# The tiny BERT at a GPU's size: 4 layers of 256 on sequences of 128, 20 bf16 steps.
BERT_ON_GPU = [
    *GPU,
    "model.hidden_size=256",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.max_seq_len=128",
    "model.dropout=0.1",
    "data.limit=null",
    "data.seq_len=128",
    "data.tokenizer.vocab_size=2000",
    "train.max_steps=20",
    "train.micro_batch_size=32",
    "train.precision=bf16",
    "train.log_every=5",
    "train.eval_batches=null",
    "train.checkpoint_every=10",
    "train.optimizer.lr=1e-4",
]


def _trained(result: Any, steps: int, falls: bool = True) -> None:
    losses = [e["loss"] for e in result.history]
    assert result.history[-1]["step"] == steps
    assert all(math.isfinite(loss) for loss in losses)
    if falls:
        assert losses[-1] < losses[0]
    last = result.history[-1]
    assert 0 < last["peak_memory_gb"] < 200
    assert 0 < last.get("mfu", 0.5) < 1  # absent only on a GPU outside the peak table
    model = load_exported(result.model_dir)
    assert next(model.parameters()).dtype == torch.float32


def _workers(n: int) -> list[str]:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs")
    return [f"scaling.num_workers={n}"]


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_bert_bf16_on_gpu(engine: str, shared_data: Path, data_cache: Path, tmp_path: Path) -> None:
    distributed = "deepspeed=null" if engine == "ddp" else f"deepspeed.zero_stage={engine[-1]}"
    spec = tiny_bert(
        shared_data,
        data_cache,
        tmp_path,
        *BERT_ON_GPU,
        f"name=gpu-bert-{engine}",
        distributed,
        *_workers(1),
    )
    _trained(run_workload(spec), 20)


def test_bert_two_workers_over_nccl(shared_data: Path, data_cache: Path, tmp_path: Path) -> None:
    spec = tiny_bert(
        shared_data,
        data_cache,
        tmp_path,
        *BERT_ON_GPU,
        "name=gpu-bert-nccl",
        "deepspeed.zero_stage=2",
        "scaling.resources_per_worker={CPU: 0.5, GPU: 1}",
        "train.eval_every=10",
        *_workers(2),
    )
    result = run_workload(spec)
    _trained(result, 20)
    assert "eval_loss" in result.history[-1]  # evaluation's sums all-reduced over NCCL


def test_gpt_zero2_on_gpu(tmp_path: Path, data_cache: Path) -> None:
    corpus = LOCAL / "data" / "corpus.txt"
    spec = _load(
        "gpt_tiny_zero2.yaml",
        corpus,
        data_cache,
        tmp_path,
        [*GPU, "name=gpu-gpt", "train.max_steps=30", "train.log_every=10", "train.eval_every=30"],
        tuple(_workers(1)),
    )
    _trained(run_workload(spec), 30)


@pytest.mark.parametrize(
    "model",
    [
        "{kind: cnn, channels: [32, 64]}",
        "{kind: resnet, depth: 18, in_channels: 1, num_classes: 10, image_size: 32}",
    ],
)
def test_image_models_on_gpu(
    model: str, shared_data: Path, data_cache: Path, tmp_path: Path
) -> None:
    spec = tiny_cnn(
        shared_data,
        data_cache,
        tmp_path,
        *GPU,
        f"model={model}",
        "name=gpu-image",
        "data.augment=true",
        "train.max_steps=30",
        "train.micro_batch_size=64",
        "train.log_every=10",
        "train.precision=bf16",
        *_workers(1),
    )
    result = run_workload(spec)
    _trained(result, 30)
    assert "eval_accuracy" in result.history[-1]


def test_compiled_bert_on_gpu(shared_data: Path, data_cache: Path, tmp_path: Path) -> None:
    spec = tiny_bert(
        shared_data,
        data_cache,
        tmp_path,
        *BERT_ON_GPU,
        "name=gpu-bert-compiled",
        "deepspeed=null",
        "train.compile=true",
        f"train.storage_path={quoted(tmp_path / 'compiled')}",
        *_workers(1),
    )
    _trained(run_workload(spec), 20)
