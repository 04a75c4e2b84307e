"""On a GPU machine: the same workloads with NCCL, bf16 and ZeRO on CUDA (skipped without one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from builders import tiny_bert

from orchestrator.driver import run_workload
from orchestrator.models import load_exported

pytestmark = [pytest.mark.gpu, pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


# The tiny BERT at a GPU's size: 4 layers of 256 on sequences of 128, 20 bf16 steps.
ON_GPU = [
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
    "train.optimizer.lr=1e-4",
    "scaling.use_gpu=true",
    "scaling.resources_per_worker={CPU: 0.5, GPU: 1}",
]


@pytest.mark.parametrize("stage", [2, 3])
def test_bert_zero_bf16_on_gpu(
    stage: int, shared_data: Path, data_cache: Path, tmp_path: Path
) -> None:
    spec = tiny_bert(
        shared_data,
        data_cache,
        tmp_path,
        *ON_GPU,
        f"name=gpu-bert-{stage}",
        f"deepspeed.zero_stage={stage}",
        f"scaling.num_workers={torch.cuda.device_count()}",
    )
    result = run_workload(spec)
    losses = [e["loss"] for e in result.history]
    assert result.history[-1]["step"] == 20
    assert losses[-1] < losses[0]
    model = load_exported(result.model_dir)
    assert next(model.parameters()).dtype == torch.float32
