"""Stopping a driver: SIGTERM (`orch stop`, a scheduler, `kill`) does what Ctrl-C does.

Either way the run's cleanup runs: Ray Train stops, the MLflow run ends KILLED, the reports the
server did not take go to the pending file, and the checkpoints stay for a resume.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["Stopped", "keep_sigint", "stop_signals"]


class Stopped(KeyboardInterrupt):
    """The driver was stopped by a signal; a KeyboardInterrupt, so the same cleanup runs."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + self.signum


@contextmanager
def stop_signals(*, raising: bool = True) -> Iterator[list[int]]:
    """Within: SIGTERM is handed to the SIGINT handler in place, then (`raising`) raises
    Stopped(SIGTERM). Yields the list of stop signals received.

    The SIGINT handler in place is Python's (KeyboardInterrupt), Ray Train's (aborts its run)
    or Ray Tune's (ends the sweep, saving its state: `raising=False` lets it end by itself). A
    second SIGTERM is ignored, so that the cleanup finishes; SIGKILL still ends the process.
    Both handlers are restored after (the API may run in a notebook). Outside the main thread,
    where handlers cannot be set, this does nothing.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if received:
            return
        received.append(signum)
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):  # Ctrl-C ignored (a background job): stop all the same
            raise Stopped(signum)
        try:
            handler(signal.SIGINT, frame)
        # Python's Ctrl-C, or Ray Train's: it exits once it has aborted its run.
        except (KeyboardInterrupt, SystemExit):
            raise Stopped(signum) from None
        if raising:
            raise Stopped(signum)

    with keep_sigint():
        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            yield received
        finally:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def keep_sigint() -> Iterator[None]:
    """Restore the SIGINT handler after: Ray Train leaves its own installed after a run, where
    a later Ctrl-C would try to abort a run long gone, and exit 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
