"""`orch export` on a tracked run: the exports join the run's MLflow run, beside its model.

The run directory is named after the run, and the tracker tags every MLflow run it creates
with `orch.run_name`: that is how the run is found again. A store that is not there is not
created, and a server that does not answer only costs a note: the export is done already.
"""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.exporting import ExportReport, export_files
from orchestrator.masking import first_line, mask

__all__ = ["log_exports"]


def log_exports(
    model_dir: Path, reports: list[ExportReport], tracking_uri: str | None
) -> tuple[str | None, list[str]]:
    """Log the exported files and their differences to the run's MLflow run: (run id, notes)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.server import quick_requests

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        default = Path("mlflow.db").absolute()
        if not default.is_file():  # MLflow would create an empty store here
            return None, ["tracking: no MLflow store here (./mlflow.db); not logged"]
        uri = f"sqlite:///{default}"
    name = model_dir.parent.name
    try:
        client = MlflowClient(tracking_uri=uri)
        with quick_requests(timeout=10, retries=1):
            ids = [e.experiment_id for e in client.search_experiments()]
            found = client.search_runs(ids, f"tags.`orch.run_name` = '{name}'") if ids else []
            if len(found) != 1:
                what = "no" if not found else f"{len(found)}"
                return None, [
                    f"tracking: {what} MLflow runs named {name} at {mask(uri)}; not logged"
                ]
            run_id: str = found[0].info.run_id
            for path in export_files(model_dir):
                client.log_artifact(run_id, str(path), "model_export")
            for report in reports:
                client.log_metric(
                    run_id, f"export_{report.format}_max_abs_diff", report.max_abs_diff
                )
    except Exception as exc:  # MLflow raises many kinds: connection, auth, HTTP
        return None, [f"tracking: could not log the export to {mask(uri)}: {first_line(exc)}"]
    return run_id, [f"tracking: logged to MLflow run {run_id} (artifacts model_export/)"]
