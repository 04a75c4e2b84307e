"""Reports the server has not taken yet: retried, and kept in a file when it stays away.

A report that cannot be logged (server down) is kept, retried with the next ones and at the end,
and written to a fallback file that `orch runs upload` sends later.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.tracking.server import quick_requests

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["PENDING", "ReportBuffer", "upload_pending"]

PENDING = "mlflow_pending.jsonl"


class ReportBuffer:
    """One run's unsent reports, oldest first, and the fallback file they go to at the end."""

    def __init__(self, fallback: Path):
        self.fallback = fallback
        self.items: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.items.append({"step": step, "time": int(time.time() * 1000), "metrics": metrics})

    def flush(self, client: MlflowClient, run_id: str, quick: bool) -> bool:
        """Send what is pending, in order; True when nothing is left."""
        from mlflow.entities import Metric

        with quick_requests(timeout=3 if quick else 10, retries=0 if quick else 2):
            while self.items:
                item = self.items[0]
                batch = [
                    Metric(k, v, item["time"], item["step"]) for k, v in item["metrics"].items()
                ]
                try:
                    client.log_batch(run_id, metrics=batch)
                except Exception:  # server down or refusing: keep it for later
                    return False
                self.items.pop(0)
        return True

    def keep(self, uri: str, run_id: str, status: str) -> None:
        """Append what is left to the fallback file, with how the run ended."""
        self.fallback.parent.mkdir(parents=True, exist_ok=True)
        where = {"tracking_uri": uri, "run_id": run_id}
        with self.fallback.open("a") as f:
            for item in self.items:
                f.write(json.dumps(where | item) + "\n")
            f.write(json.dumps(where | {"end_status": status}) + "\n")


def upload_pending(path: Path) -> int:
    """Send the reports a run kept while its tracking server was down; return how many."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    sent = 0
    for item in lines:
        client = MlflowClient(tracking_uri=item["tracking_uri"])
        if "end_status" in item:  # the run ended while the server was away
            client.set_terminated(item["run_id"], status=item["end_status"])
            continue
        batch = [Metric(k, v, item["time"], item["step"]) for k, v in item["metrics"].items()]
        client.log_batch(item["run_id"], metrics=batch)
        sent += 1
    path.rename(path.with_suffix(".uploaded"))  # kept, so nothing is ever lost
    return sent
