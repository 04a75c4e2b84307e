"""How the commands print what is not an error: the live progress line and plain tables."""

from __future__ import annotations

import sys
from types import TracebackType

import typer

__all__ = ["Progress", "table"]


class Progress:
    """One live line on a terminal, one line per report otherwise; ends its line on exit."""

    def __init__(self) -> None:
        self.live = sys.stdout.isatty()
        self.open = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.end()

    def note(self, text: str) -> None:
        self.end()
        typer.echo(text)

    def show(self, event: dict) -> None:
        step, total = event.get("step", 0), event.get("total_steps", 0)
        parts = [f"step {step}/{total}"]
        if "loss" in event:
            parts.append(f"loss {event['loss']:.4f}")
        if "samples_per_s" in event:
            parts.append(f"{event['samples_per_s']:.1f} samples/s")
        if "mfu" in event:
            parts.append(f"MFU {event['mfu']:.0%}")
        if "peak_memory_gb" in event:
            parts.append(f"{event['peak_memory_gb']:.1f} GB")
        parts += [f"{k} {v:.4g}" for k, v in event.items() if k in ("eval_loss", "eval_accuracy")]
        if total and event.get("step_time_s"):
            eta = int((total - step) * event["step_time_s"])
            parts.append(f"ETA {eta // 60}:{eta % 60:02d}")
        line = " | ".join(parts)
        if self.live:
            typer.echo("\r" + line.ljust(100), nl=False)
            self.open = True
        else:
            typer.echo(line)

    def end(self) -> None:
        if self.open:
            typer.echo()
            self.open = False


def table(rows: list[dict[str, str]], empty: str) -> None:
    """Print `rows` (all with the same keys) as left-aligned columns under a header, or `empty`."""
    if not rows:
        typer.echo(empty)
        return
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    typer.echo("  ".join(k.ljust(w) for k, w in widths.items()).rstrip())
    for row in rows:
        typer.echo("  ".join(row[k].ljust(w) for k, w in widths.items()).rstrip())
