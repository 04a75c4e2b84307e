"""Connecting to Ray: an existing cluster when given an address, else a local instance."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from orchestrator.masking import mask

__all__ = ["TRAIN_SETTINGS", "ray_session", "stop_orphans"]

# Ray Train settings orch changes from Ray's defaults (a value already in the environment wins).
# Ray Train passes them on to its controller and workers when a run starts.
TRAIN_SETTINGS = {
    # The controller takes at most one report per worker per poll, every 2 s by Ray's default,
    # and a worker's next report waits for that: a loop that logs every few steps would wait
    # most of its time (bench/tune_overhead.py: an 800-step run with 80 reports took 179 s for
    # 19 s of training). A poll is one small actor call per worker.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}
# Only for a Ray that orch starts on this machine: no node of it is ever preempted, so Ray
# Train's watcher of preempted nodes (one more actor per run, polling Ray's state) has nothing
# to watch.
LOCAL_TRAIN_SETTINGS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@contextmanager
def ray_session(address: str | None = None, verbose: bool = False) -> Iterator[None]:
    """Use the Ray that is already initialized, or start/connect one and shut it down after."""
    import ray
    import ray.data  # configures Ray Data's loggers, which we then quiet

    if not verbose:
        # orch prints its own progress; Ray Data's per-operator log lines drown it.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # Notices the user cannot act on: a local Ray's token auth being on (it is meant to
        # be), and Ray Train's own use of a Ray Data option Ray deprecated.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
        warnings.filterwarnings("ignore", message=".*exclude_resources.*")
    for key, value in (TRAIN_SETTINGS | (LOCAL_TRAIN_SETTINGS if address is None else {})).items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        yield
        return
    if address is None:
        stop_orphans()
    try:
        ray.init(
            address=address,
            include_dashboard=False if address is None else None,
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.WARNING,
        )
    except (ConnectionError, RuntimeError) as exc:
        if address is None:
            raise
        from orchestrator.errors import RunError

        raise RunError(
            f"cannot join the Ray cluster at {mask(address)} (--address): "
            f"{str(exc).splitlines()[0]}. Is it running and reachable from this machine (Ray "
            "joins 127.0.0.1 by the machine's own address), and does $RAY_AUTH_MODE=token with "
            "$RAY_AUTH_TOKEN hold its token?"
        ) from None
    record = _record_local_ray() if address is None else None
    try:
        yield
    finally:
        ray.shutdown()
        if record is not None:
            record.unlink(missing_ok=True)


# A local Ray's processes are the driver's children. Killed with SIGKILL, the driver cannot stop
# them, and some outlive it (Ray's agents, reparented to init). Each orch driver that starts a
# local Ray lists its processes here; the next one stops those of a driver that is gone.
_RECORDS = Path(tempfile.gettempdir()) / f"orch-{os.getuid()}" / "local-ray"


def _record_local_ray() -> Path:
    me = psutil.Process()
    processes = [(p.pid, p.create_time()) for p in me.children(recursive=True)]
    _RECORDS.mkdir(parents=True, exist_ok=True, mode=0o700)
    record = _RECORDS / f"{me.pid}.json"
    record.write_text(json.dumps({"driver": [me.pid, me.create_time()], "processes": processes}))
    return record


def stop_orphans() -> int:
    """Stop the Ray processes of local Rays whose orch driver died without stopping them;
    return how many. A pid is only killed if its start time is the recorded one (not reused)."""
    stopped = 0
    for record in _RECORDS.glob("*.json"):
        try:
            entry = json.loads(record.read_text())
            (pid, started), processes = entry["driver"], entry["processes"]
        except (OSError, ValueError, KeyError, TypeError):
            record.unlink(missing_ok=True)
            continue
        if _alive(pid, started):
            continue
        for child, child_started in processes:
            if _alive(child, child_started):
                with contextlib.suppress(psutil.Error):
                    psutil.Process(child).kill()
                    stopped += 1
        record.unlink(missing_ok=True)
        if stopped:
            logging.getLogger(__name__).warning(
                "stopped %d Ray process(es) left running by orch run %d, which was killed",
                stopped,
                pid,
            )
    return stopped


def _alive(pid: int, started: float) -> bool:
    try:
        process = psutil.Process(pid)
        return process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
