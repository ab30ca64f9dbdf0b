"""Differentiable augmentation of the discriminator's inputs (DiffAugment, Zhao et al. 2020).

A GAN trained on a few thousand images lets its discriminator memorise the real set; its
gradients then stop telling the generator anything useful and the generator collapses.
DiffAugment applies the same random transformations to real AND generated images before
every discriminator call, in both players' updates, with ops that gradients flow through,
so the generator still learns the un-augmented distribution.

Hand-written rather than a dependency: DiffAugment is a handful of tensor ops, and it is not
packaged as a maintained PyPI library (the authors publish a reference script; kornia's
augmentations are differentiable but not this policy, and pulling kornia in for three ops is
not worth it).

Ops, on images in [-1, 1] (a policy is a comma-separated list of them):

- `colour`: brightness (add U(-0.5, 0.5)), saturation (scale the distance to the per-pixel
  channel mean by U(0, 2); RGB only: a grey image has no saturation and is left alone) and
  contrast (scale the distance to the image mean by U(0.5, 1.5));
- `translation`: shift by up to 1/8 of the side in each direction, filling with -1 (black);
- `cutout`: set a random square of half the side to 0 (mid-grey), anywhere it fits partly.

Each op hits each image with probability `p` (1: always, as in DiffAugment; below 1 for an
ADA-style schedule).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from genloop.core.config import DIFFAUGMENT_OPS
from genloop.core.errors import GenloopError

Op = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]

TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def _device(x: torch.Tensor, rng: torch.Generator | None) -> torch.device:
    """Where to draw: on `rng`'s device when one is given (a CPU generator can feed GPU images)."""
    return rng.device if rng is not None else x.device


def _uniform(x: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    """One U(0, 1) draw per image, shaped to broadcast over C x H x W."""
    u = torch.rand(x.shape[0], 1, 1, 1, generator=rng, device=_device(x, rng))
    return u.to(device=x.device, dtype=x.dtype)


def _randint(low: int, high: int, x: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    """One integer in [low, high) per image, shaped n x 1 x 1."""
    return torch.randint(low, high, (x.shape[0], 1, 1), generator=rng, device=_device(x, rng)).to(x.device)


def _colour(x: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    x = x + (_uniform(x, rng) - 0.5)  # brightness
    if x.shape[1] == 3:  # saturation: only where there is colour
        grey = x.mean(dim=1, keepdim=True)
        x = (x - grey) * (_uniform(x, rng) * 2) + grey
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # contrast
    return (x - mean) * (_uniform(x, rng) + 0.5) + mean


def _grid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices, shaped 1 x H x 1 and 1 x 1 x W."""
    h, w = x.shape[-2:]
    return torch.arange(h, device=x.device)[None, :, None], torch.arange(w, device=x.device)[None, None, :]


def _translation(x: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    n, c, h, w = x.shape
    most_h, most_w = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
    rows, cols = _grid(x)
    rows = rows - _randint(-most_h, most_h + 1, x, rng)  # the source row of each output row
    cols = cols - _randint(-most_w, most_w + 1, x, rng)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # n x h x w
    index = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).flatten(1)  # n x (h*w)
    moved = x.flatten(2).gather(2, index[:, None, :].expand(n, c, h * w)).view_as(x)
    return torch.where(inside[:, None], moved, torch.full_like(moved, -1.0))


def _cutout(x: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    h, w = x.shape[-2:]
    size_h, size_w = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    # the square's centre is anywhere on the image, so it may hang over an edge (as in DiffAugment)
    top = _randint(0, h, x, rng) - size_h // 2
    left = _randint(0, w, x, rng) - size_w // 2
    rows, cols = _grid(x)
    hole = (rows >= top) & (rows < top + size_h) & (cols >= left) & (cols < left + size_w)
    return x * (~hole[:, None]).to(x.dtype)


# the op names params.yaml accepts (validated there), each with its function
OPS: dict[str, Op] = dict(zip(DIFFAUGMENT_OPS, (_colour, _translation, _cutout), strict=True))


def parse_policy(policy: str) -> tuple[str, ...]:
    """The ops of a comma-separated policy as model.dcgan.augment holds it ('': none), in order."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise GenloopError(f"model.dcgan.augment={policy!r}: unknown op(s) {', '.join(unknown)}; "
                           f"use a comma-separated subset of {', '.join(OPS)} (or '' for none)")
    return names


def diff_augment(x: torch.Tensor, ops: tuple[str, ...], p: float = 1.0,
                 rng: torch.Generator | None = None) -> torch.Tensor:
    """`x` (N x C x H x W, in [-1, 1]) through each op of `ops`, each image hit with probability `p`.

    Differentiable in `x`: only arithmetic, gathers and masks; the randomness is drawn from
    `rng` (or torch's global generator)."""
    for name in ops:
        if p <= 0:
            break
        out = OPS[name](x, rng)
        if p < 1:
            out = torch.where(_uniform(x, rng) < p, out, x)
        x = out
    return x
