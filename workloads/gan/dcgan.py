"""A DCGAN on 28x28 grayscale digits, trained through orch's custom step plug-in.

The workload names the pieces by import path (resolved from the project root, where orch
runs):

    model: {kind: custom, build: "workloads.gan.dcgan:build", args: {latent_dim: 32}}
    train:
      step: workloads.gan.dcgan:train_step
      optimizers: {generator: {...}, discriminator: {...}}

`train_step` is the step (see orchestrator.train.custom_step for the contract); `evaluate` and
`sample_images`, found beside it, give the evaluation's metrics and the grid of digits that
orch logs to MLflow at every evaluation. Small enough for a CPU: 70k parameters at width 16
(the laptop workload's), 174k at the default 32.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DCGAN", "build", "evaluate", "sample_images", "train_step"]

REAL_LABEL = 0.9  # one-sided label smoothing: keeps the discriminator from certainty
# MNIST's mean pixel, 0.13 in [0, 1], as the generator's tanh output bias: its first fakes
# then differ from digits by their strokes, not by a grey background the discriminator learns
# to spot in a few steps.
MEAN_PIXEL_BIAS = -0.95  # atanh(2 * 0.13 - 1)
SAMPLES = 64  # digits in the logged grid (8 x 8)


class DCGAN(nn.Module):
    """The two sub-modules the optimizers are named after: `generator` and `discriminator`.

    Its forward scores images as real (logits): what an exported model is for here.
    """

    def __init__(self, latent_dim: int = 32, width: int = 32, channels: int = 1):
        super().__init__()
        self.latent_dim = latent_dim
        self.generator = nn.Sequential(
            nn.Linear(latent_dim, 2 * width * 7 * 7),
            nn.Unflatten(1, (2 * width, 7, 7)),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),  # 14x14
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1),  # 28x28
            nn.Tanh(),
        )
        self.discriminator = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1),  # 14x14
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),  # 7x7
            nn.LeakyReLU(0.2),
            nn.Dropout(0.3),
            nn.AdaptiveAvgPool2d(7),  # other image sizes too (an input example of 32x32)
            nn.Flatten(),
            nn.Linear(2 * width * 7 * 7, 1),
        )
        for module in self.modules():  # DCGAN's initialization
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        nn.init.constant_(self.generator[-2].bias, MEAN_PIXEL_BIAS)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.discriminator(images * 2 - 1)


def build(latent_dim: int = 32, width: int = 32, channels: int = 1) -> DCGAN:
    """The `custom` model kind's builder (model.args are its keywords)."""
    return DCGAN(latent_dim, width, channels)


def train_step(ctx: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """One discriminator update, then one generator update, on a batch of real digits."""
    generator, discriminator = ctx.modules["generator"], ctx.modules["discriminator"]
    real = batch[0] * 2 - 1  # orch's images are in [0, 1]; the generator's tanh gives [-1, 1]
    fake = generator(ctx.noise(len(real), ctx.model.latent_dim))
    with ctx.autocast():
        on_real, on_fake = discriminator(real).float(), discriminator(fake.detach()).float()
    d_loss = _bce(on_real, REAL_LABEL) + _bce(on_fake, 0.0)
    ctx.optimize("discriminator", d_loss)
    with ctx.autocast():
        fooled = discriminator(fake).float()
    g_loss = _bce(fooled, 1.0)  # the non-saturating generator loss
    ctx.optimize("generator", g_loss)
    return {
        "d_loss": d_loss.item(),
        "g_loss": g_loss.item(),
        "d_accuracy": _accuracy(on_real, on_fake),
    }


def evaluate(ctx: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """The discriminator on held-out real digits against as many fresh fakes."""
    generator, discriminator = ctx.modules["generator"], ctx.modules["discriminator"]
    noise = torch.Generator().manual_seed(ctx.rank)  # the same fakes at every evaluation
    correct = seen = 0.0
    for images, _ in batches:
        z = torch.randn(len(images), ctx.model.latent_dim, generator=noise).to(ctx.device)
        on_real, on_fake = discriminator(images * 2 - 1), discriminator(generator(z))
        correct += _accuracy(on_real, on_fake) * 2 * len(images)
        seen += 2 * len(images)
    return {"eval_d_accuracy": correct / seen} if seen else {}


def sample_images(ctx: Any) -> torch.Tensor:
    """The same 64 latent points at every evaluation, as digits in [0, 1]."""
    generator = ctx.modules["generator"]
    z = torch.randn(SAMPLES, ctx.model.latent_dim, generator=torch.Generator().manual_seed(0))
    return (generator(z.to(ctx.device)) + 1) / 2


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _accuracy(on_real: torch.Tensor, on_fake: torch.Tensor) -> float:
    """Share of real judged real and fake judged fake, over both halves."""
    return ((on_real > 0).float().mean() + (on_fake < 0).float().mean()).item() / 2
