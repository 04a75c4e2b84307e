"""Secrets never shown: URIs, env vars and tokens masked in output, files, MLflow and errors."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml
from builders import LOCAL, quoted
from typer.testing import CliRunner, Result

from orchestrator import load_workload
from orchestrator.cli import app
from orchestrator.masking import is_secret_name, mask, mask_env

runner = CliRunner()

ENV_SECRET = "s3cr3t-value"
AWS_SECRET = "aws-s3cr3t-key"
URI_PASSWORD = "p@ss"
SECRETS = [
    f"cluster.runtime_env.env_vars={{MLFLOW_TRACKING_PASSWORD: {ENV_SECRET}, "
    f"AWS_SECRET_ACCESS_KEY: {AWS_SECRET}, WANDB_MODE: disabled}}",
    f"tracking.mlflow.tracking_uri=http://user:{URI_PASSWORD}@host:5000",
]


def _leaks(text: str) -> list[str]:
    return [s for s in (ENV_SECRET, AWS_SECRET, URI_PASSWORD) if s in text]


def _failed_cleanly(result: Result) -> bool:
    """An exit through orch's error table, not an exception (which would print a traceback)."""
    return result.exit_code != 0 and isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    ("text", "secret", "shown"),
    [
        ("http://user:secret@host:5000/x", "secret", "http://user:***@host:5000/x"),
        ("http://user:pa/ss@host:5000", "pa/ss", "http://user:***@host:5000"),
        ("http://user:p@ss@host:5000", "ss@", "http://user:***@host:5000"),
        ("https://:tok3n@host/api", "tok3n", "https://***@host/api"),
        ("https://T0KEN@host", "T0KEN", "https://***@host"),
        ("see (https://u:pw1@h:1/a) or http://u:pw2@h", "pw", "(https://u:***@h:1/a) or"),
        ("s3://AKIA:s3/cr3t@bucket/key", "cr3t", "s3://AKIA:***@bucket/key"),
        (
            "https://h/f?X-Amz-Credential=AKIA/x&X-Amz-Signature=ab12&sig=cd34&n=1",
            "AKIA",
            "X-Amz-Credential=***&X-Amz-Signature=***&sig=***&n=1",
        ),
        ("https://h/?token=zq1&access_token=zq2&password=zq3&key=zq4", "zq", "?token=***&"),
        ("Authorization: Bearer eyJhbGciOi.xyz", "eyJ", "Authorization: Bearer ***"),
        ("{'AWS_SECRET_ACCESS_KEY': 'abc123'}", "abc123", "{'AWS_SECRET_ACCESS_KEY': '***'}"),
    ],
)
def test_mask_hides_credentials_and_keeps_the_host(text: str, secret: str, shown: str) -> None:
    masked = mask(text)
    assert shown in masked
    assert secret not in masked.replace(shown, "")
    assert mask(masked) == masked  # idempotent: a masked file compares equal to a fresh dump


@pytest.mark.parametrize(
    "text",
    [
        "pkg @ git+https://github.com/org/repo@v1.2",
        "https://host:8080/repo@v1",
        "s3://bucket/key@v2",
        "file:///tmp/a@b/x",
        "sqlite:////tmp/mlflow.db",
        "TOKENIZERS_PARALLELISM=false KEYBOARD=us",
        "--set dotted.key=value",
        "a bearer token is needed",
    ],
)
def test_mask_leaves_what_holds_no_secret(text: str) -> None:
    assert mask(text) == text


def test_secret_names() -> None:
    secret = ["HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY", "apiKey", "X-Amz-Signature"]
    secret += ["MLFLOW_TRACKING_PASSWORD", "DB_PASSWD", "GOOGLE_CREDENTIALS", "AWS_SESSION_TOKEN"]
    plain = ["KEYBOARD", "MONKEY_PATCH", "TOKENIZERS_PARALLELISM", "AUTHOR", "PATH", "max_tokens"]
    assert [n for n in secret if not is_secret_name(n)] == []
    assert [n for n in plain if is_secret_name(n)] == []


def test_mask_env() -> None:
    env = {"HF_TOKEN": "hf_x", "DB_URL": "postgres://u:pw9@db/x", "KEYBOARD": "us"}
    assert mask_env(env) == {"HF_TOKEN": "***", "DB_URL": "postgres://u:***@db/x", "KEYBOARD": "us"}


def test_show_masks_env_vars_and_uri_credentials() -> None:
    sets = [a for s in SECRETS for a in ("--set", s)]
    result = runner.invoke(app, ["show", str(LOCAL / "mnist_cnn.yaml"), *sets])
    assert result.exit_code == 0, result.output
    assert _leaks(result.output) == []
    shown = yaml.safe_load(result.output)
    assert shown["cluster"]["runtime_env"]["env_vars"] == {
        "MLFLOW_TRACKING_PASSWORD": "***",
        "AWS_SECRET_ACCESS_KEY": "***",
        "WANDB_MODE": "***",
    }
    assert shown["tracking"]["mlflow"]["tracking_uri"] == "http://user:***@host:5000"


def test_job_workload_holds_no_secret_and_moves_tracking_credentials() -> None:
    from orchestrator.jobs.submit import job_workload

    spec = load_workload(LOCAL / "mnist_cnn.yaml", SECRETS)
    text, env = job_workload(spec)
    assert _leaks(text) == []
    sent = yaml.safe_load(text)
    # The job reaches MLflow with the credentials MLflow reads from its environment.
    assert sent["tracking"]["mlflow"]["tracking_uri"] == "http://host:5000"
    assert env == {"MLFLOW_TRACKING_USERNAME": "user", "MLFLOW_TRACKING_PASSWORD": URI_PASSWORD}


def test_submit_refuses_credentials_it_cannot_send_before_contacting_the_cluster(
    tmp_path: Path,
) -> None:
    args = ["submit", str(LOCAL / "mnist_cnn.yaml"), "--address", "http://127.0.0.1:9"]
    args += ["--set", "data.train=s3://AKIA:t0psecret@bucket/mnist/"]
    args += ["--set", f"data.cache_dir={quoted(tmp_path)}"]
    args += ["--set", f"train.storage_path={quoted(tmp_path)}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and _failed_cleanly(result), result.output
    assert "t0psecret" not in result.output and "Traceback" not in result.output
    assert "data.train: holds credentials" in result.output
    assert "cluster.runtime_env.env_vars" in result.output


def test_unreachable_cluster_error_is_masked() -> None:
    result = runner.invoke(app, ["status", "x", "--address", "http://u:s3cret@127.0.0.1:9"])
    assert result.exit_code == 2, result.output
    assert "s3cret" not in result.output and "http://u:***@127.0.0.1:9" in result.output


def test_repr_of_submission_hides_token_and_password() -> None:
    from orchestrator.jobs import Cluster
    from orchestrator.jobs.submit import Submission

    token = "a1b2c3d4e5f6a7b8c9d0"
    cluster = Cluster(
        url="https://admin:hunter22@head:8265",
        jobs=None,
        headers={"Authorization": f"Bearer {token}"},
        authenticated=True,
    )
    job = Submission(job_id="orch-x-1", dashboard=cluster.job_url("orch-x-1"), cluster=cluster)
    for text in (repr(job), str(job), job.dashboard):
        assert token not in text and "hunter22" not in text
    assert job.dashboard == "https://admin:***@head:8265/#/jobs/orch-x-1"


def test_sweep_files_are_masked_and_a_masked_sweep_resumes(tmp_path: Path) -> None:
    from orchestrator.sweeps.results import BEST_WORKLOAD, TrialRow, finish
    from orchestrator.sweeps.sweep import SWEEP_SPEC, _check_sweep_dir

    spec = load_workload(LOCAL / "mnist_cnn_sweep.yaml", SECRETS)
    path = tmp_path / "sweep"
    assert not _check_sweep_dir(str(path), spec, None)  # a new sweep: the file is written
    assert _leaks((path / SWEEP_SPEC).read_text()) == []
    (path / "tuner.pkl").touch()  # what Tune leaves for a sweep to resume
    assert _check_sweep_dir(str(path), spec, True)  # masked file, same workload: resumes
    # A file written before masking, with the values in clear, compares all the same.
    (path / SWEEP_SPEC).write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    assert _check_sweep_dir(str(path), spec, True)

    params = {"train.optimizer.lr": 1e-3, "model.dropout": 0.1}
    best = TrialRow("t1", params, metric=0.5, status="DONE", iterations=2, step=8)
    result = finish(spec, "sweep", str(path), path, [best], None, [], 1.0)
    assert result.best_workload is not None
    text = Path(result.best_workload).read_text()
    assert Path(result.best_workload).name == BEST_WORKLOAD
    assert _leaks(text) == [] and "lr: 0.001" in text


def test_mlflow_params_and_workload_artifact_are_masked(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.mlflow_run import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = load_workload(
        LOCAL / "mnist_cnn.yaml", [SECRETS[0], f"tracking.mlflow.tracking_uri={quoted(uri)}"]
    )
    tracker = MlflowTracker.start(spec, "masked", "hash", tmp_path)
    client = MlflowClient(tracking_uri=uri)
    params = client.get_run(tracker.run_id).data.params
    assert params["cluster.runtime_env.env_vars.AWS_SECRET_ACCESS_KEY"] == "***"
    assert _leaks(json.dumps(params)) == []
    artifact = client.download_artifacts(tracker.run_id, "workload.yaml", str(tmp_path))
    assert _leaks(Path(artifact).read_text()) == []


def test_pending_reports_file_is_private(tmp_path: Path) -> None:
    from orchestrator.tracking.buffer import ReportBuffer

    pending = tmp_path / "mlflow_pending.jsonl"
    pending.touch(mode=0o644)  # kept by an older orch
    buffer = ReportBuffer(pending)
    buffer.add(1, {"loss": 1.0})
    buffer.keep("http://u:pw@127.0.0.1:9", "run", "FINISHED")
    assert stat.S_IMODE(pending.stat().st_mode) == 0o600
    fresh = ReportBuffer(tmp_path / "new" / "mlflow_pending.jsonl")
    fresh.keep("http://u:pw@127.0.0.1:9", "run", "FAILED")
    assert stat.S_IMODE(fresh.fallback.stat().st_mode) == 0o600


def test_runs_upload_to_unreachable_server_fails_in_one_masked_line(tmp_path: Path) -> None:
    pending = tmp_path / "mlflow_pending.jsonl"
    where = {"tracking_uri": "http://u:secret@127.0.0.1:9/", "run_id": "abc"}
    pending.write_text(json.dumps(where | {"step": 1, "time": 0, "metrics": {"loss": 1.0}}))
    result = runner.invoke(app, ["runs", "upload", str(pending)])
    assert _failed_cleanly(result), result.output
    assert "secret" not in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "http://u:***@127.0.0.1:9/" in result.output
    assert pending.is_file()  # kept for the next try
