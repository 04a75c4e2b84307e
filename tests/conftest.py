"""Shared fixtures: a real local Ray for integration tests, the real data in ../shared/data,
one cache of prepared data for the session, a real MLflow server and a real S3-compatible one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from builders import SHAKESPEARE, SHARED_DATA
from servers import MlflowServer, S3Server


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / SHAKESPEARE).is_file():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one cache of prepared data for every test: each source is prepared once a session.

    Entries are keyed by source and settings, so tests share one only when they would have
    prepared the same thing; a test that damages prepared data damages its own copy.
    """
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session", autouse=True)
def _mlflow_store_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Runs that track with the default store write to a temporary one, never the checkout."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="session")
def local_ray(orch_ray: None) -> None:
    """One real local Ray for the session: orch's own pytest plugin's (`orch_ray`, 2 CPUs by
    pyproject.toml, like the CI machine), always shut down."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked gpu skip, with the reason, on a machine without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _wait_for_checkpoint(run_dir: Path, checkpoint: str, timeout: float = 300) -> bool:
    """Block until Ray has registered `checkpoint` (e.g. "step-00000006") for the run."""
    import time

    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if snapshot.is_file() and checkpoint in snapshot.read_text():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def wait_for_checkpoint():
    """Tests that break things mid-run wait for a registered checkpoint with this."""
    return _wait_for_checkpoint


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A real `mlflow server` (SQLite, loopback port), always stopped."""
    srv = MlflowServer(tmp_path / "mlflow")
    srv.root.mkdir()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


# Whatever of these the developer's own shell holds would reach past the test's server.
_AWS_OTHERS = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE")


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """moto's S3 server on a loopback port with the bucket `S3Server.BUCKET`, and the environment
    pointing at it (endpoint, key pair, region), all restored and stopped after, pass or fail.

    A local Ray's workers inherit the environment of `ray.init`: a test that trains on this
    bucket starts its own Ray after this fixture (`orch run` in a subprocess does).
    """
    server = S3Server()
    server.start()
    try:
        for name in _AWS_OTHERS:
            monkeypatch.delenv(name, raising=False)
        # No credentials files of the developer's: only the environment's key counts.
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        yield server
    finally:
        server.stop()
