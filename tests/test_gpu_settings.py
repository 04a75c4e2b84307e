"""The settings that make orch fast on a GPU, checked on their CPU paths (unit tests)."""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from orchestrator.data.collate import Collate
from orchestrator.data.stream import ImageDecoding, _crop_and_flip
from orchestrator.model_zoo import masked_lm_bert
from orchestrator.plan import PlanError, check_gpus
from orchestrator.spec import BertMLMModel, DeepSpeedSpec, ScalingSpec, TrainSpec
from orchestrator.train.engines import (
    ModelSize,
    deepspeed_config,
    make_optimizer,
    zero_communication,
)
from orchestrator.train.utilization import mfu, peak_flops


def _tiny_bert() -> Any:
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return masked_lm_bert()(config)


def test_mlm_loss_at_masked_positions_equals_the_loss_over_every_token() -> None:
    model = _tiny_bert()
    ids = torch.randint(5, 120, (4, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    at = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.15
    labels[at] = ids[at]

    full = model(ids).logits
    loss_full = F.cross_entropy(full.reshape(-1, 120), labels.reshape(-1), ignore_index=-100)
    (grad_full,) = torch.autograd.grad(loss_full, model.cls.predictions.transform.dense.weight)

    sparse = model(ids, predict_at=at)
    assert sparse.shape == (int(at.sum()), 120)  # the head ran on the masked positions only
    loss_sparse = F.cross_entropy(sparse, labels[at])
    (grad_sparse,) = torch.autograd.grad(loss_sparse, model.cls.predictions.transform.dense.weight)

    torch.testing.assert_close(loss_sparse, loss_full)
    torch.testing.assert_close(grad_sparse, grad_full)


@pytest.mark.parametrize(("predict", "rows"), [("masked", 3), ("all", 4 * 16)])
def test_the_loop_predicts_where_train_mlm_predict_says(predict: str, rows: int) -> None:
    from orchestrator.train.loop import _forward

    model = _tiny_bert()
    engine = SimpleNamespace(module=model, model=model)
    cfg = SimpleNamespace(train=SimpleNamespace(mlm_predict=predict))
    ids = torch.randint(5, 120, (4, 16))
    labels = torch.full_like(ids, -100)
    labels[0, :3] = ids[0, :3]
    logits, target = _forward(engine, ids, labels, "masked_lm", cfg)  # type: ignore[arg-type]
    assert logits.shape == (rows, 120) and target.shape == (rows,)
    assert (target != -100).sum() == 3


def test_collate_gives_token_batches_without_a_copy_per_row() -> None:
    rows = np.arange(24, dtype=np.int32).reshape(3, 8)
    table = pa.table(
        {
            "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), 8),
            "sample_id": pa.array([7, 8, 9], pa.int64()),
        }
    )
    out = Collate(None)(table)
    assert out["input_ids"].dtype == torch.int32 and out["input_ids"].shape == (3, 8)
    assert np.array_equal(out["input_ids"].numpy(), rows)
    assert out["sample_id"].tolist() == [7, 8, 9]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_collate_decodes_images_to_uint8_at_the_models_size() -> None:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    exact = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    table = pa.table({"image": pa.array([_png(small), _png(exact)]), "label": [0, 1]})
    out = Collate(ImageDecoding("encoded", None, 16, 3))(table)
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (2, 3, 16, 16)
    assert np.array_equal(out["image"][1].permute(1, 2, 0).numpy(), exact)  # lossless: as is
    raw = pa.table({"image": pa.array([small.tobytes()]), "label": [3]})
    pixels = Collate(ImageDecoding("raw", [8, 8, 3], 8, 3))(raw)["image"]
    assert np.array_equal(pixels[0].permute(1, 2, 0).numpy(), small)


def test_crop_and_flip_for_the_whole_batch_matches_one_image_at_a_time() -> None:
    batch = torch.rand(6, 3, 16, 16)
    out = _crop_and_flip(batch, torch.Generator().manual_seed(5))
    # The same draws, one image at a time, as the loop did before.
    gen = torch.Generator().manual_seed(5)
    pad = 2
    padded = F.pad(batch, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (6,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (6,), generator=gen)
    flip = torch.rand(6, generator=gen) < 0.5
    for i in range(6):
        crop = padded[i, :, dy[i] : dy[i] + 16, dx[i] : dx[i] + 16]
        torch.testing.assert_close(out[i], crop.flip(-1) if flip[i] else crop)


def test_zero_buckets_follow_the_model_size_and_extra_overrides_them() -> None:
    bert_base = ModelSize(110_000_000, 768)
    two = zero_communication(2, bert_base, on_gpu=True)
    assert two["overlap_comm"] is True and two["reduce_bucket_size"] == 11_000_000
    assert two["allgather_bucket_size"] == 11_000_000
    assert zero_communication(2, ModelSize(50_000), on_gpu=False) == {
        "overlap_comm": False,  # gloo on CPU: no streams to overlap on
        "contiguous_gradients": True,
        "reduce_bucket_size": 1_000_000,
        "allgather_bucket_size": 1_000_000,
    }
    three = zero_communication(3, bert_base, on_gpu=True)
    assert three["stage3_param_persistence_threshold"] == 7680
    assert three["stage3_prefetch_bucket_size"] == int(0.9 * 768 * 768)
    huge = zero_communication(2, ModelSize(70_000_000_000, 8192), on_gpu=True)
    assert huge["reduce_bucket_size"] == 500_000_000  # DeepSpeed's own default at most

    ds = DeepSpeedSpec(zero_stage=2, extra={"zero_optimization": {"reduce_bucket_size": 123}})
    config = deepspeed_config(ds, TrainSpec(), 2, bert_base, on_gpu=True)
    assert config["zero_optimization"]["reduce_bucket_size"] == 123
    assert config["zero_optimization"]["overlap_comm"] is True
    on_cpu = deepspeed_config(DeepSpeedSpec(zero_stage=2), TrainSpec(), 2, bert_base)
    assert "reduce_bucket_size" not in on_cpu["zero_optimization"]  # DeepSpeed's own on CPU
    assert (
        "overlap_comm"
        not in deepspeed_config(DeepSpeedSpec(zero_stage=1), TrainSpec(), 2)["zero_optimization"]
    )


def test_fused_adamw_only_when_asked() -> None:
    model = torch.nn.Linear(4, 4)
    spec = TrainSpec().optimizer
    assert make_optimizer(spec, model, fused=True).defaults["fused"] is True
    assert not make_optimizer(spec, model).defaults["fused"]


def test_peak_table() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA H200", "fp32") == 494e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp16") == 312e12
    assert peak_flops("NVIDIA A10G", "bf16") is None  # not the A10: no guess
    assert peak_flops("Some Future GPU", "bf16") is None


def test_mfu_from_counted_flops() -> None:
    # 3 GFLOPs a sample, 200 samples/s over 2 workers: 300 GFLOP/s per GPU of 1 TFLOP/s.
    assert mfu(3e9, 200.0, 2, 1e12) == pytest.approx(0.3)


def test_flops_of_bert_base_per_sample() -> None:
    from orchestrator.train.utilization import flops_per_sample

    def cfg(predict: str) -> Any:
        return SimpleNamespace(
            model=BertMLMModel(
                kind="bert_mlm", hidden_size=768, num_layers=12, num_heads=12, max_seq_len=128
            ),
            data_info=_bert_data(),
            dataset=SimpleNamespace(seq_len=128),
            train=SimpleNamespace(mlm_predict=predict),
            stream=SimpleNamespace(mlm_probability=0.15),
        )

    every = flops_per_sample(cfg("all"))
    masked = flops_per_sample(cfg("masked"))
    assert every is not None and masked is not None
    # 6 x 110M parameters x 128 tokens is 84 GFLOPs; attention adds about 2%.
    assert 84e9 < every < 90e9
    assert 65e9 < masked < every - 15e9  # the head on 15% of the tokens


def _bert_data() -> Any:
    from orchestrator.models import DataInfo

    return DataInfo(vocab_size=30522)


def test_gpu_workload_where_ray_has_no_gpus_is_refused() -> None:
    scaling = ScalingSpec(num_workers=2, use_gpu=True)
    with pytest.raises(PlanError, match=r"need 2 GPU\(s\) and the Ray here has 0"):
        check_gpus(scaling, 0.0)
    check_gpus(scaling, 2.0)
    check_gpus(ScalingSpec(num_workers=2), 0.0)
