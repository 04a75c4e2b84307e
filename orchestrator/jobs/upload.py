"""The job's runtime environment: the working directory (minus what must not travel), the
resolved workload, env vars and pip requirements; and an early, clear refusal of an upload
larger than Ray accepts, naming what makes it large."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.jobs.connect import JobsError
from orchestrator.spec import WorkloadSpec

__all__ = ["DEFAULT_EXCLUDES", "Upload", "build_runtime_env"]

# Never useful on the cluster, often large: version control, environments, caches, local
# checkpoints, local MLflow stores. Ray applies .gitignore and .rayignore on top of these.
DEFAULT_EXCLUDES = [
    ".git/",
    ".venv/",
    "venv/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    "*.egg-info/",
    "mlflow.db",
    "mlruns/",
    "mlartifacts/",
    "orch_runs/",
    "orch_exports/",
]
WORKLOAD_ENV = "ORCH_WORKLOAD"  # the resolved workload, as YAML, for the job's entrypoint


@dataclass
class Upload:
    runtime_env: dict[str, Any]
    size_bytes: int  # uncompressed bytes that will be zipped and uploaded
    files: int


def build_runtime_env(spec: WorkloadSpec, workload_yaml: str, working_dir: Path) -> Upload:
    """The runtime_env for the job, after checking the upload fits Ray's limit."""
    working_dir = working_dir.resolve()
    excludes = [*DEFAULT_EXCLUDES]
    for path in (spec.data.cache_dir, spec.train.storage_path):
        inside = _relative_inside(path, working_dir)
        if inside:  # prepared data is rebuilt on the cluster; checkpoints stay where they are
            excludes.append(f"/{inside}/")
    excludes += spec.cluster.runtime_env.excludes
    size, files, biggest = _measure(working_dir, excludes)
    _check_size(size, biggest, working_dir)
    env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "excludes": excludes,
        "env_vars": {**spec.cluster.runtime_env.env_vars, WORKLOAD_ENV: workload_yaml},
    }
    if spec.cluster.runtime_env.pip:
        env["pip"] = list(spec.cluster.runtime_env.pip)
    return Upload(runtime_env=env, size_bytes=size, files=files)


def _relative_inside(path: str, root: Path) -> str | None:
    if "://" in path:
        return None
    absolute = Path(os.path.abspath(path))
    try:
        inside = absolute.relative_to(root)
    except ValueError:
        return None
    return str(inside) if str(inside) != "." else None


def _measure(root: Path, excludes: list[str]) -> tuple[int, int, list[tuple[int, str]]]:
    """Bytes and files Ray would package, and the largest top-level entries.

    Walks with Ray's own traversal and exclusion rules (the excludes above, .gitignore and
    .rayignore), so what is measured is what Ray will zip.
    """
    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    include_gitignore = os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    per_top: dict[str, int] = {}
    total = files = 0

    def count(path: Path) -> None:
        nonlocal total, files
        if path.is_file() and not path.is_symlink():
            size = path.stat().st_size
            total += size
            files += 1
            top = path.relative_to(root).parts[0]
            per_top[top] = per_top.get(top, 0) + size

    _dir_travel(root, [_get_excludes(root, excludes)], count, include_gitignore=include_gitignore)
    biggest = sorted(((size, name) for name, size in per_top.items()), reverse=True)[:3]
    return total, files, biggest


def _check_size(size: int, biggest: list[tuple[int, str]], root: Path) -> None:
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    # Ray's limit is on the zip; refusing on the uncompressed size is stricter only for
    # well-compressing text, and a working directory that large is a mistake anyway.
    if size < GCS_STORAGE_MAX_SIZE:
        return
    largest = ", ".join(f"{name} ({_mib(s)})" for s, name in biggest)
    raise JobsError(
        f"the working directory {root} would upload {_mib(size)}, over Ray's limit of "
        f"{_mib(GCS_STORAGE_MAX_SIZE)}; the largest entries: {largest}. Keep data on shared "
        "storage (s3://, gs://, NFS) and leave it out with cluster.runtime_env.excludes, "
        ".gitignore or .rayignore"
    )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
