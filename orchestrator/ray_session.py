"""Connecting to Ray: an existing cluster when given an address, else a local instance."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["TRAIN_SETTINGS", "ray_session"]

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
    ray.init(
        address=address,
        include_dashboard=False if address is None else None,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
    )
    try:
        yield
    finally:
        ray.shutdown()
