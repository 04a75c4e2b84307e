"""How the model is distributed: plain DDP or a DeepSpeed ZeRO engine, behind one small interface.

The training loop calls `forward_context()`, `backward(loss)` (which steps the optimizer at
gradient-accumulation boundaries), `save(dir)` and `load(dir)`; it never touches DDP or
DeepSpeed directly. Keeping distribution here keeps the loop and the models free of it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn

from orchestrator.spec import DeepSpeedSpec, OptimizerSpec, SchedulerSpec, TrainSpec
from orchestrator.train.session import Session

if TYPE_CHECKING:
    from orchestrator.train.custom_step import StepEngine

__all__ = [
    "DDPEngine",
    "DeepSpeedEngine",
    "Engine",
    "ModelSize",
    "accumulation_steps",
    "deepspeed_config",
    "lr_lambda",
    "make_engine",
    "make_optimizer",
    "zero_communication",
]

DS_TAG = "zero"  # DeepSpeed's checkpoint tag inside each orch checkpoint


def accumulation_steps(train: TrainSpec, world_size: int) -> int:
    """Micro batches per optimizer step on each worker."""
    per_pass = train.micro_batch_size * world_size
    return (train.global_batch_size or per_pass) // per_pass


def deepspeed_config(
    ds: DeepSpeedSpec,
    train: TrainSpec,
    world_size: int,
    model: ModelSize | None = None,
    on_gpu: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config orch derives from the spec (and the model's size, when given), with
    `deepspeed.extra` merged in."""
    accum = accumulation_steps(train, world_size)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if model is not None and ds.zero_stage >= 2 and on_gpu:  # on CPU: DeepSpeed's defaults
        zero |= zero_communication(ds.zero_stage, model, on_gpu)
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param}
    config: dict[str, Any] = {
        "train_batch_size": train.micro_batch_size * world_size * accum,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        # orch builds a torch optimizer; DeepSpeed would otherwise insist on its own ones.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # orch reports progress itself
        "wall_clock_breakdown": False,
    }
    if train.grad_clip is not None:
        config["gradient_clipping"] = train.grad_clip
    return _merge(config, ds.extra)


@dataclass(frozen=True)
class ModelSize:
    """What ZeRO's communication settings are sized by."""

    parameters: int
    hidden_size: int | None = None

    @classmethod
    def of(cls, model: nn.Module) -> ModelSize:
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        return cls(sum(p.numel() for p in model.parameters()), hidden)


def zero_communication(stage: int, model: ModelSize, on_gpu: bool) -> dict[str, Any]:
    """ZeRO-2/3's bucket sizes for this model, and overlap of communication with compute.

    DeepSpeed's default buckets (5e8 elements) are sized for models of billions of parameters:
    a BERT-base's gradients fit in one, so their reduction starts only when the backward pass
    has ended. About a tenth of the model per bucket (at least 1e6 elements, at most DeepSpeed's
    5e8) reduces as the backward pass goes. ZeRO-3's prefetch and persistence follow the hidden
    size, as transformers' DeepSpeed integration sets them. Overlap needs CUDA streams: on CPU
    (gloo) DeepSpeed runs it in line, so it is left off there. `deepspeed.extra` overrides any.
    """
    bucket = int(min(5e8, max(1e6, model.parameters // 10)))
    out: dict[str, Any] = {
        "overlap_comm": on_gpu,
        "contiguous_gradients": True,
        "reduce_bucket_size": bucket,
    }
    if stage == 2:
        out["allgather_bucket_size"] = bucket
    else:
        hidden = model.hidden_size or int(model.parameters**0.5)
        out["stage3_prefetch_bucket_size"] = int(min(bucket, 0.9 * hidden * hidden))
        out["stage3_param_persistence_threshold"] = 10 * hidden
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def make_optimizer(
    spec: OptimizerSpec, model: nn.Module, *, fused: bool = False
) -> torch.optim.Optimizer:
    """The spec's optimizer over `model`'s parameters; `fused`: AdamW's fused kernel (the
    parameters must be on a GPU)."""
    # No weight decay on biases and norms, as BERT and GPT-2 were trained.
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": spec.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum)
    return torch.optim.AdamW(
        groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, fused=True if fused else None
    )


def lr_lambda(spec: SchedulerSpec, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at each step: linear warmup, then constant/linear/cosine decay."""

    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.name == "constant":
            return 1.0
        span = max(1, total_steps - spec.warmup_steps)
        progress = min(1.0, (step - spec.warmup_steps) / span)
        shape = 1 - progress if spec.name == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * shape

    return factor


class DDPEngine:
    """Plain data parallelism (torch DDP through Ray Train; one process in a sweep trial), with
    autocast for bf16/fp16."""

    def __init__(
        self, model: nn.Module, train: TrainSpec, session: Session, accum: int, total_steps: int
    ):
        self.device = session.device
        self.module = model
        self.model = session.prepare_model(model)
        if train.compile:
            self.model = torch.compile(self.model)  # type: ignore[assignment]
        # One fused kernel for all parameters instead of a handful of launches per tensor.
        fused = train.fused_optimizer and self.device.type == "cuda"
        self.optimizer = make_optimizer(train.optimizer, model, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(train.scheduler, total_steps)
        )
        self.train, self.accum, self.micro = train, accum, 0
        self.scaler = torch.amp.GradScaler(enabled=train.precision == "fp16")
        self.input_dtype = torch.float32

    def forward_context(self) -> contextlib.AbstractContextManager[Any]:
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        if self.train.precision not in dtypes:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtypes[self.train.precision])

    def backward(self, loss: torch.Tensor) -> bool:
        """Accumulate; at a boundary clip, step and return True."""
        self.micro += 1
        boundary = self.micro % self.accum == 0
        no_sync = getattr(self.model, "no_sync", None)  # DDP's; a one-process model has none
        sync = contextlib.nullcontext() if boundary or no_sync is None else no_sync()
        with sync:
            self.scaler.scale(loss / self.accum).backward()
        if not boundary:
            return False
        if self.train.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, directory: str, rank: int) -> None:
        if rank == 0:
            torch.save(
                {
                    "model": self.module.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                },
                os.path.join(directory, "state.pt"),
            )

    def load(self, directory: str) -> None:
        state = torch.load(os.path.join(directory, "state.pt"), map_location=self.device)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def train_mode(self, on: bool) -> None:
        self.model.train(on)


def _skip_inference_comm_kernel() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce kernel on CPU.

    DeepSpeed's CPU backend builds that C++ kernel whenever it starts (about a minute on 2
    cores, and it needs a compiler), yet only its inference all-reduce uses it; training's
    collectives go through gloo either way.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedEngine:
    """A DeepSpeed ZeRO engine; on CPU it runs with gloo through DeepSpeed's CPU accelerator."""

    def __init__(
        self, model: nn.Module, train: TrainSpec, ds: DeepSpeedSpec, world: int, total_steps: int
    ):
        import deepspeed

        if not torch.cuda.is_available():
            _skip_inference_comm_kernel()
        optimizer = make_optimizer(train.optimizer, model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(train.scheduler, total_steps)
        )
        on_gpu = torch.cuda.is_available()
        self.config = deepspeed_config(ds, train, world, ModelSize.of(model), on_gpu)
        self.module = model
        # ZeRO keeps the optimizer's state in a few flat partitions, so AdamW's fused kernel
        # would save little there: DeepSpeed gets the plain one.
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config
        )
        if train.compile:
            self.model.compile()
        self.device = self.model.device
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            train.precision, torch.float32
        )

    def forward_context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # DeepSpeed casts the model itself

    def backward(self, loss: torch.Tensor) -> bool:
        self.model.backward(loss)
        boundary = self.model.is_gradient_accumulation_boundary()
        self.model.step()  # steps optimizer and scheduler only at a boundary
        return boundary

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: str, rank: int) -> None:
        # Every rank writes its own ZeRO shard; Ray merges the ranks' files into one checkpoint.
        self.model.save_checkpoint(directory, tag=DS_TAG)

    def load(self, directory: str) -> None:
        path, _ = self.model.load_checkpoint(directory, tag=DS_TAG)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}")

    def train_mode(self, on: bool) -> None:
        self.model.train(on)


# What the training loop drives; a StepEngine runs a custom train.step (custom_step.py).
Engine = Union[DDPEngine, DeepSpeedEngine, "StepEngine"]


def make_engine(
    model: nn.Module,
    train: TrainSpec,
    ds: DeepSpeedSpec | None,
    session: Session,
    accum: int,
    total_steps: int,
) -> Engine:
    if train.step is not None:  # the spec allows a custom step with plain DDP only
        from orchestrator.train.custom_step import StepEngine  # it imports this module

        return StepEngine(model, train, session, accum, total_steps)
    if ds is None:
        return DDPEngine(model, train, session, accum, total_steps)
    return DeepSpeedEngine(model, train, ds, session.world, total_steps)


@contextlib.contextmanager
def no_grad_eval(engine: Engine) -> Iterator[None]:
    engine.train_mode(False)
    try:
        with torch.no_grad(), engine.forward_context():
            yield
    finally:
        engine.train_mode(True)
