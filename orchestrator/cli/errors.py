"""How `orch` fails: one table from exception to exit code, and one place that prints the error."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer

from orchestrator.load import SpecError
from orchestrator.masking import mask
from orchestrator.stopping import Stopped

__all__ = [
    "EXIT_CODES",
    "INVALID_INPUT",
    "TRAINING_FAILED",
    "error_lines",
    "exit_code",
    "exit_on_error",
    "exit_on_stop",
    "fail",
    "print_error",
]

INVALID_INPUT = 2
TRAINING_FAILED = 1

# Keyed by (module, class name), not by the class: importing orchestrator.data or orchestrator.jobs
# here would pull Ray and torch into `orch --help` and `orch validate`.
EXIT_CODES: dict[tuple[str, str], int] = {
    ("orchestrator.load", "SpecError"): INVALID_INPUT,  # the workload file or a --set
    ("orchestrator.errors", "RunError"): INVALID_INPUT,  # the workload cannot start as specified
    ("orchestrator.errors", "DataError"): INVALID_INPUT,  # the raw data cannot be prepared
    ("orchestrator.errors", "JobsError"): INVALID_INPUT,  # the cluster cannot be reached or used
    ("orchestrator.errors", "TrackingError"): INVALID_INPUT,  # MLflow cannot be read
    ("orchestrator.errors", "TrainingFailed"): TRAINING_FAILED,  # training started, then failed
}


def exit_code(error: BaseException) -> int | None:
    """`error`'s exit code from EXIT_CODES; None for an error orch does not expect."""
    for (module, name), code in EXIT_CODES.items():
        # An error's class is loaded only if its module is, so a module not loaded is skipped,
        # never imported.
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(error, cls):
            return code
    return None


def error_lines(error: Exception, where: Path | str | None = None) -> list[str]:
    """The lines that report an input error: every SpecError problem (each names its file and
    field), else the message after `where`."""
    if isinstance(error, SpecError):
        return [f"error: {problem}" for problem in error.problems]
    return [f"error: {where}: {error}" if where is not None else f"error: {error}"]


def print_error(*lines: str) -> None:
    """Print `lines` in red on stderr, masked: the last guard for a secret in an error's text."""
    for line in lines:
        typer.secho(mask(line), fg="red", err=True)


def fail(*lines: str, code: int = INVALID_INPUT, hint: str = "") -> NoReturn:
    """Print `lines` in red on stderr, then `hint` plain, and exit with `code`."""
    print_error(*lines)
    if hint:
        typer.secho(hint, err=True)
    raise typer.Exit(code)


@contextmanager
def exit_on_stop(hint: str = "") -> Iterator[None]:
    """Ctrl-C or SIGTERM stopped the command: say so, then `hint`, and exit 128 + the signal."""
    try:
        yield
    except KeyboardInterrupt as stop:
        stopped = stop if isinstance(stop, Stopped) else Stopped(signal.SIGINT)
        fail(str(stopped), code=stopped.exit_code, hint=hint)


@contextmanager
def exit_on_error(
    where: Path | str | None = None, *, failed: str = "training failed", hint: str = ""
) -> Iterator[None]:
    """Turn an error in EXIT_CODES into its message and exit code; let any other through.

    `where` (usually the workload file) starts an input error's message; a training failure
    reads `{failed}: {error}`, followed by `hint`, what to do next.
    """
    try:
        yield
    except Exception as error:
        code = exit_code(error)
        if code is None:
            raise
        if code == TRAINING_FAILED:
            fail(f"{failed}: {error}", code=code, hint=hint)
        fail(*error_lines(error, where), code=code)
