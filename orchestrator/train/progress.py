"""Live progress: a Train callback forwards rank 0's reports to the driver, which draws a bar."""

from __future__ import annotations

import contextlib
import queue
import threading
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


# How long one wait for the next report blocks in the queue actor. Waiting there rather than
# asking the actor five times a second left the training workers the 2-4% of a CPU that the
# asking cost (measured on 2 cores: the queue actor and the driver were the busiest processes
# after the workers). The end of the run wakes the wait at once (see __exit__).
_WAIT_S = 5.0


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
        with contextlib.suppress(Exception):  # the queue actor may be gone already
            self.channel.put_nowait(None)  # wakes the thread's wait
        # Joined, not waited on for a while: the tracker's finish must not drain its reports
        # while this thread still logs them. Its wait is bounded: a report's flush times out
        # quickly, and is not tried again soon after it did.
        self._thread.join()
        self._drain()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self.channel.get(timeout=_WAIT_S)
            except queue.Empty:  # ray.util.queue.Empty: no report for a while
                continue
            except Exception:  # the queue actor is gone: the run is over
                return
            self._take(event)

    def _drain(self) -> None:
        while True:
            try:
                event = self.channel.get_nowait()
            except (queue.Empty, Exception):  # ray.util.queue.Empty, or the actor is gone
                return
            self._take(event)

    def _take(self, event: dict[str, Any] | None) -> None:
        if event is None:  # __exit__'s wake-up
            return
        self.events.append(event)
        self.show(event)
