"""Recent runs as rows, for `orch runs`."""

from __future__ import annotations

import time

from orchestrator.masking import mask
from orchestrator.tracking.protocol import TrackingError
from orchestrator.tracking.server import default_tracking_uri, first_line, quick_requests

__all__ = ["recent_runs"]


def recent_runs(uri: str | None, experiment: str | None, limit: int) -> list[dict[str, str]]:
    """Rows for `orch runs`: newest first."""
    from mlflow.tracking import MlflowClient

    uri = uri or default_tracking_uri()
    try:
        # Inside the try: MLflow refuses some stores (a plain directory) as the client is made.
        client = MlflowClient(tracking_uri=uri)
        with quick_requests(timeout=10, retries=0):
            if experiment:
                found = client.get_experiment_by_name(experiment)
                ids = [found.experiment_id] if found else []
            else:
                ids = [e.experiment_id for e in client.search_experiments()]
            runs = (
                client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=limit)
                if ids
                else []
            )
    except Exception as exc:
        raise TrackingError(f"cannot read runs from {mask(uri)}: {first_line(exc)}") from None
    rows = []
    for run in runs:
        metrics = run.data.metrics
        shown = [
            f"{k} {metrics[k]:.4g}" for k in ("loss", "eval_loss", "eval_accuracy") if k in metrics
        ]
        end = run.info.end_time or int(time.time() * 1000)
        rows.append(
            {
                "id": run.info.run_id[:12],
                "workload": run.data.tags.get("orch.run_name", run.info.run_name or ""),
                "status": run.info.status,
                "metrics": ", ".join(shown),
                "duration": f"{(end - run.info.start_time) / 1000:.0f} s",
            }
        )
    return rows
