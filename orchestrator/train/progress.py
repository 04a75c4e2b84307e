"""Live progress: a Train callback forwards rank 0's reports to the driver, which draws a bar."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ray.train import UserCallback

__all__ = ["ProgressCallback", "ProgressPrinter"]


class ProgressCallback(UserCallback):
    """Runs in the Train controller actor: forwards each report through a Ray queue."""

    def __init__(self, channel: Any):
        self.channel = channel

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        event = dict(metrics[0]) if metrics else {}
        if checkpoint is not None:
            event["checkpoint"] = checkpoint.path
        self.channel.put(event)


class ProgressPrinter:
    """Drains the queue on a driver thread and hands each event to `show` (and keeps the last)."""

    def __init__(self, channel: Any, show: Callable[[dict[str, Any]], None]):
        self.channel, self.show = channel, show
        self.events: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        # Joined, not waited on for a while: the tracker's finish must not drain its reports
        # while this thread still logs them. Its wait is bounded: a report's flush times out
        # quickly, and is not tried again soon after it did.
        self._thread.join()
        self._drain()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._drain():
                time.sleep(0.2)

    def _drain(self) -> bool:
        got = False
        while True:
            try:
                event = self.channel.get_nowait()
            except (queue.Empty, Exception):  # ray.util.queue.Empty, or the actor is gone
                return got
            got = True
            self.events.append(event)
            self.show(event)
