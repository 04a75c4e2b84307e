"""How well a run uses its GPUs: model FLOPs utilization (MFU) and peak memory.

MFU = the model's training FLOPs per second / the GPU's peak, the measure PaLM introduced: it
counts the arithmetic the model needs (not recomputation, not padding), so it compares runs of
different code on different GPUs. The FLOPs per sample are counted once, by running the model's
forward pass on PyTorch's meta device under its FLOP counter (no memory, no data: the shapes
alone); training is about three forwards' worth (forward, and a backward of twice its cost).
A BERT MLM that predicts at the masked positions only (`train.mlm_predict: masked`) does its
vocabulary projection on that share of the tokens, and is counted so.

The peaks are the dense (no sparsity) tensor-core figures of NVIDIA's data sheets. A GPU not
in the table gets no MFU (a note says so), never a guess.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from orchestrator.train.config import WorkerConfig

__all__ = ["PEAK_FLOPS", "GpuMeter", "flops_per_sample", "mfu", "peak_flops"]

log = logging.getLogger(__name__)

# Dense peak FLOP/s by the name torch reports (first match wins, so longer names come first):
# (bf16/fp16 tensor cores, TF32 tensor cores). fp32 runs count at the TF32 peak, since orch
# turns TF32 on for them (train.tf32).
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989e12, 494e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494e12),  # SXM and NVL report "H100 80GB HBM3" and the like
    ("A100", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("A10", 125e12, 62.5e12),  # the A10; AWS's A10G is slower and reports "A10G"
    ("V100", 125e12, 15.7e12),  # fp16 tensor cores; no bf16, no TF32 (plain fp32)
    ("T4", 65e12, 8.1e12),
)


def peak_flops(device_name: str, precision: str) -> float | None:
    """The GPU's dense peak for `precision`, or None for a GPU not in the table."""
    for name, half, tf32 in PEAK_FLOPS:
        if name == "A10" and "A10G" in device_name:
            continue
        if name in device_name:
            return half if precision in ("bf16", "fp16") else tf32
    return None


def flops_per_sample(cfg: WorkerConfig) -> float | None:
    """Training FLOPs (forward and backward) of one sample of the workload's model, or None
    when the model cannot be counted on the meta device (a custom model may not be)."""
    from orchestrator.models import build_model, input_example, task_of

    try:
        with torch.device("meta"):
            model = build_model(cfg.model, cfg.data_info)
        example = torch.from_numpy(input_example(cfg.model, cfg.data_info))
        if cfg.dataset.seq_len is not None and example.ndim == 2:  # tokens: the data's length
            example = example[:, :1].expand(1, cfg.dataset.seq_len)
        example = example.to("meta")
        forward = _forward_flops(model, example)
        if task_of(cfg.model) == "masked_lm" and cfg.train.mlm_predict == "masked":
            forward -= (1 - cfg.stream.mlm_probability) * _mlm_head_flops(model, example)
    except Exception as exc:
        log.info("MFU not reported: the model's FLOPs could not be counted (%s)", exc)
        return None
    return 3.0 * forward


def _forward_flops(model: torch.nn.Module, example: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(example)
    return float(counter.get_total_flops())


def _mlm_head_flops(model: Any, example: torch.Tensor) -> float:
    """FLOPs of a BERT MLM head over every position of `example` (0 for other models)."""
    head = getattr(model, "cls", None)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if head is None or hidden is None:
        return 0.0
    return _forward_flops(head, torch.empty(*example.shape, hidden, device="meta"))


class GpuMeter:
    """Adds `mfu` and `peak_memory_gb` (this worker's, since the last report) to reports."""

    def __init__(self, device: torch.device, flops: float | None, peak: float | None):
        self.device, self.flops, self.peak = device, flops, peak

    @classmethod
    def on(cls, device: torch.device, cfg: WorkerConfig) -> GpuMeter | None:
        """A meter for a GPU worker; None on a CPU."""
        if device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(device)
        peak = peak_flops(name, cfg.train.precision)
        if peak is None:
            log.warning(
                "MFU not reported: %s is not in orch's table of GPU peaks "
                "(orchestrator/train/utilization.py, PEAK_FLOPS)",
                name,
            )
        torch.cuda.reset_peak_memory_stats(device)
        return cls(device, flops_per_sample(cfg) if peak else None, peak)

    def read(self, samples_per_s: float, world: int) -> dict[str, float]:
        out = {"peak_memory_gb": torch.cuda.max_memory_allocated(self.device) / 1024**3}
        torch.cuda.reset_peak_memory_stats(self.device)
        if self.flops is not None and self.peak is not None:
            out["mfu"] = mfu(self.flops, samples_per_s, world, self.peak)
        return out


def mfu(flops_per_sample: float, samples_per_s: float, world: int, peak: float) -> float:
    """The share of each GPU's peak that the model's training FLOPs use (samples/s: all
    workers together)."""
    return flops_per_sample * samples_per_s / world / peak
