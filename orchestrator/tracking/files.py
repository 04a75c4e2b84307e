"""Files a report carries (a custom step's image samples), logged as MLflow artifacts."""

from __future__ import annotations

import base64
import binascii
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from orchestrator.tracking.server import first_line, quick_requests

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["log_files"]

_log = logging.getLogger(__name__)


def log_files(client: MlflowClient, run_id: str, files: Mapping[str, Any]) -> None:
    """Log {artifact path: base64 bytes} to the run; never raises.

    Unlike metrics, a file the server does not take is not kept for later: samples are a view
    of training, and the checkpoints can make them again.
    """
    with tempfile.TemporaryDirectory() as scratch:
        for name, encoded in files.items():
            path = PurePosixPath(name)
            if path.is_absolute() or ".." in path.parts or not isinstance(encoded, str):
                _log.warning("not logging the report's file %r: not a relative path", name)
                continue
            local = Path(scratch, path.name)
            try:
                local.write_bytes(base64.b64decode(encoded, validate=True))
                with quick_requests(timeout=5, retries=0):
                    client.log_artifact(run_id, str(local), str(path.parent))
            except (binascii.Error, ValueError) as exc:
                _log.warning("not logging %s: %s", name, first_line(exc))
            except Exception as exc:  # MLflow raises many kinds: the server is down or refuses
                _log.warning("could not log %s to MLflow: %s", name, first_line(exc))
