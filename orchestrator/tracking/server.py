"""Reaching an MLflow server: where it is, bounded requests, and errors shown without secrets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from orchestrator.masking import mask

# The old name of `mask`, kept for callers from before the masking module.
redact = mask

__all__ = ["default_tracking_uri", "first_line", "quick_requests", "redact"]


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


def first_line(exc: BaseException) -> str:
    """An MLflow error in one line, masked: its messages can carry the URI's password."""
    text = str(exc).strip().splitlines()
    return mask(text[0] if text else type(exc).__name__)
