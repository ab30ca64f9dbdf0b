"""DCGAN (Radford et al. 2015), optionally class-conditional.

Conditioning: the generator concatenates a class embedding to the latent; the
discriminator uses a projection head (Miyato & Koyama 2018). Layers follow the image
resolution: one stride-2 block per doubling from 4x4.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from genloop.models.blocks import UpsamplingDecoder
from genloop.models.spec import GeneratorSpec

DEFAULTS = {"latent_dim": 64, "g_width": 32, "d_width": 32}


def _hp(spec: GeneratorSpec) -> dict[str, Any]:
    return {**DEFAULTS, **spec.hparams}


def latent_shape(spec: GeneratorSpec) -> tuple[int, ...]:
    return (_hp(spec)["latent_dim"],)


class Generator(UpsamplingDecoder):
    """The DCGAN generator: the shared upsampling decoder with a tanh output in [-1, 1]."""

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(self.decode(z, y))


class Discriminator(nn.Module):
    """Spectrally normalised (Miyato et al. 2018) conv net with a projection head."""

    def __init__(self, width: int, channels: int, resolution: int, num_classes: int):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        blocks = int(math.log2(resolution)) - 2
        layers: list[nn.Module] = [sn(nn.Conv2d(channels, width, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
        ch = width
        for _ in range(blocks - 1):
            layers += [sn(nn.Conv2d(ch, ch * 2, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
            ch *= 2
        self.body = nn.Sequential(*layers)
        feat = (ch + 1) * 4 * 4
        self.head = sn(nn.Linear(feat, 1))
        self.embed = sn(nn.Embedding(num_classes, feat)) if num_classes else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(x)
        # minibatch standard deviation (Karras et al. 2018): lets D see a collapsed batch
        spread = h.float().std(dim=0, unbiased=False).mean().to(h.dtype)
        h = torch.cat([h, spread.expand(h.shape[0], 1, *h.shape[2:])], dim=1).flatten(1)
        out = self.head(h).squeeze(1)
        if self.embed is not None and y is not None:
            out = out + (self.embed(y) * h).sum(dim=1)
        return out


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, 0.0, 0.02)


def build_generator(spec: GeneratorSpec) -> Generator:
    hp = _hp(spec)
    return Generator(hp["latent_dim"], hp["g_width"], spec.channels, spec.resolution, spec.num_classes)


class Trainer:
    """Adversarial training with the non-saturating loss; `step` takes one real batch."""

    def __init__(self, spec: GeneratorSpec, lr: float, beta1: float, device: torch.device):
        hp = _hp(spec)
        self.spec = spec
        self.latent_dim = hp["latent_dim"]
        self.generator = build_generator(spec).to(device)
        self.discriminator = Discriminator(hp["d_width"], spec.channels, spec.resolution, spec.num_classes).to(device)
        self.generator.apply(_init)
        self.discriminator.apply(_init)
        if self.generator.embed is not None:  # the class code should weigh like the latent
            nn.init.normal_(self.generator.embed.weight, 0.0, 1.0)
        betas = (beta1, 0.999)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=betas)

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"opt_g": self.opt_g, "opt_d": self.opt_d}

    def step(self, real: torch.Tensor, labels: torch.Tensor | None, autocast: Any) -> dict[str, torch.Tensor]:
        """One discriminator and one generator update; returns detached losses."""
        n = real.shape[0]
        z = torch.randn(n, self.latent_dim, device=real.device)
        with autocast():
            fake = self.generator(z, labels)
            d_real = self.discriminator(real, labels)
            d_fake = self.discriminator(fake.detach(), labels)
            loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        with autocast():
            loss_g = F.softplus(-self.discriminator(fake, labels)).mean()
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        return {
            "loss_d": loss_d.detach(),
            "loss_g": loss_g.detach(),
            "d_real": torch.sigmoid(d_real.detach().float()).mean(),
            "d_fake": torch.sigmoid(d_fake.detach().float()).mean(),
        }
