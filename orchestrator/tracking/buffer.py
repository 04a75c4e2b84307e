"""Reports the server has not taken yet: retried, and kept in a file when it stays away.

A report that cannot be logged (server down) is kept, retried with the next ones and at the end,
and written to a fallback file that `orch runs upload` sends later.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.files import write_atomic
from orchestrator.masking import mask
from orchestrator.tracking.protocol import TrackingError
from orchestrator.tracking.server import first_line, quick_requests

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["PENDING", "ReportBuffer", "upload_pending"]

PENDING = "mlflow_pending.jsonl"
RETRY_AFTER_S = 10.0


class ReportBuffer:
    """One run's unsent reports, oldest first, and the fallback file they go to at the end.

    The progress thread adds and flushes while training runs; the main thread flushes at the
    end. Flushes take turns under one lock, and only a flush removes a report, once it is sent.
    """

    def __init__(self, fallback: Path):
        self.fallback = fallback
        self.items: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._retry_at = 0.0  # monotonic time before which a quick flush does not try

    def __len__(self) -> int:
        return len(self.items)

    def add(self, step: int, metrics: dict[str, float]) -> None:
        with self._lock:
            self.items.append({"step": step, "time": int(time.time() * 1000), "metrics": metrics})

    def flush(self, client: MlflowClient, run_id: str, quick: bool) -> bool:
        """Send what is pending, in order; True when nothing is left.

        quick (a report's flush, during training): a short timeout, and no try for RETRY_AFTER_S
        after a failed one: a server that hangs would hold the progress line up at every report.

        A report whose request timed out may have been stored all the same; it is sent again,
        as the same (key, value, timestamp, step) metrics, which MLflow's SQL stores keep once
        (they are the primary key of its metrics table).
        """
        from mlflow.entities import Metric

        with self._lock:
            if quick and time.monotonic() < self._retry_at:
                return not self.items
            with quick_requests(timeout=3 if quick else 10, retries=0 if quick else 2):
                while self.items:
                    item = self.items[0]
                    metrics = item["metrics"].items()
                    batch = [Metric(k, v, item["time"], item["step"]) for k, v in metrics]
                    try:
                        client.log_batch(run_id, metrics=batch)
                    except Exception:  # server down or refusing: keep it for later
                        self._retry_at = time.monotonic() + RETRY_AFTER_S
                        return False
                    self.items.pop(0)
            return True

    def keep(self, uri: str, run_id: str, status: str) -> None:
        """Append what is left to the fallback file, with how the run ended.

        The file is the owner's alone (0600): the tracking URI in it may carry a password.
        """
        self.fallback.parent.mkdir(parents=True, exist_ok=True)
        where = {"tracking_uri": uri, "run_id": run_id}
        fd = os.open(self.fallback, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # a file kept before this rule, too
        with os.fdopen(fd, "a") as f:
            for item in self.items:
                f.write(json.dumps(where | item) + "\n")
            f.write(json.dumps(where | {"end_status": status}) + "\n")


def upload_pending(path: Path) -> int:
    """Send the reports a run kept while its tracking server was down; return how many.

    TrackingError (one line, masked) when the server cannot take them; the file is kept, and
    FILE.progress records the lines sent, so that running it again goes on from there.
    """
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    texts = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        lines = [json.loads(line) for line in texts]
    except ValueError as exc:
        raise TrackingError(f"not a file of pending reports ({exc})") from None
    progress = path.with_name(f"{path.name}.progress")
    done, digest = _sent_before(progress, texts)
    sent = 0
    uri = "the MLflow server"
    try:
        with quick_requests(timeout=10, retries=1):
            for index in range(done, len(lines)):
                item = lines[index]
                uri = item["tracking_uri"]
                client = MlflowClient(tracking_uri=uri)
                if "end_status" in item:  # the run ended while the server was away
                    client.set_terminated(item["run_id"], status=item["end_status"])
                else:
                    metrics = item["metrics"].items()
                    batch = [Metric(k, v, item["time"], item["step"]) for k, v in metrics]
                    client.log_batch(item["run_id"], metrics=batch)
                    sent += 1
                # After each line, so that a retry of an upload that stops part-way sends
                # each report once, and ends each run once.
                digest.update(texts[index].encode() + b"\n")
                record = {"sent": index + 1, "digest": digest.hexdigest()}
                write_atomic(progress, json.dumps(record))
    except Exception as exc:  # MLflow raises many kinds: connection, auth, HTTP
        raise TrackingError(
            f"cannot send the reports to {mask(uri)}: {first_line(exc)}; the file is kept: "
            "run orch runs upload again once the server answers"
        ) from None
    path.rename(path.with_suffix(".uploaded"))  # kept, so nothing is ever lost
    progress.unlink(missing_ok=True)
    return sent


def _sent_before(progress: Path, texts: list[str]) -> tuple[int, Any]:
    """How many of `texts` an upload that stopped part-way sent, and their digest so far; none
    when the file no longer starts with the lines it sent (`keep` only appends)."""
    digest = hashlib.sha256()
    try:
        record = json.loads(progress.read_text())
        done = int(record["sent"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0, digest
    for text in texts[:done]:
        digest.update(text.encode() + b"\n")
    if done > len(texts) or digest.hexdigest() != record["digest"]:
        return 0, hashlib.sha256()
    return done, digest
