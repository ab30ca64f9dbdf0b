"""Building blocks that more than one family uses."""

from __future__ import annotations

import math

import torch
from torch import nn


class UpsamplingDecoder(nn.Module):
    """Latent (+ class embedding) -> image logits, DCGAN-style (Radford et al. 2015).

    A 4x4 transposed-conv projection, then one stride-2 transposed-conv block per doubling up to
    the resolution; the last block has no norm or activation, so each family picks its own
    output mapping (DCGAN's tanh, the VAE's Bernoulli logits). Conditioning concatenates a class
    embedding to the latent.
    """

    def __init__(self, latent_dim: int, width: int, channels: int, resolution: int, num_classes: int):
        super().__init__()
        blocks = int(math.log2(resolution)) - 2
        top = width * 2 ** (blocks - 1)
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        in_dim = latent_dim * (2 if num_classes else 1)
        self.project = nn.Sequential(
            nn.ConvTranspose2d(in_dim, top, 4, 1, 0, bias=False), nn.BatchNorm2d(top), nn.ReLU(True)
        )
        layers: list[nn.Module] = []
        ch = top
        for _ in range(blocks - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1)]
        self.body = nn.Sequential(*layers)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Unbounded image logits for latents `z` (and class labels `y` when conditional)."""
        if self.embed is not None:
            if y is None:
                raise ValueError("this generator is class-conditional: pass class labels")
            z = torch.cat([z, self.embed(y).to(z.dtype)], dim=1)
        return self.body(self.project(z[:, :, None, None]))
