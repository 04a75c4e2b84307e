"""One run of a name at a time: two runs sharing a run directory would interleave their
checkpoints, and each one's `keep_checkpoints` would delete the other's.

The lock is an advisory `flock` on `<storage>/<name>/.orch.lock`, so the kernel drops it when
its holder dies, however it dies (a lock left by a killed run is simply taken); the file names
the holder for the error another run gets. It works on local disks and shared filesystems
that support flock (NFSv4). Object-store storage (s3://, gs://) has no such lock: there `orch
submit` refuses a name that a running job of the cluster already uses.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.errors import RunError

__all__ = ["LOCK", "run_lock"]

LOCK = ".orch.lock"


@contextmanager
def run_lock(storage: str, name: str) -> Iterator[None]:
    """Hold the lock of run `name` under `storage` (a local path or URI) for the block."""
    if "://" in storage:
        yield
        return
    run_dir = Path(storage, name)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(
                f"run {name!r} is already running ({_holder(path)}); its directory {run_dir} "
                "takes one run at a time: wait for it, stop it, or pass another --name"
            ) from None
        os.ftruncate(fd, 0)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": int(time.time())}
        os.write(fd, json.dumps(holder).encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the lock goes with the close; an empty file holds no one
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
        return f"process {holder['pid']} on {holder['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "by another process"
