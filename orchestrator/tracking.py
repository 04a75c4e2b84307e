"""MLflow tracking with one writer: the driver.

Every report reaches the driver anyway (for the progress line), so the driver logs it: workers on
other nodes need no MLflow credentials, and SQLite (the embedded default store) gets the single
writer it requires. A report that cannot be logged (server down) is kept, retried with the next
ones and at the end, and written to a fallback file that `orch runs upload` sends later: training
never waits on, or dies from, the tracking server.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from orchestrator.spec import MLflowSpec, WorkloadSpec, parse_condition

__all__ = [
    "Tracker",
    "TrackingError",
    "default_tracking_uri",
    "flatten",
    "promotion",
    "recent_runs",
    "upload_pending",
]

PENDING = "mlflow_pending.jsonl"
_OPS = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


class TrackingError(Exception):
    """The tracking server cannot be used; says how to run without it."""


def default_tracking_uri() -> str:
    """MLflow's own default: a SQLite store in the working directory (see `mlflow ui`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested spec as dotted keys -> strings (MLflow params)."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return {prefix: redact(text)[:6000]}  # MLflow's limit on a param value


def redact(uri: str) -> str:
    """http://user:secret@host -> http://user:***@host, for anything shown or logged."""
    return re.sub(r"(://[^:/@]+):[^@/]+@", r"\1:***@", uri)


def promotion(condition: str | None, metrics: dict[str, Any]) -> tuple[bool, str]:
    """Whether final metrics satisfy `promote_if`, and why (for the run's tags)."""
    if not condition:
        return True, "no promote_if condition"
    reasons = []
    for name, op, bound in parse_condition(condition):
        value = metrics.get(name)
        if not isinstance(value, (int, float)) or math.isnan(value):
            return False, f"{name} was not reported"
        holds = _OPS[op](value, bound)
        reasons.append(f"{name} {value:.6g} {op} {bound:g}: {'yes' if holds else 'no'}")
        if not holds:
            return False, "; ".join(reasons)
    return True, "; ".join(reasons)


@contextmanager
def _quick_requests(timeout: int, retries: int) -> Iterator[None]:
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


@contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (needed by log_model) at `uri`, for this block only.

    `mlflow.set_tracking_uri` also sets $MLFLOW_TRACKING_URI for the whole process; left set, the
    next run in the same process (a sweep after a run, a test after a test) would silently track
    to this server instead of its own default.
    """
    import mlflow

    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # back to "the env var decides"; this unsets it too
        if saved_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """MLflow narrates model logging at INFO and WARNING; orch prints the outcome itself."""
    import logging

    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class Tracker:
    """One MLflow run for one `orch run`; the same run name continues the same MLflow run."""

    def __init__(
        self,
        client: Any,
        uri: str,
        run_id: str,
        settings: MLflowSpec,
        fallback: Path,
        experiment_id: str = "",
    ):
        self.client, self.uri, self.run_id, self.settings = client, uri, run_id, settings
        self.fallback = fallback
        self.experiment_id = experiment_id
        self.pending: list[dict[str, Any]] = []
        self.last: dict[str, Any] = {}

    @classmethod
    def start(cls, spec: WorkloadSpec, run_name: str, data_hash: str, run_dir: Path) -> Tracker:
        from mlflow.tracking import MlflowClient

        settings = spec.tracking.mlflow
        uri = settings.tracking_uri or default_tracking_uri()
        client = MlflowClient(tracking_uri=uri)
        experiment_name = settings.experiment or spec.name
        try:
            with _quick_requests(timeout=5, retries=0):
                experiment = client.get_experiment_by_name(experiment_name)
                experiment_id = (
                    experiment.experiment_id
                    if experiment
                    else client.create_experiment(experiment_name)
                )
                run_id = cls._find_or_create_run(client, experiment_id, run_name, spec, data_hash)
        except Exception as exc:  # MLflow raises many kinds: connection, auth, HTTP
            raise TrackingError(
                f"tracking: cannot use the MLflow server at {redact(uri)}: "
                f"{_first_line(exc)}; check tracking.mlflow.tracking_uri (and MLFLOW_TRACKING_"
                "USERNAME/PASSWORD for a server with auth), or run with --no-tracking"
            ) from None
        return cls(client, uri, run_id, settings, run_dir / PENDING, experiment_id)

    def child(
        self, run_name: str, spec: WorkloadSpec, data_hash: str, run_dir: Path, tags: dict[str, str]
    ) -> Tracker:
        """A run nested under this one (a sweep's trial), continued when it exists already.

        Raises TrackingError when the server does not answer.
        """
        try:
            with _quick_requests(timeout=5, retries=0):
                run_id = self._find_or_create_run(
                    self.client,
                    self.experiment_id,
                    run_name,
                    spec,
                    data_hash,
                    tags | {"mlflow.parentRunId": self.run_id},
                )
        except Exception as exc:
            raise TrackingError(
                f"tracking: cannot create the run of {run_name}: {_first_line(exc)}"
            ) from None
        return Tracker(
            self.client, self.uri, run_id, self.settings, run_dir / PENDING, self.experiment_id
        )

    @staticmethod
    def _find_or_create_run(
        client: Any,
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
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            # `orch submit` creates the run before the data is prepared on the cluster.
            client.set_tag(run_id, "orch.data_hash", data_hash)
            return run_id
        tags = _tags(run_name, data_hash) | (extra_tags or {})
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        run_id = run.info.run_id
        _log_params(client, run_id, flatten(spec.model_dump(mode="json")))
        client.log_text(
            run_id, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "workload.yaml"
        )
        return run_id

    # ------------------------------------------------------------------ during training
    def log_event(self, event: dict[str, Any]) -> None:
        """Log one report's metrics at its step; keep them if the server does not answer."""
        step = int(event.get("step", 0))
        metrics = {
            k: float(v)
            for k, v in event.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        }
        self.last.update(metrics)
        self.pending.append({"step": step, "time": int(time.time() * 1000), "metrics": metrics})
        self.flush(quick=True)

    def flush(self, quick: bool) -> bool:
        """Send what is pending; True when nothing is left."""
        from mlflow.entities import Metric

        with _quick_requests(timeout=3 if quick else 10, retries=0 if quick else 2):
            while self.pending:
                item = self.pending[0]
                batch = [
                    Metric(k, v, item["time"], item["step"]) for k, v in item["metrics"].items()
                ]
                try:
                    self.client.log_batch(self.run_id, metrics=batch)
                except Exception:  # server down or refusing: keep it for later
                    return False
                self.pending.pop(0)
        return True

    # ------------------------------------------------------------------ at the end
    def log_summary(
        self, metrics: dict[str, float], tags: dict[str, str], texts: dict[str, str]
    ) -> list[str]:
        """A sweep's outcome on its parent run: best metrics, tags and text artifacts."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        try:
            with _quick_requests(timeout=10, retries=1):
                self.client.log_batch(
                    self.run_id,
                    metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                    tags=[RunTag(k, v) for k, v in tags.items()],
                )
                for name, text in texts.items():
                    self.client.log_text(self.run_id, text, name)
        except Exception as exc:
            return [f"tracking: could not log the sweep's summary: {_first_line(exc)}"]
        return []

    def finish(self, status: str, model_dir: str | None, checkpoint_dir: str | None) -> list[str]:
        """Flush, log artifacts and the model, register it if promoted; return notes to show."""
        notes = []
        for _ in range(3):  # give a restarting server a little time
            if self.flush(quick=False):
                break
            time.sleep(5)
        if self.pending:
            self._keep_pending(status)
            notes.append(
                f"tracking: {len(self.pending)} report(s) could not be sent to {redact(self.uri)}; "
                f"kept in {self.fallback} (send them with: orch runs upload {self.fallback})"
            )
            return notes
        try:
            with _quick_requests(timeout=30, retries=2):
                if checkpoint_dir:  # the manifests of every checkpoint the run kept
                    run_dir = Path(checkpoint_dir).parent
                    for manifest in sorted(run_dir.glob("step-*/orch_checkpoint.json")):
                        self.client.log_artifact(
                            self.run_id, str(manifest), f"checkpoints/{manifest.parent.name}"
                        )
                if model_dir and status == "FINISHED":
                    notes += self._log_model(model_dir)
                self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            notes.append(f"tracking: could not finish the MLflow run: {_first_line(exc)}")
        return notes

    def _log_model(self, model_dir: str) -> list[str]:
        import mlflow
        import torch

        import orchestrator
        from orchestrator.models import LogitsOnly, load_exported

        meta = json.loads(Path(model_dir, "model.json").read_text())
        model = load_exported(model_dir).eval()
        if hasattr(model, "config"):  # transformers models return output objects, not tensors
            model = LogitsOnly(model).eval()
        example = _input_example(meta)
        with torch.no_grad():
            output = model(torch.from_numpy(example))
        signature = mlflow.models.infer_signature(example, output.numpy())
        if example.ndim == 2:  # token ids: any batch size and any sequence length
            from mlflow.models import ModelSignature
            from mlflow.types import Schema, TensorSpec

            signature = ModelSignature(
                inputs=Schema([TensorSpec(example.dtype, (-1, -1))]),
                outputs=Schema([TensorSpec(output.numpy().dtype, (-1, -1, output.shape[-1]))]),
            )
        promote, reason = promotion(self.settings.promote_if, self.last)
        register = self.settings.register_as if promote else None
        # orch's code travels with the model, so it loads where orch is not installed.
        code = [str(Path(orchestrator.__file__).parent)]
        with _fluent_uri(self.uri), mlflow.start_run(run_id=self.run_id), _quiet("mlflow"):
            mlflow.pytorch.log_model(
                model,
                name="model",
                signature=signature,
                input_example=example,
                registered_model_name=register,
                code_paths=code,
                # A pickled module takes any sequence length; an exported graph fixes it.
                serialization_format="pickle",
            )
            mlflow.log_artifact(str(Path(model_dir, "model.json")), "model_export")
        notes = []
        if self.settings.register_as:
            self.client.set_tag(self.run_id, "orch.promoted", str(promote).lower())
            self.client.set_tag(self.run_id, "orch.promotion_reason", reason)
            verdict = f"registered as {register}" if promote else "not registered"
            notes.append(f"tracking: model {verdict} ({reason})")
        return notes

    def _keep_pending(self, status: str) -> None:
        self.fallback.parent.mkdir(parents=True, exist_ok=True)
        where = {"tracking_uri": self.uri, "run_id": self.run_id}
        with self.fallback.open("a") as f:
            for item in self.pending:
                f.write(json.dumps(where | item) + "\n")
            f.write(json.dumps(where | {"end_status": status}) + "\n")


def recent_runs(uri: str | None, experiment: str | None, limit: int) -> list[dict[str, str]]:
    """Rows for `orch runs`: newest first."""
    from mlflow.tracking import MlflowClient

    uri = uri or default_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    try:
        with _quick_requests(timeout=10, retries=0):
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
        raise TrackingError(f"cannot read runs from {redact(uri)}: {_first_line(exc)}") from None
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


def _input_example(meta: dict[str, Any]) -> Any:
    import numpy as np

    model = meta["model"]
    if meta["task"] in ("bert_mlm", "gpt_lm") or model.get("task") in ("masked_lm", "causal_lm"):
        return np.zeros((1, 16), dtype=np.int64)
    channels = meta["data"].get("channels") or model.get("in_channels", 3)
    size = model.get("image_size", 32)
    return np.zeros((1, channels, size, size), dtype=np.float32)


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


def _log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i : i + 100])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return redact(text[0] if text else type(exc).__name__)
