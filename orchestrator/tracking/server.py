"""Reaching an MLflow server: where it is, bounded requests, and errors shown without secrets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from orchestrator.masking import first_line

__all__ = ["default_tracking_uri", "first_line", "quick_requests"]


def default_tracking_uri() -> str:
    """MLflow's own default: a SQLite store in the working directory (see `mlflow ui`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"


@contextmanager
def quick_requests(timeout: int, retries: int) -> Iterator[None]:
    """Bound MLflow's HTTP timeout and retries (env vars it reads on every request)."""
    keys = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
    }
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
