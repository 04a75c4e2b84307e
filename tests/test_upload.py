"""What `orch submit` uploads and leaves out, and `orch submit --dry-run`: a crafted working
directory with credentials, caches and ignored files, planned through the CLI without a cluster."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.load import load_workload

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-do-not-print"
# Every credential a laptop's working directory tends to hold; none may travel.
CREDENTIALS = [
    ".env",
    ".aws/credentials",
    ".ssh/id_rsa",
    "server.pem",
    ".netrc",
    ".kube/config",
    ".ray/auth_token",
    "credentials.json",
    "mlflow_pending.jsonl",
]
TRAIN_PY = "print('training')\n"  # 18 bytes


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A port that records any connection: the dry run's cluster and MLflow server."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        yield server


@pytest.fixture
def workdir(tmp_path: Path, listener: socket.socket) -> Path:
    """A working directory as a user's laptop has it: code, a workload, credentials, caches,
    ignored files."""
    port = listener.getsockname()[1]
    for name in CREDENTIALS:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{SECRET}\n")
    (tmp_path / "train.py").write_text(TRAIN_PY)
    (tmp_path / ".gitignore").write_text("*.log\n")
    (tmp_path / "scratch.log").write_text("gitignored\n")
    (tmp_path / ".orchignore").write_text("# local notes stay here\nnotes/\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "draft.md").write_text("orchignored\n")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "v1.py").write_text("excluded by the workload\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "train.cpython-312.pyc").write_bytes(b"\0" * 10)
    (tmp_path / "__pycache__" / "data.cpython-312.pyc").write_bytes(b"\0" * 10)
    spec = load_workload(
        ROOT / "workloads/local/bert_tiny.yaml",
        [
            f"cluster.address=http://127.0.0.1:{port}",
            f"cluster.runtime_env.env_vars={{HF_TOKEN: {SECRET}, WANDB_MODE: disabled}}",
            "cluster.runtime_env.excludes=[old/]",
            f"tracking.mlflow.tracking_uri=http://orch:{SECRET}@127.0.0.1:{port}",
            "train.storage_path=s3://bucket/runs",
            "data.cache_dir=s3://bucket/data",
            "scaling.num_workers=3",
            "scaling.resources_per_worker={CPU: 2}",
        ],
    )
    (tmp_path / "workloads").mkdir()
    (tmp_path / "workloads" / "x.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return tmp_path


def _sections(output: str) -> tuple[dict[str, str], dict[str, str]]:
    """The dry run's upload list (path -> size) and its left-out list (path -> rule)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("upload "))
    end = next(i for i, line in enumerate(lines) if line.startswith("left out"))
    sent = {}
    for line in lines[start + 1 : end]:
        size, path = line.strip().rsplit("  ", 1)
        sent[path] = size
    left = {}
    for line in lines[end + 1 :]:
        if not line.startswith("  "):
            break
        path, rule = line.strip().split("  ", 1)
        left[path] = rule
    return sent, left


def test_dry_run_lists_the_upload_leaves_out_credentials_and_contacts_nothing(
    workdir: Path, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workdir)
    for variable in ("ORCH_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(variable, raising=False)
    result = CliRunner().invoke(app, ["submit", "workloads/x.yaml", "--dry-run"])
    assert result.exit_code == 0, result.output
    sent, left = _sections(result.stdout)

    assert sent["train.py"] == f"{len(TRAIN_PY)} B"
    workload_size = (workdir / "workloads" / "x.yaml").stat().st_size
    assert sent["workloads/x.yaml"] == f"{workload_size / 1024:.1f} KiB"
    assert set(sent) == {"train.py", "workloads/x.yaml", ".gitignore", ".orchignore"}
    for name in CREDENTIALS:
        assert left[name] == "(credential deny-list)", name
    warning = next(line for line in result.stderr.splitlines() if "secret-looking" in line)
    assert all(name in warning for name in CREDENTIALS)
    assert left["scratch.log"] == "(.gitignore)"
    # A directory is named once when more than one file in it is left out.
    assert left["notes/draft.md"] == "(.orchignore)"
    assert left["old/v1.py"] == "(cluster.runtime_env.excludes)"
    assert left["__pycache__/"] == "(default excludes, 2 files)"
    assert "upload " + str(workdir) + ": 4 files" in result.stdout

    assert "entrypoint: python -m orchestrator job-run --name bert-tiny" in result.stdout
    assert "workers: 3, each with CPU 2" in result.stdout
    # The tracking URI's user and password travel as env vars, like in a real submit.
    names = (
        "RAY_JOB_STOP_WAIT_TIME_S, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, HF_TOKEN, "
        "WANDB_MODE, ORCH_WORKLOAD"
    )
    assert f"env vars (names only): {names}" in result.stdout
    assert SECRET not in result.output
    # Neither the cluster nor the MLflow server (both at the listener) heard from orch.
    with pytest.raises(BlockingIOError):
        listener.accept()


def test_dry_run_refuses_what_submit_refuses_before_the_cluster(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workdir)
    relative = ["submit", "workloads/x.yaml", "--dry-run", "--set", "train.storage_path=runs"]
    result = CliRunner().invoke(app, relative)
    assert result.exit_code == 2
    assert "train.storage_path is 'runs', a relative path" in result.output
    (workdir / ".orchignore").write_text("!\n")
    result = CliRunner().invoke(app, ["submit", "workloads/x.yaml", "--dry-run"])
    assert result.exit_code == 2
    assert ".orchignore: '!' is not a valid gitignore-style pattern" in result.output
    assert "Traceback" not in result.output


def test_real_submit_leaves_out_the_same_files(workdir: Path) -> None:
    """build_runtime_env is what `submit` hands Ray: its excludes, applied by Ray's own
    matcher, leave out every credential and ignored file; a `!` cannot bring a secret back."""
    from ray._private.runtime_env.packaging import _get_excludes

    from orchestrator.jobs.upload import build_runtime_env

    (workdir / ".orchignore").write_text("notes/\n!.env\n!server.pem\n")
    spec = load_workload(workdir / "workloads" / "x.yaml")
    upload = build_runtime_env(spec, "name: x\n", workdir)

    excluded = _get_excludes(workdir, upload.runtime_env["excludes"])
    for name in [*CREDENTIALS, "notes/draft.md", "old/v1.py", "__pycache__/data.cpython-312.pyc"]:
        assert excluded(workdir / name), name
    assert not excluded(workdir / "train.py")
    assert {path for path, _ in upload.plan.sent} == {
        "train.py",
        "workloads/x.yaml",
        ".gitignore",
        ".orchignore",
    }
    assert upload.files == 4
    assert set(upload.plan.secrets) == set(CREDENTIALS)
