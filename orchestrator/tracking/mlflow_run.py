"""The MLflow tracker: one MLflow run per `orch run`; the same run name continues the same run."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.masking import mask, public_spec, public_yaml
from orchestrator.spec import MLflowSpec, WorkloadSpec
from orchestrator.tracking.buffer import PENDING, ReportBuffer
from orchestrator.tracking.files import log_files
from orchestrator.tracking.model_log import log_model
from orchestrator.tracking.protocol import ARTIFACTS, TrackingError
from orchestrator.tracking.server import default_tracking_uri, first_line, quick_requests
from orchestrator.train.checkpoint import MANIFEST

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["MlflowTracker", "flatten"]

# Statuses that end a run: MLflow records an end time with them.
_ENDED = {"FINISHED", "FAILED", "KILLED"}


class MlflowTracker:
    """A `Tracker` on one MLflow run."""

    def __init__(
        self,
        client: MlflowClient,
        uri: str,
        run_id: str,
        settings: MLflowSpec,
        fallback: Path,
        experiment_id: str,
    ):
        self.client, self.uri, self.run_id, self.settings = client, uri, run_id, settings
        self.experiment_id = experiment_id
        self.pending = ReportBuffer(fallback)
        self.last: dict[str, float] = {}  # the newest value of each metric: what promote_if judges

    @property
    def location(self) -> str:
        return mask(self.uri)

    @classmethod
    def start(
        cls, spec: WorkloadSpec, run_name: str, data_hash: str, run_dir: Path
    ) -> MlflowTracker:
        """Find or create the run; raises TrackingError when the server cannot be used."""
        from mlflow.tracking import MlflowClient

        settings = spec.tracking.mlflow
        uri = settings.tracking_uri or default_tracking_uri()
        experiment_name = settings.experiment or spec.name
        try:
            # Inside the try: MLflow refuses some stores (a plain directory) as the client is made.
            client = MlflowClient(tracking_uri=uri)
            with quick_requests(timeout=5, retries=0):
                experiment = client.get_experiment_by_name(experiment_name)
                experiment_id = (
                    experiment.experiment_id
                    if experiment
                    else client.create_experiment(experiment_name)
                )
                run_id = _find_or_create_run(client, experiment_id, run_name, spec, data_hash)
        except Exception as exc:  # MLflow raises many kinds: connection, auth, HTTP
            raise TrackingError(
                f"tracking: cannot use the MLflow server at {mask(uri)}: "
                f"{first_line(exc)}; check tracking.mlflow.tracking_uri (and MLFLOW_TRACKING_"
                "USERNAME/PASSWORD for a server with auth), or run with --no-tracking"
            ) from None
        return cls(client, uri, run_id, settings, run_dir / PENDING, experiment_id)

    def child(
        self, run_name: str, spec: WorkloadSpec, data_hash: str, run_dir: Path, tags: dict[str, str]
    ) -> MlflowTracker:
        """A run nested under this one (a sweep's trial), continued when it exists already.

        Raises TrackingError when the server does not answer.
        """
        try:
            with quick_requests(timeout=5, retries=0):
                run_id = _find_or_create_run(
                    self.client,
                    self.experiment_id,
                    run_name,
                    spec,
                    data_hash,
                    tags | {"mlflow.parentRunId": self.run_id},
                )
        except Exception as exc:
            raise TrackingError(
                f"tracking: cannot create the run of {run_name}: {first_line(exc)}"
            ) from None
        return MlflowTracker(
            self.client, self.uri, run_id, self.settings, run_dir / PENDING, self.experiment_id
        )

    def mark(self, status: str) -> None:
        # Bounded: a Ctrl-C'd `orch submit` marks its run KILLED on the way out.
        with quick_requests(timeout=10, retries=1):
            if status in _ENDED:
                self.client.set_terminated(self.run_id, status=status)
            else:
                self.client.update_run(self.run_id, status=status)

    # ------------------------------------------------------------------ during training
    def log(self, event: Mapping[str, Any]) -> None:
        """Log one report's metrics at its step; keep them if the server does not answer."""
        step = int(event.get("step", 0))
        metrics = {
            k: float(v)
            for k, v in event.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        }
        self.last.update(metrics)
        self.pending.add(step, metrics)
        self.pending.flush(self.client, self.run_id, quick=True)
        if files := event.get(ARTIFACTS):
            log_files(self.client, self.run_id, files)

    # ------------------------------------------------------------------ at the end
    def summary(
        self, metrics: dict[str, float], tags: dict[str, str], texts: dict[str, str]
    ) -> list[str]:
        """A sweep's outcome on its parent run: best metrics, tags and text artifacts."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        try:
            with quick_requests(timeout=10, retries=1):
                self.client.log_batch(
                    self.run_id,
                    metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                    tags=[RunTag(k, v) for k, v in tags.items()],
                )
                for name, text in texts.items():
                    self.client.log_text(self.run_id, text, name)
        except Exception as exc:
            return [f"tracking: could not log the sweep's summary: {first_line(exc)}"]
        return []

    def finish(
        self,
        status: str,
        model_dir: str | None,
        checkpoint_dir: str | None,
        judged_on: Mapping[str, float] | None = None,
    ) -> list[str]:
        """Flush, log artifacts and the model, register it if promoted; return notes to show.

        Called after the last `log`: the driver joins its progress thread first.
        """
        notes = []
        # Give a restarting server a little time, but not a stopped driver: `orch stop` kills
        # it soon after (RAY_JOB_STOP_WAIT_TIME_S), and what is not sent must reach the file.
        tries = 1 if status == "KILLED" else 3
        for attempt in range(tries):
            if self.pending.flush(self.client, self.run_id, quick=False):
                break
            if attempt + 1 < tries:
                time.sleep(5)
        if self.pending:
            self.pending.keep(self.uri, self.run_id, status)
            fallback = self.pending.fallback
            notes.append(
                f"tracking: {len(self.pending)} report(s) could not be sent to {self.location}; "
                f"kept in {fallback} (send them with: orch runs upload {fallback})"
            )
            return notes
        try:
            with quick_requests(timeout=30, retries=2):
                if checkpoint_dir:  # the manifests of every checkpoint the run kept
                    for step, text in _manifests(checkpoint_dir):
                        self.client.log_text(self.run_id, text, f"checkpoints/{step}/{MANIFEST}")
                if model_dir and status == "FINISHED":
                    judged = self.last if judged_on is None else judged_on
                    notes += log_model(
                        self.client, self.uri, self.run_id, self.settings, judged, model_dir
                    )
                self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            notes.append(f"tracking: could not finish the MLflow run: {first_line(exc)}")
        return notes


def _manifests(checkpoint_dir: str) -> list[tuple[str, str]]:
    """(checkpoint name, manifest text) of every checkpoint beside `checkpoint_dir`, a local path
    or a URI on object storage, oldest first."""
    import pyarrow.fs as pafs

    from orchestrator.storage import open_location, read_text

    fs, path = open_location(checkpoint_dir)
    run_dir = path.rstrip("/").rsplit("/", 1)[0]
    prefix = checkpoint_dir.rstrip("/").rsplit("/", 1)[0]  # keeps the URI's scheme
    names = sorted(
        info.base_name
        for info in fs.get_file_info(pafs.FileSelector(run_dir))
        if info.type == pafs.FileType.Directory and info.base_name.startswith("step-")
    )
    found = [(name, read_text(f"{prefix}/{name}/{MANIFEST}")) for name in names]
    return [(name, text) for name, text in found if text is not None]


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested spec as dotted keys -> strings (MLflow params)."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return {prefix: mask(text)[:6000]}  # MLflow's limit on a param value


def _find_or_create_run(
    client: MlflowClient,
    experiment_id: str,
    run_name: str,
    spec: WorkloadSpec,
    data_hash: str,
    extra_tags: dict[str, str] | None = None,
) -> str:
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`orch.run_name` = '{run_name}'", max_results=1
    )
    if found:  # a resumed run continues its MLflow run
        run_id: str = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        # `orch submit` creates the run before the data is prepared on the cluster.
        client.set_tag(run_id, "orch.data_hash", data_hash)
        return run_id
    tags = _tags(run_name, data_hash) | (extra_tags or {})
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    # Public: a run's params and artifacts are read by everyone who can read the experiment.
    _log_params(client, run_id, flatten(public_spec(spec)))
    client.log_text(run_id, public_yaml(spec), "workload.yaml")
    return run_id


def _tags(run_name: str, data_hash: str) -> dict[str, str]:
    from orchestrator.train.checkpoint import library_versions

    tags = {
        "orch.run_name": run_name,
        "orch.data_hash": data_hash,
        "orch.host": socket.gethostname(),
    }
    tags.update({f"orch.version.{k}": v for k, v in library_versions().items()})
    tags.update(_git())
    return tags


def _git() -> dict[str, str]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"orch.git_commit": "unknown"}
    return {"orch.git_commit": commit, "orch.git_dirty": str(bool(dirty)).lower()}


def _log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i : i + 100])
