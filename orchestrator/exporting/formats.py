"""The export formats: one table entry each, with how to write the file and how to run it back.

ONNX goes through torch's TorchScript-based exporter (`dynamo=False`, opset 17): it exports
every built-in kind with dynamic batch and sequence axes, and a 2-layer BERT in about 4 s here
where the dynamo exporter took 18 s (and needs onnxscript). The file is run back with
onnxruntime on CPU. TorchScript is a trace (`torch.jit.trace`), run back with `torch.jit.load`:
the built-in kinds' forwards have no data-dependent control flow, which a trace cannot capture,
and the check on a second batch of another size (and length) catches a trace that fixed a shape.
torch 2.14 marks `torch.jit` deprecated (in favour of torch.export) but it works as before.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["EXPORTERS", "Exporter"]


@dataclass(frozen=True)
class Exporter:
    """One export format: its file name, its writer and its runner."""

    file: str  # written beside state_dict.pt in the model directory
    # (eager model, example batch, names of its dynamic axes, path) -> the file at path
    write: Callable[[nn.Module, torch.Tensor, tuple[str, ...], Path], None]
    # path -> a function from an input batch to the exported model's output
    load: Callable[[Path], Callable[[torch.Tensor], torch.Tensor]]


def _write_onnx(model: nn.Module, example: torch.Tensor, axes: tuple[str, ...], path: Path) -> None:
    with _quiet():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": dict(enumerate(axes))},
            opset_version=17,
            dynamo=False,
        )


def _load_onnx(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input": batch.numpy()})[0])

    return run


def _write_torchscript(
    model: nn.Module, example: torch.Tensor, axes: tuple[str, ...], path: Path
) -> None:
    with _quiet():
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, str(path))


def _load_torchscript(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu")
    module.eval()
    return module


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters warn about every Python value they fold into the graph (TracerWarning)
    and about their own deprecation; orch checks the result on real batches instead."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


EXPORTERS: dict[str, Exporter] = {
    "onnx": Exporter("model.onnx", _write_onnx, _load_onnx),
    "torchscript": Exporter("model.torchscript.pt", _write_torchscript, _load_torchscript),
}
