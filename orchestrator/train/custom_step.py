"""A training step of the workload's own: `train.step: package.module:function`.

For training that the built-in step (one loss, one optimizer) cannot express: several
optimizers over named sub-modules, several losses, metrics of its own (a GAN, for one). The
loop around it stays orch's: data streaming, gradient accumulation, DDP across workers,
checkpoints and resume, reports, tracking and sweeps work as for any workload.

The contract (import path resolution: orchestrator.import_path)::

    step(ctx: StepContext, batch: tuple[Tensor, Tensor]) -> Mapping[str, float]

Called for every micro batch. `batch` is (inputs, labels) as the built-in step gets them, on
`ctx.device`: images as floats (N, C, H, W) in [0, 1] with class ids, or token ids. The step
computes its losses and calls `ctx.optimize(name, loss)` once per optimizer it updates, in the
order it wants them updated; it returns its metrics (name -> number, the same names at every
call), which orch averages over the micro batches between two reports and over the workers and
reports beside step time and throughput (`lr_<name>` for each optimizer is added).

Two optional functions, found by name in the step's module:

    evaluate(ctx, batches: Iterable[tuple[Tensor, Tensor]]) -> Mapping[str, float]

At every evaluation (`train.eval_every`, and at the end), on every worker, under
`torch.no_grad()` with the model in eval mode; `batches` are this worker's eval batches (at
most `train.eval_batches`). Its metrics are averaged over the workers; name them `eval_*`.

    sample_images(ctx) -> Tensor

At every evaluation, on rank 0 only (so no collectives): images (N, C, H, W) in [0, 1], written
as one grid PNG and logged to MLflow as `samples/step-NNNNNNNN.png`.

Optimizers come from `train.optimizers` (sub-module name -> optimizer, over that sub-module's
parameters, as `model.named_children()` names them), or, without it, one `train.optimizer`
named "model" over all parameters. Each has the run's LR schedule. Across workers this is data
parallel like DDP: `ctx.optimize` averages the sub-module's gradients over the workers before
stepping (no DDP wrapper: several forward passes of one sub-module per step, as a GAN makes,
would trip DDP's reducer). Buffers (BatchNorm statistics) stay per worker; checkpoints hold
rank 0's.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import inspect
import io
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from orchestrator.import_path import ImportPathError, import_function
from orchestrator.models import DataInfo, ModelError, build_model
from orchestrator.spec import ModelSpec, OptimizerSpec, TrainSpec
from orchestrator.tracking.protocol import ARTIFACTS
from orchestrator.train.checkpoint import CheckpointMismatch
from orchestrator.train.engines import lr_lambda, make_optimizer
from orchestrator.train.session import Session, step_dir_name

__all__ = [
    "DEFAULT_OPTIMIZER",
    "StepContext",
    "StepEngine",
    "StepError",
    "StepPlugin",
    "check_optimizers",
    "load_step",
    "optimized_modules",
]

DEFAULT_OPTIMIZER = "model"  # the one optimizer's name without train.optimizers

Batch = tuple[torch.Tensor, torch.Tensor]
# What the loop reports itself; a step's metric of the same name would hide it.
_RESERVED = {"step", "epoch", "total_steps", "samples_per_s", "step_time_s", ARTIFACTS}


class StepError(ModelError):
    """A custom step that cannot run as specified (found on the driver or at a worker's start)."""


@dataclass(frozen=True)
class StepPlugin:
    """The step function and the optional hooks beside it in its module."""

    step: Callable[[StepContext, Batch], Mapping[str, Any]]
    evaluate: Callable[[StepContext, Iterable[Batch]], Mapping[str, Any]] | None
    sample_images: Callable[[StepContext], torch.Tensor] | None


# (hook name, arguments it is called with) — checked before training starts.
_SHAPES = {"step": ("ctx", "batch"), "evaluate": ("ctx", "batches"), "sample_images": ("ctx",)}


def load_step(path: str) -> StepPlugin:
    """Import the step `train.step` names and its hooks, and check that each takes what orch
    passes it; StepError names the field and the fix."""
    try:
        step = import_function(path, "train.step")
    except ImportPathError as exc:
        raise StepError(str(exc)) from None
    module = importlib.import_module(path.partition(":")[0])
    hooks = {"step": step} | {
        name: getattr(module, name)
        for name in ("evaluate", "sample_images")
        if hasattr(module, name)
    }
    for name, function in hooks.items():
        wanted = _SHAPES[name]
        if not _accepts(function, len(wanted)):
            where = path if name == "step" else f"{path.partition(':')[0]}:{name}"
            raise StepError(
                f"train.step: {where} takes {_shown(function)}, but orch calls it as "
                f"{name}({', '.join(wanted)}); give it exactly those parameters"
            )
    return StepPlugin(step, hooks.get("evaluate"), hooks.get("sample_images"))


def _accepts(function: Callable[..., Any], count: int) -> bool:
    try:
        inspect.signature(function).bind(*range(count))
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): let the call tell
        return True
    return True


def _shown(function: Callable[..., Any]) -> str:
    try:
        return str(inspect.signature(function))
    except ValueError:
        return "(...)"


def optimized_modules(
    model: nn.Module, train: TrainSpec
) -> dict[str, tuple[OptimizerSpec, nn.Module]]:
    """Optimizer name -> (its spec, the sub-module it updates); StepError for a name the model
    has no sub-module of."""
    if train.optimizers is None:
        return {DEFAULT_OPTIMIZER: (train.optimizer, model)}
    children = dict(model.named_children())
    for name in train.optimizers:
        if name not in children:
            have = ", ".join(children) or "none"
            raise StepError(
                f"train.optimizers.{name}: the model has no sub-module {name!r}; its "
                f"sub-modules (model.named_children()): {have}"
            )
    return {name: (spec, children[name]) for name, spec in train.optimizers.items()}


def check_optimizers(model: ModelSpec, train: TrainSpec, info: DataInfo) -> None:
    """On the driver, before training: StepError for train.optimizers naming a sub-module the
    model lacks (the model is built on the meta device: no memory, no weights)."""
    if train.optimizers is None:
        return
    with torch.device("meta"):
        built = build_model(model, info)
    optimized_modules(built, train)


@dataclass
class StepContext:
    """What a custom step works with; one per worker, the same object at every call."""

    model: nn.Module  # the whole model (on `device`)
    modules: dict[str, nn.Module]  # its named sub-modules, model.named_children()
    optimizers: dict[str, torch.optim.Optimizer]  # by name: train.optimizers' keys, or "model"
    device: torch.device
    dtype: torch.dtype  # what the inputs are cast to
    rank: int
    world: int
    total_steps: int
    step: int = 0  # optimizer steps done before this call
    boundary: bool = True  # the last micro batch of a gradient accumulation: optimizers step
    generator: torch.Generator = field(default_factory=torch.Generator)  # seeded per rank, step
    # Set by StepEngine: how ctx.optimize backpropagates and steps.
    _optimize: Callable[[str, torch.Tensor], None] = field(default=lambda name, loss: None)
    _autocast: Callable[[], contextlib.AbstractContextManager[Any]] = field(
        default=contextlib.nullcontext
    )

    def optimize(self, name: str, loss: torch.Tensor) -> None:
        """Backpropagate `loss` into the parameters of optimizer `name`'s sub-module only, and at
        an accumulation boundary average their gradients over the workers, clip them
        (train.grad_clip), step that optimizer and its LR schedule, and zero them."""
        self._optimize(name, loss)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward-pass context of train.precision (bf16 autocast, or nothing for fp32)."""
        return self._autocast()

    def noise(self, *shape: int) -> torch.Tensor:
        """Standard normal noise of `shape` on the device, from the seeded generator."""
        return torch.randn(*shape, generator=self.generator).to(self.device)


class StepEngine:
    """The engine of a custom step: named optimizers, gradients averaged over the workers.

    Offers the loop what the other engines do (device, input dtype, save/load, lr) and runs the
    step (`run`), its evaluation and its images (`report`).
    """

    def __init__(
        self, model: nn.Module, train: TrainSpec, session: Session, accum: int, total_steps: int
    ):
        assert train.step is not None  # make_engine builds this engine only for a custom step
        self.plugin = load_step(train.step)
        self.device = session.device
        self.input_dtype = torch.float32
        self.module = self.model = model.to(self.device)
        groups = optimized_modules(model, train)
        self.params = {
            n: [p for p in m.parameters() if p.requires_grad] for n, (_, m) in groups.items()
        }
        self.optimizers = {n: make_optimizer(spec, m) for n, (spec, m) in groups.items()}
        self.schedulers = {
            n: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(train.scheduler, total_steps))
            for n, o in self.optimizers.items()
        }
        self.train, self.accum, self.micro = train, accum, 0
        self.ctx = StepContext(
            model=model,
            modules=dict(model.named_children()),
            optimizers=self.optimizers,
            device=self.device,
            dtype=self.input_dtype,
            rank=session.rank,
            world=session.world,
            total_steps=total_steps,
            _optimize=self._optimize,
            _autocast=self.forward_context,
        )
        self._seed()
        self.sums: dict[str, float] = {}
        self.calls = 0

    def _seed(self) -> None:
        # Another stream on each rank, and after a resume not the one the first steps drew.
        self.ctx.generator.manual_seed(self.train.seed * 1000 + self.ctx.rank + self.ctx.step)

    # ---------------------------------------------------------------- training
    def run(self, batch: Batch) -> bool:
        """One micro batch through the step; True when the optimizers stepped (a boundary)."""
        self.micro += 1
        self.ctx.boundary = self.micro % self.accum == 0
        metrics = self.plugin.step(self.ctx, batch)
        self._add(metrics)
        if self.ctx.boundary:
            self.ctx.step += 1
        return self.ctx.boundary

    def _add(self, metrics: Mapping[str, Any]) -> None:
        if not isinstance(metrics, Mapping):
            raise StepError(
                f"train.step: {self.train.step} returned {type(metrics).__name__}; "
                "return a dict of metric name -> number"
            )
        if clash := sorted(_RESERVED & set(metrics)):
            raise StepError(f"train.step: {self.train.step} returned {clash}, names orch reports")
        if self.calls and set(metrics) != set(self.sums):
            raise StepError(
                f"train.step: {self.train.step} returned {sorted(metrics)} after "
                f"{sorted(self.sums)}; return the same metrics at every call"
            )
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.calls += 1

    def _optimize(self, name: str, loss: torch.Tensor) -> None:
        if name not in self.optimizers:
            raise StepError(
                f"train.step: ctx.optimize({name!r}) names no optimizer; this run has "
                f"{', '.join(self.optimizers)} (train.optimizers)"
            )
        params = self.params[name]
        # inputs=: the other sub-modules get no gradient from this loss (a generator's loss
        # runs through the discriminator, whose own step must not see it).
        torch.autograd.backward(loss / self.accum, inputs=params)
        if not self.ctx.boundary:
            return
        _average_gradients(params, self.ctx.world)
        if self.train.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, self.train.grad_clip)
        self.optimizers[name].step()
        self.schedulers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)

    def forward_context(self) -> contextlib.AbstractContextManager[Any]:
        if self.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def lr(self) -> float:
        return float(next(iter(self.schedulers.values())).get_last_lr()[0])

    def train_mode(self, on: bool) -> None:
        self.module.train(on)

    # ---------------------------------------------------------------- reports
    def report(
        self, metrics: dict[str, Any], eval_batches: Iterable[Batch] | None
    ) -> dict[str, Any]:
        """The loop's report with the step's metrics (averaged over micro batches and workers)
        in place of the built-in loss; with eval batches, the evaluation's too, and images."""
        out = {k: v for k, v in metrics.items() if k != "loss"}
        out |= {f"lr_{n}": float(s.get_last_lr()[0]) for n, s in self.schedulers.items()}
        out |= _mean_over_workers({k: v / max(1, self.calls) for k, v in self.sums.items()})
        self.sums, self.calls = {}, 0
        if eval_batches is None:
            return out
        with self._evaluating():
            if self.plugin.evaluate is not None:
                out |= _mean_over_workers(
                    {k: float(v) for k, v in self.plugin.evaluate(self.ctx, eval_batches).items()}
                )
            if self.plugin.sample_images is not None and self.ctx.rank == 0:
                png = _grid_png(self.plugin.sample_images(self.ctx))
                out[ARTIFACTS] = {f"samples/{step_dir_name(self.ctx.step)}.png": png}
        return out

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        self.train_mode(False)
        try:
            with torch.no_grad(), self.forward_context():
                yield
        finally:
            self.train_mode(True)

    # ---------------------------------------------------------------- checkpoints
    def save(self, directory: str, rank: int) -> None:
        if rank == 0:
            torch.save(
                {
                    "model": self.module.state_dict(),  # what export_model reads
                    "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                    "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
                    "step": self.ctx.step,
                },
                os.path.join(directory, "state.pt"),
            )

    def load(self, directory: str) -> None:
        state = torch.load(os.path.join(directory, "state.pt"), map_location=self.device)
        saved = sorted(state.get("optimizers", {}))
        if saved != sorted(self.optimizers):
            raise CheckpointMismatch(
                f"checkpoint {directory} holds the optimizers {saved or 'of the built-in step'}, "
                f"this run has {sorted(self.optimizers)} (train.optimizers); start a fresh run "
                "with another name (--name) or remove that run's directory"
            )
        self.module.load_state_dict(state["model"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
            self.schedulers[name].load_state_dict(state["schedulers"][name])
        self.ctx.step = int(state["step"])
        self._seed()


def _distributed(world: int) -> bool:
    return world > 1 and dist.is_available() and dist.is_initialized()


def _average_gradients(params: list[nn.Parameter], world: int) -> None:
    """Average the gradients over the workers in one collective (what DDP's reducer does)."""
    if not _distributed(world) or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def _mean_over_workers(values: dict[str, float]) -> dict[str, float]:
    if not values or not (dist.is_available() and dist.is_initialized()):
        return values
    world = dist.get_world_size()
    if world == 1:
        return values
    names = sorted(values)
    tensor = torch.tensor([values[n] for n in names], dtype=torch.float64)
    if dist.get_backend() == "nccl":  # NCCL's collectives take CUDA tensors only
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return {n: v / world for n, v in zip(names, tensor.tolist(), strict=True)}


def _grid_png(images: torch.Tensor) -> str:
    """Images (N, C, H, W) in [0, 1] as one grid PNG, base64 (a report carries text only)."""
    from torchvision.utils import save_image

    buffer = io.BytesIO()
    save_image(images.detach().float().clamp(0, 1).cpu(), buffer, format="png", nrow=8)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
