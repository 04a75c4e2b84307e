"""SIGTERM (`orch stop`, a scheduler, `kill`) stops a driver as Ctrl-C does: the MLflow run ends
KILLED, no report is lost, the checkpoints stay and a re-run resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import LOCAL, TINY_CNN, quoted
from mlflow.tracking import MlflowClient
from servers import MlflowServer

from orchestrator.stopping import Stopped, stop_signals


def _wait_for_signals() -> None:
    for _ in range(50):  # a handler runs between two bytecodes of the main thread
        time.sleep(0.01)


def test_sigterm_raises_stopped_and_the_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Stopped) as info, stop_signals() as received:
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for_signals()
    assert isinstance(info.value, KeyboardInterrupt)  # so every Ctrl-C cleanup runs for it
    assert info.value.exit_code == 143 and received == [signal.SIGTERM]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_sigterm_goes_to_the_ctrl_c_handler_in_place_once() -> None:
    calls: list[int] = []
    before = signal.getsignal(signal.SIGINT)
    with stop_signals(raising=False) as received:
        # What Ray Tune installs for a sweep: it ends the sweep itself, saving its state.
        signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for_signals()
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: the cleanup is under way
        _wait_for_signals()
    assert calls == [signal.SIGINT] and received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGINT) is before  # restored


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_sigterm_then_ctrl_c_stop_a_tracked_run_losing_no_report(
    mlflow_server: MlflowServer, shared_data: Path, data_cache: Path, tmp_path: Path
) -> None:
    """`orch run` as a real subprocess, stopped mid-run by SIGTERM, then re-run (it resumes) and
    stopped by SIGINT: each time it exits soon with 128 + the signal and its MLflow run ends
    KILLED; every step it printed reached MLflow (or the pending file)."""
    sets = [
        f"data.train={quoted(shared_data)}",
        f"data.cache_dir={quoted(data_cache)}",
        f"train.storage_path={quoted(tmp_path / 'runs')}",
        "scaling.max_failures=0",
        *TINY_CNN,
        "name=stopped",
        "train.max_steps=2000",  # far more than a leg lasts
        "train.checkpoint_every=2",
        "tracking.mlflow.enabled=true",
        f"tracking.mlflow.tracking_uri={mlflow_server.uri}",
    ]
    argv = [sys.executable, "-m", "orchestrator", "run", str(LOCAL / "mnist_cnn.yaml")]
    argv += [arg for value in sets for arg in ("--set", value)]
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    printed: list[list[int]] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
            # As in a terminal, whatever the test runner ignores.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert proc.stdout is not None
        steps: list[int] = []
        seen = []
        for line in proc.stdout:  # the progress lines, one per report off a terminal
            seen.append(line)
            if match := re.match(r"step (\d+)/", line):
                steps.append(int(match[1]))
                if len(steps) >= 3:  # mid-run, checkpoints written
                    break
        assert steps, "".join(seen)
        proc.send_signal(signum)
        sent = time.monotonic()
        rest, _ = proc.communicate(timeout=120)
        assert time.monotonic() - sent < 60, rest
        assert proc.returncode == 128 + signum, "".join(seen) + rest
        assert "Traceback" not in rest and "stopped by" in rest
        steps += [int(s) for s in re.findall(r"^step (\d+)/", rest, re.M)]
        printed.append(steps)
        experiment = client.get_experiment_by_name("stopped")
        assert experiment is not None
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.info.status == "KILLED"
    assert printed[1][0] > printed[0][0]  # the re-run resumed from a checkpoint of the first
    logged = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    pending = tmp_path / "runs" / "stopped" / "mlflow_pending.jsonl"
    lines = pending.read_text().splitlines() if pending.exists() else []
    kept = {json.loads(line).get("step") for line in lines}
    assert set(printed[0] + printed[1]) <= logged | kept
