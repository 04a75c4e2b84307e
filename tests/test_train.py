"""Training on a real local Ray: ZeRO 0-3 on 2 CPU workers, learning, recovery, resume, refusals."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from builders import tiny_bert, tiny_cnn

from orchestrator.driver import RunError, TrainingFailed, run_workload
from orchestrator.models import load_exported

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


def _steps(history: list[dict[str, Any]]) -> list[int]:
    return [e["step"] for e in history]


def _kill_a_worker_once_checkpointed(
    wait: Callable[[Path, str], bool], run_dir: Path, checkpoint: str, killed: list[int]
) -> None:
    """SIGKILL one training worker as soon as Ray has registered `checkpoint` for the run."""
    if not wait(run_dir, checkpoint):
        return
    for proc in psutil.process_iter(["cmdline"]):
        if "ray::RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
            proc.send_signal(signal.SIGKILL)
            killed.append(proc.pid)
            return


def _check_zero_run(result: Any, stage: int, precision: str, steps: int) -> None:
    """A DeepSpeed run's checkpoint manifest, and its consolidated fp32 export."""
    checkpoint = Path(result.checkpoint)
    manifest = json.loads((checkpoint / "orch_checkpoint.json").read_text())
    assert manifest["zero_stage"] == stage and manifest["world_size"] == 2
    assert manifest["step"] == steps and manifest["precision"] == precision
    assert set(manifest["versions"]) >= {"torch", "ray", "deepspeed", "transformers"}
    # The export is consolidated fp32 (from ZeRO shards too) and loads with plain torch.
    state = torch.load(Path(result.model_dir) / "state_dict.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


# ZeRO-0 runs in test_bert_loss_falls and test_cnn_learns_mnist: each Train start-up costs
# half a minute here, so the learning runs double as the stage-0 runs.
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bert_with_zero_stages(
    stage: int, shared_data: Path, data_cache: Path, tmp_path: Path
) -> None:
    spec = tiny_bert(
        shared_data,
        data_cache,
        tmp_path,
        f"deepspeed.zero_stage={stage}",
        "train.precision=bf16",
        "train.global_batch_size=64",
    )
    result = run_workload(spec)
    assert _steps(result.history) == [2, 4, 6]
    final = result.history[-1]
    assert (
        final["eval_loss"] > 0 and 0 <= final["eval_accuracy"] <= 1 and final["eval_perplexity"] > 1
    )
    assert final["tokens_per_s"] > 0 and final["data_wait_s"] >= 0
    _check_zero_run(result, stage, "bf16", 6)
    model = load_exported(result.model_dir)
    assert sum(p.numel() for p in model.parameters()) > 100_000


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_cnn_with_zero_stages(
    stage: int, shared_data: Path, data_cache: Path, tmp_path: Path
) -> None:
    spec = tiny_cnn(shared_data, data_cache, tmp_path, f"deepspeed.zero_stage={stage}")
    result = run_workload(spec)
    final = result.history[-1]
    assert final["step"] == 6
    assert {"eval_accuracy", "eval_precision", "eval_recall", "eval_f1"} <= set(final)
    _check_zero_run(result, stage, "fp32", 6)
    model = load_exported(result.model_dir)
    logits = model(torch.zeros(2, 1, 28, 28))
    assert logits.shape == (2, 10)


@pytest.mark.timeout(600)
def test_cnn_learns_mnist(shared_data: Path, data_cache: Path, tmp_path: Path) -> None:
    spec = tiny_cnn(
        shared_data,
        data_cache,
        tmp_path,
        "deepspeed.zero_stage=0",
        "train.max_steps=null",
        "train.epochs=2",
        "train.micro_batch_size=64",
        "train.log_every=20",
        "train.eval_batches=null",
        "train.scheduler={name: cosine, warmup_steps: 10}",
    )
    result = run_workload(spec)
    final = result.history[-1]
    assert final["eval_accuracy"] >= 0.90, final
    assert final["eval_f1"] >= 0.88
    assert {"eval_precision", "eval_recall"} <= set(final)
    _check_zero_run(result, 0, "fp32", final["step"])
    logits = load_exported(result.model_dir)(torch.zeros(2, 1, 28, 28))
    assert logits.shape == (2, 10)


@pytest.mark.timeout(600)
def test_bert_loss_falls(shared_data: Path, data_cache: Path, tmp_path: Path) -> None:
    spec = tiny_bert(
        shared_data,
        data_cache,
        tmp_path,
        "deepspeed.zero_stage=0",
        "train.max_steps=60",
        "train.log_every=5",
        "train.eval_every=30",
        "train.scheduler={name: linear, warmup_steps: 5}",
    )
    result = run_workload(spec)
    losses = [e["loss"] for e in result.history]
    # From about ln(500) = 6.2 at the start: a tiny model, 60 steps on a CPU.
    assert losses[-1] < losses[0] - 0.5, losses
    evals = [e["eval_loss"] for e in result.history if "eval_loss" in e]
    assert evals[-1] < evals[0]
    final = result.history[-1]
    assert 0 <= final["eval_accuracy"] <= 1 and final["eval_perplexity"] > 1
    _check_zero_run(result, 0, "fp32", 60)
    model = load_exported(result.model_dir)
    assert sum(p.numel() for p in model.parameters()) > 100_000


@pytest.mark.timeout(600)
def test_killed_worker_is_recovered_from_last_checkpoint(
    shared_data: Path, data_cache: Path, tmp_path: Path, wait_for_checkpoint: Callable[..., bool]
) -> None:
    spec = tiny_bert(
        shared_data,
        data_cache,
        tmp_path,
        "train.max_steps=24",
        "train.log_every=2",
        "train.checkpoint_every=6",
        "scaling.max_failures=1",
    )
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_a_worker_once_checkpointed,
        args=(wait_for_checkpoint, tmp_path / "runs" / "bert", "step-00000006", killed),
    )
    killer.start()
    result = run_workload(spec)
    killer.join()
    assert killed, "no worker was killed"
    # max_failures 0 would have failed the run: finishing means the workers were restarted.
    steps = _steps(result.history)
    assert steps[-1] == 24 and set(steps) == set(range(2, 25, 2)), steps
    redone = [s for s in set(steps) if steps.count(s) > 1]
    assert all(s > 6 for s in redone), f"steps before the checkpoint were redone: {steps}"
    assert json.loads((Path(result.checkpoint) / "orch_checkpoint.json").read_text())["step"] == 24


@pytest.fixture(scope="module")
def cnn_run(
    local_ray: None, shared_data: Path, data_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Any]:
    """A finished 4-step CNN run, shared by the tests that rerun it or run another model over it
    (each Train run costs a start-up of Ray Train): its directory's root, and its result."""
    root = tmp_path_factory.mktemp("cnn-run")
    return root, run_workload(tiny_cnn(shared_data, data_cache, root, "train.max_steps=4"))


@pytest.mark.timeout(600)
def test_rerun_resumes_instead_of_starting_over(
    cnn_run: tuple[Path, Any], shared_data: Path, data_cache: Path
) -> None:
    tmp_path, first = cnn_run
    assert _steps(first.history) == [2, 4]
    again = run_workload(tiny_cnn(shared_data, data_cache, tmp_path, "train.max_steps=8"))
    assert _steps(again.history) == [6, 8]  # continued from step 4
    finished = run_workload(tiny_cnn(shared_data, data_cache, tmp_path, "train.max_steps=8"))
    assert finished.history == []  # nothing left to do; the finished run is kept
    assert finished.checkpoint == again.checkpoint
    # A damaged newest manifest (a full disk, a copy cut short): Ray Train still hands that
    # checkpoint to the workers, which resume from the newest intact one instead.
    assert again.checkpoint is not None
    (Path(again.checkpoint) / "orch_checkpoint.json").write_text('{"step": 8, "ep')
    repaired = run_workload(tiny_cnn(shared_data, data_cache, tmp_path, "train.max_steps=8"))
    assert _steps(repaired.history) == [6, 8]  # from step 4, the newest intact checkpoint
    assert (
        json.loads((Path(repaired.checkpoint or "") / "orch_checkpoint.json").read_text())["step"]
        == 8
    )  # written whole again


@pytest.mark.timeout(600)
def test_interrupted_run_resumes_on_rerun(
    shared_data: Path, data_cache: Path, tmp_path: Path, wait_for_checkpoint: Callable[..., bool]
) -> None:
    spec = tiny_cnn(
        shared_data, data_cache, tmp_path, "train.max_steps=12", "train.checkpoint_every=4"
    )
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_a_worker_once_checkpointed,
        args=(wait_for_checkpoint, tmp_path / "runs" / "mnist", "step-00000004", killed),
    )
    killer.start()
    with pytest.raises(TrainingFailed):
        run_workload(spec)  # max_failures 0: the run stops, its checkpoints stay
    killer.join()
    assert killed
    assert list((tmp_path / "runs" / "mnist").glob("step-*"))
    resumed = run_workload(spec)
    assert resumed.history[0]["step"] > 4
    assert resumed.history[-1]["step"] == 12


@pytest.mark.timeout(600)
def test_checkpoint_of_another_model_is_refused(
    cnn_run: tuple[Path, Any], shared_data: Path, data_cache: Path
) -> None:
    tmp_path, first = cnn_run  # the run's own checkpoints, maybe continued by the rerun test
    run_dir = Path(first.path)
    saved = {p: p.read_bytes() for p in run_dir.glob("step-*/*") if p.is_file()}
    assert saved
    other = tiny_cnn(
        shared_data, data_cache, tmp_path, "model.channels=[8, 16]", "train.max_steps=10"
    )
    with pytest.raises(RunError, match="written for another model"):
        run_workload(other)
    zero = tiny_cnn(
        shared_data, data_cache, tmp_path, "deepspeed.zero_stage=2", "train.max_steps=10"
    )
    with pytest.raises(RunError, match=r"plain DDP .* this run uses DeepSpeed ZeRO-2"):
        run_workload(zero)
    # Nothing was lost or changed.
    assert {p: p.read_bytes() for p in run_dir.glob("step-*/*") if p.is_file()} == saved


def test_missing_custom_model_fails_before_ray(
    shared_data: Path, data_cache: Path, tmp_path: Path
) -> None:
    spec = tiny_cnn(
        shared_data, data_cache, tmp_path, "model={kind: custom, build: 'no_such_pkg.models:build'}"
    )
    with pytest.raises(RunError, match=r"cannot import module 'no_such_pkg\.models'"):
        run_workload(spec)
    spec = tiny_cnn(
        shared_data, data_cache, tmp_path, "model={kind: custom, build: 'torch.nn:nothing'}"
    )
    with pytest.raises(RunError, match=r"module 'torch\.nn' has no function 'nothing'"):
        run_workload(spec)


@pytest.mark.timeout(600)
def test_custom_model(tmp_path: Path, data_cache: Path) -> None:
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    src = tmp_path / "cifar"
    src.mkdir()
    for name, n in (("data_batch_1", 256), ("test_batch", 64)):
        batch = {
            b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, n)),
        }
        (src / name).write_bytes(pickle.dumps(batch))
    # A torchvision ResNet-18 on the CIFAR batches above; the rest at the spec's defaults.
    spec = tiny_cnn(
        src,
        data_cache,
        tmp_path,
        "name=custom",
        "model={kind: custom, build: 'torchvision.models:resnet18', args: {num_classes: 10}}",
        "data.format=auto",
        "data.eval_fraction=0.05",
        "train.max_steps=2",
        "train.micro_batch_size=8",
        "train.log_every=10",
        "train.eval_batches=null",
        "train.optimizer.lr=1e-4",
        "train.optimizer.weight_decay=0.01",
    )
    result = run_workload(spec)
    assert result.history[-1]["step"] == 2
    assert "eval_accuracy" in result.history[-1]


def test_model_too_large_is_refused(shared_data: Path, data_cache: Path, tmp_path: Path) -> None:
    spec = tiny_bert(
        shared_data,
        data_cache,
        tmp_path,
        "model.hidden_size=8192",
        "model.num_layers=48",
        "model.num_heads=64",
        "model.vocab_size=50000",
    )
    with pytest.raises(
        RunError, match=r"model: .*M parameters.*needs ~\d+.* GB .*this machine has"
    ):
        run_workload(spec)


def test_ray_train_settings_orch_changes_leave_the_users_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """orch shortens Ray Train's report poll and, on a local Ray, drops its preemption
    watcher; a value the user set in the environment stays."""
    from orchestrator.ray_session import ray_session

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.5")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "")
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")  # restored (absent) afterwards
    with ray_session():
        assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.5"
        assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    with ray_session(address="auto"):  # an existing Ray: it may have nodes to watch
        assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2"


def test_data_cpus_left_for_ray_data(shared_data: Path, data_cache: Path, tmp_path: Path) -> None:
    spec = tiny_cnn(shared_data, data_cache, tmp_path, "scaling.resources_per_worker={CPU: 1}")
    with pytest.raises(RunError, match=r"reserve 2 of the cluster's 2 CPUs.*resources_per_worker"):
        run_workload(spec)


def test_label_beyond_model_classes(shared_data: Path, data_cache: Path, tmp_path: Path) -> None:
    spec = tiny_cnn(shared_data, data_cache, tmp_path, "model.num_classes=5")
    with pytest.raises(RunError, match=r"model.num_classes is 5 but the data has 10 classes"):
        run_workload(spec)


def test_training_split_smaller_than_a_batch(
    shared_data: Path, data_cache: Path, tmp_path: Path
) -> None:
    spec = tiny_cnn(
        shared_data, data_cache, tmp_path, "data.limit=100", "train.micro_batch_size=64"
    )
    with pytest.raises(RunError, match=r"training split \(\d+ rows\) is smaller than one global"):
        run_workload(spec)
