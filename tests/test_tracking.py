"""Tracking on a real `mlflow server` (SQLite backend, loopback port) and on the embedded store."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from builders import quoted, tiny_cnn
from mlflow.tracking import MlflowClient
from servers import MlflowServer
from test_secrets import SECRETS, URI_PASSWORD, _leaks
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.driver import RunError, run_workload
from orchestrator.tracking import promotion

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


@pytest.fixture
def server(mlflow_server: MlflowServer) -> MlflowServer:
    return mlflow_server


# The tiny CNN on 3000 images, checkpointed every 2 steps, tracked in MLflow.
TRACKED = [
    "name=mnist-tracked",
    "model.channels=[8, 16]",
    "data.limit=3000",
    "train.eval_batches=2",
    "train.checkpoint_every=2",
    "train.optimizer.weight_decay=0.01",
    "tracking.mlflow.enabled=true",
]


@pytest.mark.timeout(600)
def test_run_is_recorded_and_model_registered(
    server: MlflowServer,
    shared_data: Path,
    data_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = tiny_cnn(
        shared_data,
        data_cache,
        tmp_path,
        *TRACKED,
        # Credentials in the URI (the server has no auth and ignores them) and in env vars:
        # none may reach a param, tag or artifact.
        f"tracking.mlflow.tracking_uri={quoted(server.uri.replace('://', f'://u:{URI_PASSWORD}@'))}",
        SECRETS[0],
        "tracking.mlflow.experiment=mnist-exp",
        "tracking.mlflow.register_as=mnist-cnn",
        "tracking.mlflow.promote_if=eval_accuracy >= 0.0 and eval_loss < 100",
    )
    default = os.environ.get("MLFLOW_TRACKING_URI")
    result = run_workload(spec)
    # The process's default store is as it was: the next run here must not track to this server.
    assert os.environ.get("MLFLOW_TRACKING_URI") == default
    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "mnist-exp"
    params = run.data.params
    assert params["train.max_steps"] == "6" and params["model.kind"] == "cnn"
    assert params["scaling.resources_per_worker.CPU"] == "0.5"
    tags = run.data.tags
    assert tags["orch.run_name"] == "mnist-tracked" and tags["orch.host"]
    assert {
        "orch.version.torch",
        "orch.version.ray",
        "orch.version.deepspeed",
        "orch.version.transformers",
        "orch.git_commit",
        "orch.data_hash",
    } <= set(tags)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_accuracy")] == [6]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"workload.yaml", "checkpoints", "model_export"} <= artifacts
    assert tags["orch.promoted"] == "true" and "eval_loss" in tags["orch.promotion_reason"]
    versions = client.search_model_versions("name = 'mnist-cnn'")
    assert len(versions) == 1 and versions[0].run_id == run.info.run_id
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    model = mlflow.pytorch.load_model("models:/mnist-cnn/1")
    import torch

    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    assert params["cluster.runtime_env.env_vars.MLFLOW_TRACKING_PASSWORD"] == "***"
    assert _leaks(json.dumps(params)) == [] and _leaks(json.dumps(tags)) == []
    root = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    for file in (p for p in root.rglob("*") if p.is_file()):
        assert _leaks(file.read_bytes().decode("latin-1")) == [], file


@pytest.mark.timeout(600)
def test_model_not_promoted_is_not_registered(
    server: MlflowServer, shared_data: Path, data_cache: Path, tmp_path: Path
) -> None:
    spec = tiny_cnn(
        shared_data,
        data_cache,
        tmp_path,
        *TRACKED,
        f"tracking.mlflow.tracking_uri={server.uri}",
        "tracking.mlflow.register_as=never",
        "tracking.mlflow.promote_if=eval_accuracy > 2",
    )
    result = run_workload(spec)
    client = MlflowClient(tracking_uri=server.uri)
    tags = client.get_run(result.mlflow_run_id).data.tags
    assert tags["orch.promoted"] == "false"
    assert "eval_accuracy" in tags["orch.promotion_reason"]
    assert client.search_model_versions("name = 'never'") == []
    assert any("not registered" in note for note in result.notes)


@pytest.mark.timeout(900)
def test_server_down_mid_run_loses_no_metric(
    server: MlflowServer,
    shared_data: Path,
    data_cache: Path,
    tmp_path: Path,
    wait_for_checkpoint: Any,
) -> None:
    spec = tiny_cnn(
        shared_data,
        data_cache,
        tmp_path,
        *TRACKED,
        f"tracking.mlflow.tracking_uri={server.uri}",
        "train.max_steps=40",
    )
    run_dir = tmp_path / "runs" / "mnist-tracked"

    def outage() -> None:  # down after the first checkpoint, back some reports later
        wait_for_checkpoint(run_dir, "step-00000002")
        server.stop()
        wait_for_checkpoint(run_dir, "step-00000012")
        server.start()

    thread = threading.Thread(target=outage)
    thread.start()
    result = run_workload(spec)
    thread.join()
    assert result.history[-1]["step"] == 40
    client = MlflowClient(tracking_uri=server.uri)
    steps = [m.step for m in client.get_metric_history(result.mlflow_run_id, "loss")]
    assert sorted(steps) == list(range(2, 41, 2))
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"


def test_unreachable_server_fails_fast_unless_no_tracking(
    shared_data: Path, data_cache: Path, tmp_path: Path
) -> None:
    spec = tiny_cnn(
        shared_data,
        data_cache,
        tmp_path,
        *TRACKED,
        "tracking.mlflow.tracking_uri=http://user:s3cret@127.0.0.1:9",
        "train.max_steps=2",
    )
    started = time.monotonic()
    with pytest.raises(RunError, match=r"cannot use the MLflow server .*--no-tracking") as info:
        run_workload(spec)
    assert time.monotonic() - started < 60
    assert "s3cret" not in str(info.value) and "user:***@" in str(info.value)
    result = run_workload(spec, tracking=False)
    assert result.mlflow_run_id is None and result.history[-1]["step"] == 2


@pytest.mark.timeout(600)
def test_embedded_default_store(
    shared_data: Path, data_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    spec = tiny_cnn(shared_data, data_cache, tmp_path, *TRACKED, "train.max_steps=2")
    result = run_workload(spec)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (tmp_path / "mlflow.db").is_file()
    run = MlflowClient(tracking_uri=store).get_run(result.mlflow_run_id)
    assert run.data.metrics["loss"] > 0
    table = CliRunner().invoke(app, ["runs", "--experiment", "mnist-tracked"])
    assert table.exit_code == 0, table.output
    assert "mnist-tracked" in table.output and "FINISHED" in table.output
    assert result.mlflow_run_id[:12] in table.output


def test_promotion_conditions() -> None:
    assert promotion("eval_loss < 2.0", {"eval_loss": 1.5})[0]
    assert not promotion("eval_loss < 2.0", {"eval_loss": 2.5})[0]
    ok, reason = promotion("eval_loss < 2 and eval_accuracy >= 0.5", {"eval_loss": 1.0})
    assert not ok and reason == "eval_accuracy was not reported"
    assert promotion(None, {}) == (True, "no promote_if condition")


@pytest.mark.timeout(900)
def test_server_down_until_the_end_keeps_reports_for_upload(
    server: MlflowServer,
    shared_data: Path,
    data_cache: Path,
    tmp_path: Path,
    wait_for_checkpoint: Any,
) -> None:
    spec = tiny_cnn(
        shared_data,
        data_cache,
        tmp_path,
        *TRACKED,
        f"tracking.mlflow.tracking_uri={server.uri}",
        "train.max_steps=10",
    )

    def outage() -> None:
        wait_for_checkpoint(tmp_path / "runs" / "mnist-tracked", "step-00000002")
        server.stop()

    thread = threading.Thread(target=outage)
    thread.start()
    result = run_workload(spec)
    thread.join()
    assert result.history[-1]["step"] == 10  # training never waited on the server
    pending = tmp_path / "runs" / "mnist-tracked" / "mlflow_pending.jsonl"
    assert any(str(pending) in note for note in result.notes)
    server.start()
    upload = CliRunner().invoke(app, ["runs", "upload", str(pending)])
    assert upload.exit_code == 0, upload.output
    client = MlflowClient(tracking_uri=server.uri)
    steps = [m.step for m in client.get_metric_history(result.mlflow_run_id, "loss")]
    assert sorted(steps) == [2, 4, 6, 8, 10]
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    assert pending.with_suffix(".uploaded").is_file()
