"""On a GPU machine: the same workloads with NCCL, bf16 and ZeRO on CUDA (skipped without one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.models import load_exported
from orchestrator.run import run_workload
from orchestrator.spec import WorkloadSpec

pytestmark = [pytest.mark.gpu, pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


@pytest.mark.parametrize("stage", [2, 3])
def test_bert_zero_bf16_on_gpu(stage: int, shared_data: Path, tmp_path: Path) -> None:
    spec = WorkloadSpec.model_validate(
        {
            "name": f"gpu-bert-{stage}",
            "model": {
                "kind": "bert_mlm",
                "hidden_size": 256,
                "num_layers": 4,
                "num_heads": 4,
                "max_seq_len": 128,
            },
            "data": {
                "train": str(shared_data / "tinyshakespeare.txt"),
                "seq_len": 128,
                "tokenizer": {"vocab_size": 2000},
                "cache_dir": str(tmp_path / "cache"),
            },
            "train": {
                "max_steps": 20,
                "micro_batch_size": 32,
                "precision": "bf16",
                "log_every": 5,
                "storage_path": str(tmp_path / "runs"),
            },
            "deepspeed": {"zero_stage": stage},
            "scaling": {
                "num_workers": torch.cuda.device_count(),
                "use_gpu": True,
                "resources_per_worker": {"CPU": 0.5, "GPU": 1},
            },
            "tracking": {"mlflow": {"enabled": False}},
        }
    )
    result = run_workload(spec)
    losses = [e["loss"] for e in result.history]
    assert result.history[-1]["step"] == 20
    assert losses[-1] < losses[0]
    model = load_exported(result.model_dir)
    assert next(model.parameters()).dtype == torch.float32
