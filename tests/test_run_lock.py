"""One run of a name at a time, through the CLI; a lock left by a killed run is taken over."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from test_data_cache import mnist_like
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.runlock import LOCK, run_lock

WORKLOAD = Path(__file__).parents[1] / "workloads" / "local" / "mnist_cnn.yaml"

HOLD = """
import sys, time
from orchestrator.runlock import run_lock
with run_lock(sys.argv[1], "mnist-cnn"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_second_run_of_a_name_is_refused_and_a_dead_holders_lock_taken(tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(storage)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        mnist_like(tmp_path / "mnist", images=10)  # never read: the run stops at the lock
        started = time.monotonic()
        result = CliRunner().invoke(
            app,
            [
                *("run", str(WORKLOAD), "--set", f"train.storage_path={storage}"),
                *("--set", f"data.train={tmp_path / 'mnist'}"),
            ],
        )
        assert result.exit_code == 2, result.output
        assert f"process {holder.pid} on {socket.gethostname()}" in result.output
        assert "already running" in result.output and "Traceback" not in result.output
        assert time.monotonic() - started < 20  # refused before Ray or the data were touched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the dead holder's lock: the next run takes it, and names itself.
    with run_lock(str(storage), "mnist-cnn"):
        assert f'"pid": {os.getpid()}' in (storage / "mnist-cnn" / LOCK).read_text()
