"""orch's pytest plugin: smoke-test workloads in a team's own test suite.

Installed with orch (a `pytest11` entry point), so any project that depends on orch has:

- `orch_ray`: one real local Ray for the test session, always shut down, pass or fail.
  Its CPUs: the `orch_ray_num_cpus` ini option (default: this machine's).
- `orch_smoke`: a function that smoke-runs a workload file, as `orch run FILE --smoke` does,
  and returns its `SmokeResult`; it raises SmokeFailed (or orch's input errors) otherwise.
  Smoke runs share one directory per session, so each dataset is prepared once.

A team's test file (see the README):

    import pathlib
    import pytest

    WORKLOADS = sorted(pathlib.Path("workloads").glob("**/*.yaml"))

    @pytest.mark.parametrize("path", WORKLOADS, ids=str)
    def test_workload_smoke_runs(orch_smoke, path):
        result = orch_smoke(path)
        assert [s.name for s in result.stages][-1] == "export"

Nothing here imports Ray or torch until a fixture is used: the plugin loads in every pytest
session of an environment that has orch installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from orchestrator.smoketest import SmokeResult

__all__ = ["orch_ray", "orch_smoke", "orch_smoke_dir"]

SmokeRunner = Callable[..., "SmokeResult"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "orch_ray_num_cpus",
        "CPUs of the local Ray that orch's orch_ray fixture starts (default: this machine's)",
        default="",
    )


@pytest.fixture(scope="session")
def orch_ray(pytestconfig: pytest.Config) -> Iterator[None]:
    """One real local Ray for the session; joined if the session already has one."""
    import ray

    from orchestrator.ray_session import LOCAL_TRAIN_SETTINGS, TRAIN_SETTINGS

    if ray.is_initialized():  # another fixture's (or the caller's): theirs to shut down
        yield
        return
    # Ray Train's settings reach its controller and workers through the environment at init.
    for key, value in (TRAIN_SETTINGS | LOCAL_TRAIN_SETTINGS).items():
        os.environ.setdefault(key, value)
    cpus = str(pytestconfig.getini("orch_ray_num_cpus")).strip()
    ray.init(
        num_cpus=int(cpus) if cpus else None,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def orch_smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's smoke runs keep their runs, prepared data and MLflow store."""
    return tmp_path_factory.mktemp("orch-smoke")


@pytest.fixture
def orch_smoke(orch_ray: None, orch_smoke_dir: Path) -> SmokeRunner:
    """`orch_smoke(path, *overrides, track=False)`: smoke-run a workload file, shrunk to this
    machine; returns the SmokeResult (its stages, the changes made, the shrunk spec)."""
    from orchestrator import api

    def run(path: str | Path, *overrides: str, **options: Any) -> SmokeResult:
        return api.smoke(path, list(overrides), workdir=orch_smoke_dir, **options)

    return run
