"""Tracking through faults, on a real `mlflow server` (no Ray): a server that hangs while reports
are drained from two threads, `orch runs upload` retried after failing part-way, and a submit
stopped before its job was accepted."""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from builders import LOCAL
from mlflow.tracking import MlflowClient
from servers import MlflowServer
from typer.testing import CliRunner

from orchestrator import load_workload
from orchestrator.cli import app
from orchestrator.jobs.connect import JobsError
from orchestrator.jobs.submit import _ended_unless_submitted, _start_tracking
from orchestrator.tracking.mlflow_run import MlflowTracker
from orchestrator.train.progress import ProgressPrinter


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One server for the module: starting one takes half a minute on a busy machine."""
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc is not None:
            os.killpg(srv.proc.pid, signal.SIGCONT)  # a failed test may leave it stopped
        srv.stop()


def _loss(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


@pytest.mark.timeout(300)
def test_hung_server_while_two_threads_drain_loses_and_repeats_nothing(
    server: MlflowServer, tmp_path: Path
) -> None:
    spec = load_workload(
        LOCAL / "mnist_cnn.yaml",
        ["tracking.mlflow.enabled=true", f"tracking.mlflow.tracking_uri={server.uri}"],
    )
    tracker = MlflowTracker.start(spec, "hung-server", "hash", tmp_path)
    channel: queue.Queue[dict[str, float]] = queue.Queue()
    assert server.proc is not None
    with ProgressPrinter(channel, tracker.log):  # the driver's progress thread
        for step in (1, 2, 3):
            channel.put({"step": step, "loss": 1.0 / step})
        time.sleep(3)  # sent while the server answers
        # Stopped, not gone: connections are accepted and requests wait unanswered.
        os.killpg(server.proc.pid, signal.SIGSTOP)
        for step in range(4, 14):
            channel.put({"step": step, "loss": 1.0 / step})
        threading.Timer(16, os.killpg, (server.proc.pid, signal.SIGCONT)).start()
        time.sleep(4)  # training goes on: the thread is mid-request when it ends
    notes = tracker.finish("FINISHED", None, None)  # the main thread drains what is left
    client = MlflowClient(tracking_uri=server.uri)
    assert _loss(client, tracker.run_id) == list(range(1, 14)), notes
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert not (tmp_path / "mlflow_pending.jsonl").exists()


def test_upload_retried_after_failing_part_way_sends_each_report_once(
    server: MlflowServer, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri=server.uri)
    experiment = client.create_experiment("upload-retry")
    first, second = (client.create_run(experiment).info.run_id for _ in range(2))
    pending = tmp_path / "mlflow_pending.jsonl"
    lines = []
    for run_id in (first, second):
        where = {"tracking_uri": server.uri, "run_id": run_id}
        lines += [
            where | {"step": s, "time": 1000 + s, "metrics": {"loss": 1.0 / s}} for s in (1, 2)
        ]
        lines.append(where | {"end_status": "KILLED"})
    pending.write_text("".join(json.dumps(line) + "\n" for line in lines))
    client.delete_run(second)  # MLflow refuses reports to a deleted run: the upload stops there

    failed = CliRunner().invoke(app, ["runs", "upload", str(pending)])
    assert failed.exit_code != 0
    assert client.get_run(first).info.status == "KILLED" and _loss(client, first) == [1, 2]
    # Meanwhile the first run was resumed: a retry must not end it again.
    client.update_run(first, status="RUNNING")
    client.restore_run(second)

    retried = CliRunner().invoke(app, ["runs", "upload", str(pending)])
    assert retried.exit_code == 0, retried.output
    assert "uploaded 2 report(s)" in retried.output
    assert client.get_run(first).info.status == "RUNNING"
    assert client.get_run(second).info.status == "KILLED" and _loss(client, second) == [1, 2]
    assert _loss(client, first) == [1, 2]
    assert pending.with_suffix(".uploaded").is_file() and not pending.exists()


@pytest.mark.parametrize(
    ("error", "status"), [(KeyboardInterrupt(), "KILLED"), (JobsError("refused"), "FAILED")]
)
def test_a_submit_stopped_before_the_job_is_accepted_ends_its_run(
    server: MlflowServer, error: BaseException, status: str
) -> None:
    spec = load_workload(
        LOCAL / "mnist_cnn.yaml",
        ["tracking.mlflow.enabled=true", f"tracking.mlflow.tracking_uri={server.uri}"],
    )
    tracker = _start_tracking(spec, f"never-submitted-{status}")  # what orch submit does first
    assert tracker is not None
    client = MlflowClient(tracking_uri=server.uri)
    assert client.get_run(tracker.run_id).info.status == "SCHEDULED"
    with pytest.raises(type(error)), _ended_unless_submitted(tracker):
        raise error  # Ctrl-C, or the cluster refusing the job
    assert client.get_run(tracker.run_id).info.status == status
