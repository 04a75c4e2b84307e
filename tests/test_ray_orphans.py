"""A driver killed with SIGKILL cannot stop its local Ray: the next orch run stops what is left."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from orchestrator.ray_session import stop_orphans

pytestmark = pytest.mark.integration

DRIVER = """
import time
from orchestrator.ray_session import ray_session
with ray_session():
    print("up", flush=True)
    time.sleep(600)
"""


def test_local_ray_of_a_killed_driver_is_stopped_by_the_next() -> None:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout is not None and driver.stdout.readline() == "up\n"
        ray_processes = psutil.Process(driver.pid).children(recursive=True)
        assert ray_processes
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    time.sleep(5)  # what would exit with its parent has done so by now
    left = [p for p in ray_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    try:
        assert left, "nothing outlived the driver: this test no longer tests anything"
        assert stop_orphans() == len(left)
        psutil.wait_procs(left, timeout=10)
        assert not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert stop_orphans() == 0  # the record is gone with them
    finally:
        for p in left:
            if p.is_running():
                p.kill()
