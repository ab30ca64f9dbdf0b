"""Convolutional VAE (Kingma & Welling 2014), optionally class-conditional (Sohn et al. 2015).

Encoder and decoder follow the image resolution like the DCGAN: one stride-2 block per
doubling from 4x4. Conditioning: a class embedding joins the encoder's features before the
posterior head and is concatenated to the latent for the decoder. The loss is per-pixel
Bernoulli cross-entropy on [0, 1] images (sharper MNIST samples than a unit-variance MSE,
which weighs the KL term far more) plus `beta` x KL, the KL weight optionally ramped up
over `kl_warmup_steps` so the decoder learns to use the latent first.

The generator that is saved and registered is the decoder: sampling is decoder(z ~ N(0, I), y).
Adam uses `model.vae.lr` (train.lr when null) and train.beta1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from genloop.models.blocks import UpsamplingDecoder
from genloop.models.spec import GeneratorSpec

DEFAULTS: dict[str, Any] = {"latent_dim": 32, "width": 32, "beta": 1.0, "kl_warmup_steps": 200, "lr": 1e-3}


def _hp(spec: GeneratorSpec) -> dict[str, Any]:
    return {**DEFAULTS, **spec.hparams}


def latent_shape(spec: GeneratorSpec) -> tuple[int, ...]:
    return (_hp(spec)["latent_dim"],)


class Encoder(nn.Module):
    """q(z | x, y): conv features (+ class embedding) -> mean and log-variance of z."""

    def __init__(self, latent_dim: int, width: int, channels: int, resolution: int, num_classes: int):
        super().__init__()
        blocks = int(math.log2(resolution)) - 2
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = width
        for _ in range(blocks - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2, True)]
            ch *= 2
        self.body = nn.Sequential(*layers)
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        self.head = nn.Linear(ch * 4 * 4 + (latent_dim if num_classes else 0), 2 * latent_dim)
        # optimizer steps taken, for the KL warm-up; a buffer so checkpoints carry it
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x).flatten(1)
        if self.embed is not None:
            if y is None:
                raise ValueError("this encoder is class-conditional: pass class labels")
            h = torch.cat([h, self.embed(y).to(h.dtype)], dim=1)
        mu, logvar = self.head(h).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)


class Decoder(UpsamplingDecoder):
    """p(x | z, y): the shared upsampling decoder (DCGAN's generator shape)."""

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, logits: bool = False) -> torch.Tensor:
        """Images in [-1, 1]; with `logits=True` the Bernoulli logits of pixels in [0, 1]."""
        out = self.decode(z, y)
        # 2 * sigmoid(l) - 1 == tanh(l / 2): the mean image mapped to [-1, 1]
        return out if logits else torch.tanh(0.5 * out)


def build_generator(spec: GeneratorSpec) -> Decoder:
    hp = _hp(spec)
    return Decoder(hp["latent_dim"], hp["width"], spec.channels, spec.resolution, spec.num_classes)


class Trainer:
    """Maximises the (beta-weighted) evidence lower bound; `step` takes one real batch."""

    def __init__(self, spec: GeneratorSpec, lr: float, beta1: float, device: torch.device):
        hp = _hp(spec)
        self.spec = spec
        self.beta = float(hp["beta"])
        self.warmup = int(hp["kl_warmup_steps"])
        self.encoder = Encoder(hp["latent_dim"], hp["width"], spec.channels, spec.resolution, spec.num_classes)
        self.encoder = self.encoder.to(device)
        self.generator = build_generator(spec).to(device)
        params = [*self.encoder.parameters(), *self.generator.parameters()]
        self.opt = torch.optim.Adam(params, lr=hp["lr"] or lr, betas=(beta1, 0.999))

    def modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "generator": self.generator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"opt": self.opt}

    def _kl_weight(self) -> torch.Tensor:
        steps = self._steps().float()
        ramp = (steps / self.warmup).clamp(max=1.0) if self.warmup else torch.ones_like(steps)
        return self.beta * ramp

    def _steps(self) -> torch.Tensor:
        return getattr(self.encoder, "module", self.encoder).steps  # through a DDP wrapper too

    def step(self, real: torch.Tensor, labels: torch.Tensor | None, autocast: Any) -> dict[str, torch.Tensor]:
        """One update of encoder and decoder on the negative ELBO; returns detached losses."""
        with autocast():
            mu, logvar = self.encoder(real, labels)
            mu, logvar = mu.float(), logvar.float()
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            logits = self.generator(z, labels, logits=True)
        target = (real.float() + 1) * 0.5
        recon = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").flatten(1).sum(1).mean()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
        weight = self._kl_weight()
        loss = recon + weight * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self._steps().add_(1)
        return {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach(), "kl_weight": weight.detach()}
