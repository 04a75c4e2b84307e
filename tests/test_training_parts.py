"""Fast checks of the pieces behind `orch run`: DeepSpeed config, LR schedule, plan, models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from orchestrator.load import load_workload
from orchestrator.models import DataInfo, ModelError, build_model, config_hash, resolve_custom
from orchestrator.plan import PlanError, check_data_cpus, count_parameters, memory_per_worker
from orchestrator.spec import (
    BertMLMModel,
    CNNModel,
    DeepSpeedSpec,
    ScalingSpec,
    SchedulerSpec,
    TrainSpec,
)
from orchestrator.train.checkpoint import CheckpointMismatch, Manifest
from orchestrator.train.engines import accumulation_steps, deepspeed_config, lr_lambda

WORKLOADS = Path(__file__).parents[1] / "workloads"


def test_deepspeed_config_from_spec() -> None:
    train = TrainSpec(global_batch_size=256, micro_batch_size=16, precision="bf16", grad_clip=0.5)
    ds = DeepSpeedSpec(
        zero_stage=3,
        offload_optimizer="cpu",
        offload_param="cpu",
        extra={"zero_optimization": {"overlap_comm": True}, "flops_profiler": {}},
    )
    config = deepspeed_config(ds, train, world_size=4)
    assert config["train_batch_size"] == 256
    assert config["train_micro_batch_size_per_gpu"] == 16
    assert config["gradient_accumulation_steps"] == accumulation_steps(train, 4) == 4
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
        "overlap_comm": True,  # merged from extra, without losing orch's keys
    }
    assert config["flops_profiler"] == {}


def test_no_global_batch_means_no_accumulation() -> None:
    assert accumulation_steps(TrainSpec(micro_batch_size=8), 3) == 1


@pytest.mark.parametrize(("name", "at_end"), [("constant", 1.0), ("linear", 0.1), ("cosine", 0.1)])
def test_lr_schedule(name: str, at_end: float) -> None:
    factor = lr_lambda(SchedulerSpec(name=name, warmup_steps=10, min_lr_ratio=0.1), 110)
    assert factor(0) == pytest.approx(0.1)  # warmup starts above zero
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(110) == pytest.approx(at_end)
    if name == "cosine":
        assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_memory_estimate_follows_zero_sharding() -> None:
    train = TrainSpec(precision="bf16")
    params = 100_000_000
    ddp = memory_per_worker(params, TrainSpec(), None, 4).bytes_per_worker
    z1 = memory_per_worker(params, train, DeepSpeedSpec(zero_stage=1), 4).bytes_per_worker
    z2 = memory_per_worker(params, train, DeepSpeedSpec(zero_stage=2), 4).bytes_per_worker
    z3 = memory_per_worker(params, train, DeepSpeedSpec(zero_stage=3), 4).bytes_per_worker
    assert ddp == 16 * params  # fp32 weights, grads, two AdamW moments
    assert z1 == (2 + 2 + 12 / 4) * params
    assert z2 == (2 + 2 / 4 + 12 / 4) * params
    assert z3 == 16 / 4 * params
    assert ddp > z1 > z2 > z3


def test_parameter_count_without_allocating() -> None:
    spec = BertMLMModel(
        kind="bert_mlm", hidden_size=768, num_layers=12, num_heads=12, vocab_size=30522
    )
    assert 105e6 < count_parameters(spec, DataInfo()) < 115e6  # BERT-base


def test_data_cpu_check() -> None:
    check_data_cpus(ScalingSpec(num_workers=2, resources_per_worker={"CPU": 0.5}), 2)
    with pytest.raises(PlanError, match=r"2 workers x 1 CPU reserve 2 of the cluster's 2 CPUs"):
        check_data_cpus(ScalingSpec(num_workers=2), 2)


def test_cnn_shapes() -> None:
    for size, channels in ((28, 1), (32, 3)):
        spec = CNNModel(kind="cnn", image_size=size, in_channels=channels, channels=[8, 16, 32])
        model = build_model(spec, DataInfo(num_classes=10))
        assert model(torch.zeros(2, channels, size, size)).shape == (2, 10)


def test_resnet_and_gpt_build() -> None:
    resnet = build_model(
        {"kind": "resnet", "depth": 18, "num_classes": 7, "in_channels": 1, "image_size": 28},
        DataInfo(),
    )
    assert resnet(torch.zeros(2, 1, 28, 28)).shape == (2, 7)
    gpt = build_model(
        {"kind": "gpt_lm", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_seq_len": 16},
        DataInfo(vocab_size=100),
    )
    assert gpt(torch.zeros(2, 16, dtype=torch.long)).logits.shape == (2, 16, 100)


def test_vocab_must_cover_the_tokenizer() -> None:
    spec = BertMLMModel(kind="bert_mlm", hidden_size=32, num_layers=1, num_heads=2, vocab_size=50)
    with pytest.raises(ModelError, match=r"vocab_size 50 is smaller than the tokenizer's 100"):
        build_model(spec, DataInfo(vocab_size=100))


def test_pretrained_weights_load_from_a_local_path(tmp_path: Path) -> None:
    spec = {
        "kind": "bert_mlm",
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "max_seq_len": 16,
    }
    original = build_model(spec, DataInfo(vocab_size=60))
    original.save_pretrained(tmp_path / "bert")
    loaded = build_model(spec | {"pretrained": str(tmp_path / "bert")}, DataInfo(vocab_size=60))
    for (name, a), (_, b) in zip(
        original.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    with pytest.raises(ModelError, match=r"has no config\.json"):
        build_model(spec | {"pretrained": str(tmp_path)}, DataInfo(vocab_size=60))
    torch.save(
        build_model({"kind": "cnn"}, DataInfo(num_classes=10)).state_dict(), tmp_path / "cnn.pt"
    )
    build_model({"kind": "cnn", "pretrained": str(tmp_path / "cnn.pt")}, DataInfo())
    with pytest.raises(ModelError, match="does not fit the model"):
        build_model(
            {"kind": "cnn", "channels": [4], "pretrained": str(tmp_path / "cnn.pt")}, DataInfo()
        )


def test_custom_import_paths() -> None:
    assert resolve_custom("torchvision.models:resnet18").__name__ == "resnet18"
    with pytest.raises(ModelError, match=r"cannot import module 'nope'"):
        resolve_custom("nope:build")
    with pytest.raises(ModelError, match="has no function 'missing'"):
        resolve_custom("torch:missing")


def test_manifest_checks() -> None:
    base = Manifest(10, 0, 5, 2, 2, "bf16", "abc", {})
    base.check_resumable_by(Manifest(0, 0, 0, 2, 2, "bf16", "abc", {}), "ckpt")
    cases = [
        (Manifest(0, 0, 0, 2, 2, "bf16", "xyz", {}), "another model"),
        (Manifest(0, 0, 0, 4, 2, "bf16", "abc", {}), "ZeRO-2 shards of 2 workers"),
        (Manifest(0, 0, 0, 2, None, "bf16", "abc", {}), "this run uses plain DDP"),
        (Manifest(0, 0, 0, 2, 2, "fp32", "abc", {}), "written in bf16"),
    ]
    for other, message in cases:
        with pytest.raises(CheckpointMismatch, match=message):
            base.check_resumable_by(other, "ckpt")
    # Plain DDP checkpoints hold whole states: another world size may continue them.
    Manifest(10, 0, 5, 2, None, "fp32", "abc", {}).check_resumable_by(
        Manifest(0, 0, 0, 8, None, "fp32", "abc", {}), "ckpt"
    )


def test_config_hash_ignores_dropout_but_not_shape() -> None:
    a = BertMLMModel(kind="bert_mlm", hidden_size=32, num_layers=1, num_heads=2)
    assert config_hash(a, DataInfo(vocab_size=9)) == config_hash(
        a.model_copy(update={"dropout": 0.3}), DataInfo(vocab_size=9)
    )
    assert config_hash(a, DataInfo(vocab_size=9)) != config_hash(
        a.model_copy(update={"num_layers": 2}), DataInfo(vocab_size=9)
    )
    assert config_hash(a, DataInfo(vocab_size=9)) != config_hash(a, DataInfo(vocab_size=10))


def test_damaged_checkpoint_is_passed_over_for_the_newest_intact(tmp_path: Path) -> None:
    import ray.train

    from orchestrator.train.checkpoint import write_manifest
    from orchestrator.train.session import checkpoint_dirs, intact_checkpoint
    from orchestrator.train.trainer import resumable_checkpoint

    spec = load_workload(WORKLOADS / "local" / "mnist_cnn.yaml")
    run_dir = tmp_path / "runs" / spec.name
    for step in (2, 4, 6):
        (run_dir / f"step-{step:08d}").mkdir(parents=True)
        write_manifest(
            str(run_dir / f"step-{step:08d}"), Manifest(step, 0, step, 1, None, "fp32", "h", {})
        )
    (run_dir / "step-00000006" / "orch_checkpoint.json").write_text('{"step": 6, "epo')  # cut
    (run_dir / "step-00000004" / "orch_checkpoint.json").write_text("")  # a full disk
    assert checkpoint_dirs(str(run_dir)) == [str(run_dir / "step-00000002")]
    # The driver checks, and skips to, the newest intact checkpoint...
    assert resumable_checkpoint(str(tmp_path / "runs"), spec.name, spec, "h") == (
        str(run_dir / "step-00000002"),
        2,
    )
    # ...and a worker handed the damaged newest one by Ray Train resumes from the same.
    chosen = intact_checkpoint(ray.train.Checkpoint(str(run_dir / "step-00000006")))
    assert chosen is not None and chosen.path == str(run_dir / "step-00000002")
    (run_dir / "step-00000002" / "orch_checkpoint.json").write_text("null")
    assert intact_checkpoint(ray.train.Checkpoint(str(run_dir / "step-00000006"))) is None


def test_crafted_export_cannot_run_code(tmp_path: Path) -> None:
    from orchestrator.models import load_exported

    planted = tmp_path / "planted"
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.json").write_text(
        json.dumps(
            {
                "model": {"kind": "custom", "build": "os:makedirs", "args": {"name": str(planted)}},
                "data": {},
            }
        )
    )
    torch.save({}, export / "state_dict.pt")
    with pytest.raises(ModelError, match=r"custom model, built by calling 'os:makedirs'"):
        load_exported(export)
    assert not planted.exists()
    (export / "model.json").write_text('{"model": {"kind": "bert_mlm"')
    with pytest.raises(ModelError, match="not an orch model export"):
        load_exported(export)


def test_progress_printer_shows_every_report_once_in_order() -> None:
    """The driver's progress thread waits in the queue for reports; reports sent before the
    run ends, even ones still queued when it ends, are each shown once, in order."""
    import queue
    import threading

    from orchestrator.train.progress import ProgressPrinter

    channel: queue.Queue[dict[str, int] | None] = queue.Queue()
    shown: list[dict[str, int]] = []
    first_shown = threading.Event()

    def show(event: dict[str, int]) -> None:
        shown.append(event)
        first_shown.set()

    with ProgressPrinter(channel, show) as printer:
        channel.put({"step": 1})
        assert first_shown.wait(10), "a report waiting in the queue was not shown"
        for step in (2, 3, 4):
            channel.put({"step": step})
    assert [e["step"] for e in shown] == [1, 2, 3, 4]
    assert printer.events == shown
