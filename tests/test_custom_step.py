"""The custom training step plug-in (`train.step`): spec checks, bad input through the CLI (exit
2, before training), and the step's contract on a tiny model with real torch."""

from __future__ import annotations

import base64
import io
import textwrap
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import LOCAL, ROOT
from torch import nn
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.spec import TrainSpec
from orchestrator.tracking.protocol import ARTIFACTS
from orchestrator.train.checkpoint import CheckpointMismatch
from orchestrator.train.custom_step import StepEngine, StepError, load_step

MINIMAL = "name: t\nmodel: {kind: cnn}\ndata: {train: data/}\n"
GAN = LOCAL / "mnist_gan.yaml"

# (id, file text, expected fragments of `orch validate`'s error output)
SPEC_CASES = [
    (
        "optimizers-without-step",
        MINIMAL + "train: {optimizers: {generator: {lr: 0.1}}}\n",
        ["bad.yaml:4", "train.optimizers", "train.step", "built-in step"],
    ),
    (
        "step-with-deepspeed",
        MINIMAL + "train: {step: 'm:f'}\ndeepspeed: {zero_stage: 2}\n",
        ["deepspeed", "plain DDP only", "train.step"],
    ),
    (
        "step-with-fp16",
        MINIMAL + "train: {step: 'm:f', precision: fp16}\nscaling: {use_gpu: true}\n",
        ["train.precision", "fp32 or bf16"],
    ),
    ("step-not-a-path", MINIMAL + "train: {step: not a path}\n", ["train.step", "pattern"]),
    (
        "optimizer-spec-checked",
        MINIMAL + "train: {step: 'm:f', optimizers: {generator: {name: adam}}}\n",
        ["train.optimizers.generator.name", "'adamw' or 'sgd'"],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES]
)
def test_spec_refuses_what_a_custom_step_cannot_run(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2, result.output
    for fragment in expected:
        assert fragment in result.output, (fragment, result.output)


def test_shipped_gan_workload_validates_and_sweeps_a_generator_lr(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(GAN)])
    assert result.exit_code == 0, result.output
    # A sweep over one optimizer's lr, on the step's own metric (only it knows its metrics).
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        f"extends: {GAN}\ntune:\n  metric: eval_d_accuracy\n  mode: min\n  num_samples: 2\n"
        "  space: {train.optimizers.generator.lr: {loguniform: [1.0e-4, 1.0e-3]}}\n"
    )
    assert CliRunner().invoke(app, ["validate", str(sweep)]).exit_code == 0
    sweep.write_text(
        f"extends: {GAN}\ntune:\n  space: {{train.optimizers.critic.lr: {{choice: [0.1]}}}}\n"
    )
    result = CliRunner().invoke(app, ["validate", str(sweep)])
    assert result.exit_code == 2 and "tune.space.train.optimizers.critic.lr" in result.output


def _module(directory: Path, text: str) -> str:
    """Write a module of steps under `directory` (the directory orch runs from); its name."""
    name = f"steps_{uuid.uuid4().hex[:8]}"
    (directory / f"{name}.py").write_text(textwrap.dedent(text))
    return name


RUN_CASES = [
    (
        "step-module-missing",
        "workloads.gan.nothing_here:train_step",
        [],
        ["train.step", "cannot import module 'workloads.gan.nothing_here'", "directory orch runs"],
    ),
    (
        "step-function-missing",
        "workloads.gan.dcgan:no_step",
        [],
        ["train.step", "module 'workloads.gan.dcgan' has no function 'no_step'"],
    ),
    (
        "optimizer-of-no-sub-module",
        "workloads.gan.dcgan:train_step",
        ["train.optimizers.critic={lr: 1.0e-4}"],
        [
            "train.optimizers.critic",
            "no sub-module 'critic'",
            "generator, discriminator",
        ],
    ),
]


@pytest.mark.parametrize(
    ("step", "sets", "expected"), [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES]
)
def test_run_refuses_a_step_that_cannot_run_before_ray(
    monkeypatch: pytest.MonkeyPatch, step: str, sets: list[str], expected: list[str]
) -> None:
    monkeypatch.chdir(ROOT)  # workloads.* resolve from where orch runs
    args = ["run", str(GAN), "--set", f"train.step={step}", "--no-tracking"]
    for item in sets:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    for fragment in expected:
        assert fragment in result.output, (fragment, result.output)
    assert "training mnist-gan" not in result.output  # refused before anything started


def test_run_refuses_a_step_with_the_wrong_signature(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(tmp_path))
    name = _module(tmp_path, "def step(ctx):\n    return {}\n")
    result = CliRunner().invoke(
        app, ["run", str(GAN), "--set", f"train.step={name}:step", "--no-tracking"]
    )
    assert result.exit_code == 2, result.output
    assert f"train.step: {name}:step takes (ctx)" in result.output
    assert "step(ctx, batch)" in result.output
    other = _module(
        tmp_path,
        """
        def step(ctx, batch):
            return {}

        def evaluate(ctx):
            return {}
        """,
    )
    with pytest.raises(
        StepError, match=rf"{other}:evaluate takes \(ctx\).*evaluate\(ctx, batches\)"
    ):
        load_step(f"{other}:step")


# ---------------------------------------------------------------- the contract, in torch


@dataclass
class _Here:
    """Where the engine runs: one CPU worker (the loop's Session, without Ray)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model


class _Pair(nn.Module):
    """Two named sub-modules; `b` reads `a`'s output, as a GAN's generator feeds its critic."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 1)


STEPS = """
import torch

def step(ctx, batch):
    x, _ = batch
    a, b = ctx.modules["a"], ctx.modules["b"]
    out = a(x)
    loss_a = (out - 1).pow(2).mean()
    ctx.optimize("a", loss_a)
    loss_b = b(out).pow(2).mean()  # runs through a: only b may get its gradient
    ctx.optimize("b", loss_b)
    return {"loss_a": loss_a.item(), "loss_b": loss_b.item(), "calls": 1.0}

def evaluate(ctx, batches):
    return {"eval_seen": float(sum(len(x) for x, _ in batches))}

def sample_images(ctx):
    return torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(0))
"""


def _engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accum: int = 1, **train: Any
) -> StepEngine:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = _module(tmp_path, STEPS)
    spec = TrainSpec(
        step=f"{name}:step",
        optimizers={
            "a": {"lr": 0.1, "name": "sgd", "momentum": 0.0, "weight_decay": 0.0},
            "b": {"lr": 0.01},
        },
        grad_clip=None,
        scheduler={"name": "constant"},
        **train,
    )
    torch.manual_seed(0)
    return StepEngine(_Pair(), spec, _Here(), accum, total_steps=10)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(seed)), torch.zeros(4)


def test_each_optimizer_steps_its_own_sub_module_at_accumulation_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(tmp_path, monkeypatch, accum=2)
    a0 = engine.module.a.weight.detach().clone()
    b0 = engine.module.b.weight.detach().clone()
    assert engine.run(_batch(0)) is False  # the first of two micro batches: no step yet
    assert torch.equal(engine.module.a.weight, a0) and torch.equal(engine.module.b.weight, b0)
    assert engine.run(_batch(1)) is True
    assert engine.ctx.step == 1
    # a moved by plain SGD on loss_a alone: loss_b's gradient never reached it.
    torch.manual_seed(0)
    twin = _Pair()  # the engine's model as it was built
    for seed in (0, 1):
        ((twin.a(_batch(seed)[0]) - 1).pow(2).mean() / 2).backward()
    assert twin.a.weight.grad is not None
    assert torch.allclose(engine.module.a.weight, a0 - 0.1 * twin.a.weight.grad, atol=1e-6)
    assert not torch.equal(engine.module.b.weight, b0)
    # Metrics: averaged over the micro batches since the last report; lr per optimizer.
    report = engine.report({"step": 1, "loss": 0.0}, None)
    assert report["calls"] == 1.0 and "loss" not in report
    assert report["lr_a"] == pytest.approx(0.1) and report["lr_b"] == pytest.approx(0.01)
    assert ARTIFACTS not in report  # images come with evaluations only


def test_evaluation_and_samples_come_with_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    engine = _engine(tmp_path, monkeypatch)
    engine.run(_batch(0))
    report = engine.report({"step": 1}, iter([_batch(2), _batch(3)]))
    assert report["eval_seen"] == 8.0
    assert engine.module.training  # back in training mode after the evaluation
    (path, encoded), *others = report[ARTIFACTS].items()
    assert path == "samples/step-00000001.png" and not others
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert image.format == "PNG" and image.size == (8 * 6 + 2, 2 * 6 + 2)  # 8 x 2 grid of 4x4


def test_checkpoint_holds_every_optimizer_and_resumes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(tmp_path, monkeypatch)
    for seed in range(3):
        engine.run(_batch(seed))
    saved = tmp_path / "ckpt"
    saved.mkdir()
    engine.save(str(saved), rank=0)
    again = _engine(tmp_path, monkeypatch)
    again.load(str(saved))
    assert again.ctx.step == 3
    for name in ("a", "b"):
        torch.testing.assert_close(
            again.optimizers[name].state_dict()["state"],
            engine.optimizers[name].state_dict()["state"],
        )
    assert again.optimizers["b"].state_dict()["state"][0]["step"].item() == 3  # Adam's count
    engine.run(_batch(9))
    again.run(_batch(9))
    assert torch.equal(engine.module.b.weight, again.module.b.weight)  # continues alike
    # A checkpoint of other optimizers is refused, with the reason and the fix.
    monkeypatch.syspath_prepend(str(tmp_path))
    other = TrainSpec(step=again.train.step, optimizers={"a": {"lr": 0.1}})
    single = StepEngine(_Pair(), other, _Here(), 1, total_steps=10)
    with pytest.raises(CheckpointMismatch, match=r"optimizers \['a', 'b'\].*this run has \['a'\]"):
        single.load(str(saved))


def test_step_mistakes_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    bad = _module(
        tmp_path,
        """
        def unknown(ctx, batch):
            ctx.optimize("critic", batch[0].sum())
            return {}

        def reserved(ctx, batch):
            return {"step": 1.0}

        def not_a_dict(ctx, batch):
            return 1.0
        """,
    )
    cases = [
        ("unknown", r"ctx.optimize\('critic'\) names no optimizer; this run has a, b"),
        ("reserved", r"returned \['step'\], names orch reports"),
        ("not_a_dict", r"returned float; return a dict"),
    ]
    for function, message in cases:
        spec = TrainSpec(step=f"{bad}:{function}", optimizers={"a": {}, "b": {}})
        engine = StepEngine(_Pair(), spec, _Here(), 1, total_steps=2)
        with pytest.raises(StepError, match=message):
            engine.run(_batch(0))
