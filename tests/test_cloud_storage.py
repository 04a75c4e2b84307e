"""Data, cache and run storage on s3://, against moto's S3 server on a loopback port (the `s3`
fixture): credentials from the environment only. Unit tests, no Ray, but for the last one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pytest
from builders import LOCAL, quoted
from servers import MlflowServer, S3Server
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.data.sources import find_source
from orchestrator.errors import RunError
from orchestrator.runlock import run_lock
from orchestrator.storage import check_location, download_dir, read_text
from orchestrator.tracking.mlflow_run import _manifests
from orchestrator.train.trainer import publish_model

BUCKET = S3Server.BUCKET
ROWS = 240


def _table(rows: int = ROWS) -> pa.Table:
    """Two classes that four numeric features separate."""
    rng = np.random.default_rng(0)
    label = np.arange(rows) % 2
    features = {f"f{i}": rng.normal(label * (i + 1), 1.0) for i in range(4)}
    return pa.table({**features, "target": pa.array(label, pa.int64())})


def _put_csv(s3: S3Server, key: str, table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink)
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=sink.getvalue().to_pybytes())
    return f"s3://{BUCKET}/{key}"


def _run_cli(*sets: str) -> tuple[int, str]:
    """`orch run` of the tabular workload, in-process: the input errors come before Ray starts."""
    args = ["run", str(LOCAL / "tabular_mlp.yaml"), "--no-tracking"]
    for each in sets:
        args += ["--set", each]
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def test_source_on_s3_lists_its_objects(s3: S3Server) -> None:
    _put_csv(s3, "data/b.csv", _table(10))
    _put_csv(s3, "data/a.csv", _table(10))
    _put_csv(s3, "data/_skipped.csv", _table(10))
    source = find_source(f"s3://{BUCKET}/data/*.csv")
    assert source.files == (f"{BUCKET}/data/a.csv", f"{BUCKET}/data/b.csv")
    assert all(size > 0 for size in source.sizes)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("data.train", "s3://no-such-bucket/data/*.csv", "the bucket 'no-such-bucket' does not"),
        ("data.train", f"s3://{BUCKET}/nothing-here/", f"s3://{BUCKET}/nothing-here/: no such"),
        ("data.cache_dir", "s3://no-cache-bucket/cache", "data.cache_dir: s3://no-cache-bucket"),
        ("train.storage_path", "s3://no-runs-bucket/runs", "train.storage_path: s3://no-runs"),
    ],
)
def test_bad_s3_location_exits_2_naming_it(
    s3: S3Server, tmp_path: Path, field: str, value: str, expected: str
) -> None:
    train = _put_csv(s3, "good/table.csv", _table(40))
    local = [f"data.cache_dir={quoted(tmp_path / 'cache')}", f"train.storage_path={tmp_path}"]
    code, output = _run_cli(f"data.train={train}", *local, f"{field}={value}")
    assert code == 2, output
    assert expected in " ".join(output.split()), output
    assert not (tmp_path / "cache").exists()  # refused before anything was prepared


def test_wrong_credentials_exit_2_without_the_secret(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train = _put_csv(s3, "good/table.csv", _table(40))
    real_secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    wrong = "wrong-secret-0123456789abcdef"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    code, output = _run_cli(f"data.train={train}", f"train.storage_path={tmp_path}")
    assert code == 2, output
    text = " ".join(output.split())
    assert "access denied" in text and "AWS_SECRET_ACCESS_KEY" in text, output
    assert f"data.train: {train}" in text
    assert wrong not in output and real_secret not in output


def test_data_prepare_names_a_bad_s3_location_without_the_secret(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`orch data prepare` (no run's checks before it): a missing bucket for the data or the
    cache, and wrong credentials, are exit 2 naming the object; no secret in the output."""
    train = _put_csv(s3, "good/table.csv", _table(40))
    workload = str(LOCAL / "tabular_mlp.yaml")

    def prepare_cli(*sets: str) -> tuple[int, str]:
        args = ["data", "prepare", workload]
        for each in sets:
            args += ["--set", each]
        result = CliRunner().invoke(app, args)
        return result.exit_code, " ".join(result.output.split())

    cache = f"data.cache_dir={quoted(tmp_path / 'cache')}"
    code, text = prepare_cli("data.train=s3://no-such-bucket/t.csv", cache)
    assert code == 2 and "the bucket 'no-such-bucket' does not exist" in text, text
    code, text = prepare_cli(f"data.train={train}", "data.cache_dir=s3://no-cache-bucket/c")
    assert code == 2 and "data.cache_dir: s3://no-cache-bucket/c" in text, text
    assert "does not exist" in text, text
    real_secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789abcdef")
    code, text = prepare_cli(f"data.train={train}", cache)
    assert code == 2 and "access denied" in text and train in text, text
    assert "wrong-secret" not in text and real_secret not in text


def test_model_upload_lands_under_the_run(s3: S3Server, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text('{"kind": "mlp"}')
    (model / "model.onnx").write_bytes(b"\0" * 10)
    run = f"s3://{BUCKET}/runs/tab"
    assert publish_model(str(model), run) == f"{run}/model"
    assert s3.keys("runs/") == ["runs/tab/model/model.json", "runs/tab/model/model.onnx"]
    back = tmp_path / "back"
    assert download_dir(f"{run}/model", str(back))
    assert (back / "model.json").read_text() == '{"kind": "mlp"}'
    assert not download_dir(f"s3://{BUCKET}/runs/none/model", str(tmp_path / "none"))
    assert publish_model(str(model), str(tmp_path / "local-run")) == str(model)  # local: as is


def test_manifests_are_read_from_s3(s3: S3Server, tmp_path: Path) -> None:
    client = s3.client()
    for step in (2, 4):
        key = f"runs/tab/step-{step:08d}/orch_checkpoint.json"
        client.put_object(Bucket=BUCKET, Key=key, Body=json.dumps({"step": step}).encode())
    client.put_object(Bucket=BUCKET, Key="runs/tab/step-00000006/state.pt", Body=b"torn")
    found = _manifests(f"s3://{BUCKET}/runs/tab/step-00000004")
    assert [name for name, _ in found] == ["step-00000002", "step-00000004"]
    assert json.loads(found[1][1]) == {"step": 4}
    assert read_text(f"s3://{BUCKET}/runs/tab/step-00000006/orch_checkpoint.json") is None


def test_check_location_and_run_lock_on_s3(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_location(f"s3://{BUCKET}/anything/*.csv", "data.train")  # the bucket is there
    check_location(str(tmp_path / "not-yet"), "train.storage_path")  # local: not checked here
    with pytest.raises(RunError, match="'missing-bucket' does not exist"):
        check_location("s3://missing-bucket/runs", "train.storage_path")
    monkeypatch.chdir(tmp_path)  # restored after: later tests read the repository's files
    with run_lock(f"s3://{BUCKET}/runs", "tab"):  # no lock on object storage, no local debris
        pass
    assert list(tmp_path.iterdir()) == []


def test_tabular_data_prepared_from_s3_into_an_s3_cache(s3: S3Server) -> None:
    from orchestrator.data import prepare
    from orchestrator.spec import DataSpec

    train = _put_csv(s3, "tables/train.csv", _table())
    spec = DataSpec.model_validate(
        {
            "train": train,
            "format": "tabular",
            "label_column": "target",
            "eval_fraction": 0.25,
            "cache_dir": f"s3://{BUCKET}/cache",
        }
    )
    prepared = prepare(spec)
    splits = prepared.manifest["splits"]
    assert splits["train"]["rows"] + splits["eval"]["rows"] == ROWS
    assert all(f.startswith(f"{BUCKET}/cache/") for f in prepared.files("train"))
    assert any(k.endswith("manifest.json") for k in s3.keys("cache/"))
    again = prepare(spec)  # found in the cache on s3, not prepared twice
    assert again.manifest == prepared.manifest


# ---------------------------------------------------------------------------- end to end


def _orch(
    env: dict[str, str], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _kill_a_worker_at(
    fs: pafs.FileSystem, snapshot: str, checkpoint: str, killed: list[int], done: threading.Event
) -> None:
    """SIGKILL the training worker once Ray has registered `checkpoint` in the s3 run dir."""
    while not done.is_set():
        try:
            with fs.open_input_stream(snapshot) as f:
                if checkpoint in f.read().decode():
                    break
        except (FileNotFoundError, OSError):
            pass
        time.sleep(0.2)
    else:
        return
    for proc in psutil.process_iter(["cmdline"]):
        if "ray::RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
            proc.kill()
            killed.append(proc.pid)
            return


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_s3_end_to_end_prepare_train_kill_resume_export_track(
    s3: S3Server, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """Data, cache and runs on s3: a run whose worker is killed after its first checkpoint
    fails (no restarts), the rerun resumes from the s3 checkpoint, exports into
    `<storage>/<name>/model` with its ONNX file, and MLflow gets the manifests and the model.

    `orch run` runs as a real subprocess: its Ray starts with the environment the s3 fixture set
    (a local Ray's workers inherit the environment of `ray.init`, not later changes).
    """
    from mlflow.tracking import MlflowClient

    # The session's Ray, if an earlier test started it, stays idle meanwhile: it was started
    # without these credentials, and `orch run` starts one of its own (never joins it).
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    train = _put_csv(s3, "tables/train.csv", _table())
    storage = f"s3://{BUCKET}/runs"
    sets = [
        f"data.train={train}",
        f"data.cache_dir=s3://{BUCKET}/cache",
        f"train.storage_path={storage}",
        "name=tab-s3",
        "train.max_steps=16",
        "train.micro_batch_size=16",
        "train.log_every=1",
        "train.eval_every=null",
        "train.checkpoint_every=4",
        "scaling.num_workers=1",
        "scaling.resources_per_worker={CPU: 0.5}",
        "scaling.max_failures=0",
        "tracking.mlflow.enabled=true",
        f"tracking.mlflow.tracking_uri={mlflow_server.uri}",
        "tracking.mlflow.experiment=s3",
        "tracking.mlflow.register_as=tab-s3",
        "export={formats: [onnx]}",
    ]
    args = ["run", str(LOCAL / "tabular_mlp.yaml")] + [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server.uri)
    env.pop("RAY_ADDRESS", None)

    fs, _ = pafs.FileSystem.from_uri(storage)
    killed: list[int] = []
    done = threading.Event()
    snapshot = f"{BUCKET}/runs/tab-s3/checkpoint_manager_snapshot.json"
    killer = threading.Thread(
        target=_kill_a_worker_at, args=(fs, snapshot, "step-00000004", killed, done)
    )
    killer.start()
    try:
        first = _orch(env, *args)
    finally:
        done.set()
        killer.join()
    assert killed, first.stdout + first.stderr
    assert first.returncode == 1, first.stdout + first.stderr  # training failed, checkpoints kept
    kept = [k for k in s3.keys("runs/tab-s3/") if k.endswith("orch_checkpoint.json")]
    assert kept, s3.keys("runs/")

    second = _orch(env, *args)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output
    model = s3.keys("runs/tab-s3/model/")
    assert {"runs/tab-s3/model/model.json", "runs/tab-s3/model/state_dict.pt"} <= set(model)
    assert "runs/tab-s3/model/model.onnx" in model and "runs/tab-s3/model/exports.json" in model
    assert not list(Path().glob("orch_exports/tab-s3/model"))  # not left in a local directory
    key = "runs/tab-s3/model/model.json"
    meta = json.loads(s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
    assert meta["checkpoint"]["step"] == 16
    # Resumed from the killed run's newest checkpoint, not from the start.
    assert "step 1/16" not in output and "step 16/16" in output, output

    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("s3").experiment_id], "tags.`orch.run_name` = 'tab-s3'"
    )
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    checkpoints = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    assert "checkpoints/step-00000016" in checkpoints, checkpoints
    local = client.download_artifacts(
        run_id, f"{checkpoints[-1]}/orch_checkpoint.json", str(tmp_path)
    )
    manifest = json.loads(Path(local).read_text())
    assert manifest["step"] == 16 and manifest["world_size"] == 1
    exported = {a.path for a in client.list_artifacts(run_id, "model_export")}
    assert {"model_export/model.json", "model_export/model.onnx"} <= exported, exported
    (version,) = client.search_model_versions("name = 'tab-s3'")  # the model, logged and registered
    assert version.run_id == run_id

    # `orch export` of the run on s3: exported here, uploaded back beside the model, tracked.
    from orchestrator import api

    done = api.export(f"{storage}/tab-s3", ["torchscript"], tracking_uri=mlflow_server.uri)
    assert done.model_dir == f"{storage}/tab-s3/model" and done.mlflow_run_id == run_id
    assert "runs/tab-s3/model/model.torchscript.pt" in s3.keys("runs/tab-s3/model/")
    assert "runs/tab-s3/model/model.onnx" in s3.keys("runs/tab-s3/model/")  # kept

    # The secret key never leaves the environment: not printed, not an MLflow param or tag.
    assert secret not in first.stdout + first.stderr and secret not in output
    assert all(secret not in v for v in [*run.data.params.values(), *run.data.tags.values()])
