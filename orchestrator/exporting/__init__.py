"""Export a run's final fp32 model to ONNX or TorchScript, checked against eager PyTorch.

`export_model` loads the model directory a run wrote (`models.load_exported`), writes each
format beside state_dict.pt, runs it back (onnxruntime, torch.jit.load) on real batches of the
run's prepared data and compares it with the eager model: the largest absolute difference is
reported and recorded in `exports.json`, and an export above the tolerance is refused (its
file is never put in place). `orch export` and a workload's `export:` list both come here.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import ExportError
from orchestrator.files import write_atomic
from orchestrator.masking import first_line
from orchestrator.spec import DEFAULT_TOLERANCE, EXPORT_FORMATS, ExportSpec, unexportable

if TYPE_CHECKING:
    from orchestrator.tracking import Tracker

__all__ = [
    "EXPORTS_FILE",
    "ExportReport",
    "export_at_end",
    "export_files",
    "export_model",
    "find_model_dir",
    "known_formats",
]

EXPORTS_FILE = "exports.json"  # per format: file, largest difference, tolerance, batches


@dataclass(frozen=True)
class ExportReport:
    """One accepted export."""

    format: str
    path: str
    max_abs_diff: float
    tolerance: float
    batches: list[list[int]]  # the input shapes it was checked on
    split: str  # which split of the run's data they came from
    seconds: float

    def line(self) -> str:
        shapes = ", ".join("x".join(map(str, b)) for b in self.batches)
        return (
            f"{self.format}: {self.path} (max abs diff {self.max_abs_diff:.3g} vs eager PyTorch "
            f"on {self.split} batches {shapes}; tolerance {self.tolerance:g}; "
            f"{self.seconds:.1f} s)"
        )


def find_model_dir(path: str | Path) -> Path:
    """The model directory of a run directory (or the model directory itself)."""
    path = Path(path)
    for candidate in (path / "model", path):
        if (candidate / "model.json").is_file():
            return candidate
    if not path.exists():
        raise ExportError(f"{path}: no such run directory")
    raise ExportError(
        f"{path}: no exported model here (no model/model.json): the run has not finished, "
        "or this is not an orch run directory (orch_runs/<name>)"
    )


def export_files(model_dir: str | Path) -> list[Path]:
    """The exported files (and their record) in a model directory, for tracking."""
    from orchestrator.exporting.formats import EXPORTERS

    names = [e.file for e in EXPORTERS.values()] + [EXPORTS_FILE]
    return [Path(model_dir, n) for n in names if Path(model_dir, n).is_file()]


def known_formats(formats: Iterable[str]) -> list[str]:
    """The formats asked for, each once; ExportError names any unknown one and the allowed."""
    formats = list(dict.fromkeys(formats))
    if unknown := [f for f in formats if f not in EXPORT_FORMATS]:
        raise ExportError(
            f"unknown export format {', '.join(unknown)}; allowed: {', '.join(EXPORT_FORMATS)}"
        )
    return formats


def export_model(
    model_dir: str | Path,
    formats: Iterable[str],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    log: Callable[[str], None] = lambda _: None,
) -> list[ExportReport]:
    """Export the model in `model_dir` to each format and check it; ExportError lists every
    format refused (the accepted ones are written all the same)."""
    import torch

    from orchestrator.exporting.samples import INPUT_KINDS, check_batches
    from orchestrator.models import LogitsOnly, ModelError, load_exported

    model_dir = Path(model_dir)
    formats = known_formats(formats)
    meta, section = _read_meta(model_dir)
    batches = check_batches(meta, section, str(model_dir / "model.json"))
    try:
        model = load_exported(model_dir)
    except ModelError as exc:
        raise ExportError(str(exc)) from None
    if hasattr(model, "config"):  # transformers models return output objects, not tensors
        model = LogitsOnly(model)
    model.eval()
    with torch.no_grad():
        expected = [model(b) for b in batches]
    check = _Check(
        batches, expected, INPUT_KINDS[section.inputs].dynamic, meta["check_data"]["split"]
    )
    reports, refused = [], []
    for name in formats:
        try:
            report = _export_one(name, model, check, model_dir, tolerance)
        except ExportError as exc:  # the other formats are tried all the same
            refused.append(str(exc))
            continue
        _record(model_dir, report)
        log(f"export {report.line()}")
        reports.append(report)
    if refused:
        raise ExportError("; ".join(refused))
    return reports


def _read_meta(model_dir: Path) -> tuple[dict[str, Any], Any]:
    from pydantic import TypeAdapter, ValidationError

    from orchestrator.spec import ModelSpec

    where = model_dir / "model.json"
    try:
        meta = json.loads(where.read_text())
        section: Any = TypeAdapter(ModelSpec).validate_python(meta["model"])
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
        raise ExportError(f"{where}: not an orch model export ({first_line(exc)})") from None
    if (reason := unexportable(section.kind)) is not None:
        raise ExportError(f"{where}: model.kind: {reason}")
    return meta, section


@dataclass(frozen=True)
class _Check:
    """What every format of one model is checked on."""

    batches: list[Any]  # input tensors
    expected: list[Any]  # eager PyTorch's outputs for them
    axes: tuple[str, ...]  # the dynamic axes' names
    split: str


def _export_one(
    name: str, model: Any, check: _Check, model_dir: Path, tolerance: float
) -> ExportReport:
    """Write one format beside the model, run it back, and put it in place if it agrees."""
    from orchestrator.exporting.formats import EXPORTERS

    exporter = EXPORTERS[name]
    final = model_dir / exporter.file
    partial = model_dir / f".{exporter.file}.tmp"  # never a refused file under the real name
    started = time.monotonic()
    try:
        try:
            exporter.write(model, check.batches[0], check.axes, partial)
            run = exporter.load(partial)
            outputs = [run(b) for b in check.batches]
        except Exception as exc:  # the exporters and runtimes raise many kinds
            raise ExportError(f"{final}: the {name} export failed: {first_line(exc)}") from None
        worst = _largest_difference(outputs, check.expected, f"{final}: {name} export")
        shapes = [list(b.shape) for b in check.batches]
        if not worst <= tolerance:  # NaN is refused too
            raise ExportError(
                f"{final}: {name} export refused: its largest absolute difference from eager "
                f"PyTorch is {worst:.3g}, above the tolerance {tolerance:g} (batches {shapes}); "
                "nothing was written. If that difference is acceptable, raise the tolerance "
                "(orch export --tolerance, or export: {formats: [...], tolerance: ...})"
            )
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    seconds = time.monotonic() - started
    return ExportReport(name, str(final), worst, tolerance, shapes, check.split, seconds)


def _largest_difference(outputs: list[Any], expected: list[Any], what: str) -> float:
    worst = 0.0
    for got, want in zip(outputs, expected, strict=True):
        if tuple(got.shape) != tuple(want.shape):
            raise ExportError(
                f"{what} refused: its output has shape {tuple(got.shape)} where eager "
                f"PyTorch's has {tuple(want.shape)}"
            )
        worst = max(worst, (got.float() - want.float()).abs().max().item())
    return worst


def _record(model_dir: Path, report: ExportReport) -> None:
    path = model_dir / EXPORTS_FILE
    try:
        records = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:  # damaged: rewritten whole below
        records = {}
    entry = asdict(report)
    entry["file"] = Path(entry.pop("path")).name
    records[entry.pop("format")] = entry
    write_atomic(path, json.dumps(records, indent=2))


def export_at_end(
    settings: ExportSpec | None,
    model_dir: str | None,
    log: Callable[[str], None],
    tracker: Tracker | None,
) -> list[ExportReport]:
    """A workload's `export:` list, at the end of its run: the formats not exported yet.

    A refusal is an ExportError that keeps the run's checkpoints and fp32 model, and says how
    to export again; the differences reach the run's tracker as metrics.
    """
    if settings is None or model_dir is None:
        return []
    done = _recorded(Path(model_dir))
    missing = [f for f in settings.formats if f not in done]
    if not missing:
        return []
    try:
        reports = export_model(model_dir, missing, tolerance=settings.tolerance, log=log)
    except ExportError as exc:
        run_dir = Path(model_dir).parent
        raise ExportError(
            f"the run finished (checkpoints and the fp32 model in {model_dir} are kept), but its "
            f"export failed: {exc}. Export it with `orch export {run_dir} --format FORMAT`, or "
            "run the workload again, which exports what is missing"
        ) from None
    if tracker is not None:
        step = json.loads(Path(model_dir, "model.json").read_text()).get("checkpoint", {})
        tracker.log(
            {"step": step.get("step", 0)}
            | {f"export_{r.format}_max_abs_diff": r.max_abs_diff for r in reports}
        )
    return reports


def _recorded(model_dir: Path) -> set[str]:
    """The formats already exported (and accepted) in a model directory."""
    from orchestrator.exporting.formats import EXPORTERS

    try:
        records = json.loads((model_dir / EXPORTS_FILE).read_text())
    except (OSError, ValueError):
        return set()
    return {f for f in records if f in EXPORTERS and (model_dir / EXPORTERS[f].file).is_file()}
