"""Self-supervised views and the SimCLR contrastive loss (NT-Xent) for the in-domain extractor.

The views must leave alone what the evaluation metrics have to detect: no blur, no pixel noise,
no JPEG, no colour or grey jitter, so that the features stay sensitive to those. A view is a
random resized crop sampled nearest-neighbour (no smoothing) and, half the time, a random
erased rectangle. Both run on a whole batch with a few tensor ops: torchvision (which has
RandomResizedCrop / RandomErasing) is not a genloop dependency, and its per-image transforms
would be slower on this batch size than these.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

CROP_SCALE = (0.6, 1.0)  # area of the crop, as a share of the image
CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratio of the crop
ERASE_P = 0.5  # share of views with an erased rectangle
ERASE_SCALE = (0.02, 0.15)  # its area, as a share of the image
ERASE_RATIO = (0.3, 3.3)
TEMPERATURE = 0.5  # SimCLR's value for small batches


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (high - low) + low


def _box(n: int, scale: tuple[float, float], ratio: tuple[float, float],
         gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Width and height (as shares of the image side) of n random boxes of the given area and aspect."""
    area = _uniform(n, *scale, gen)
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), gen))
    return (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)


def random_resized_crop(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image of a float NCHW batch cropped at random and resized back, nearest-neighbour."""
    n = len(x)
    w, h = _box(n, CROP_SCALE, CROP_RATIO, gen)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = w, h
    theta[:, 0, 2] = (1 - w) * _uniform(n, -1.0, 1.0, gen)  # the crop's centre, in [-1, 1] units
    theta[:, 1, 2] = (1 - h) * _uniform(n, -1.0, 1.0, gen)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)


def random_erase(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """ERASE_P of the images get one random rectangle set flat to the image's mean value."""
    n, _, side_h, side_w = x.shape
    w, h = _box(n, ERASE_SCALE, ERASE_RATIO, gen)
    x0, y0 = torch.rand(n, generator=gen) * (1 - w), torch.rand(n, generator=gen) * (1 - h)
    cols = (torch.arange(side_w) + 0.5) / side_w
    rows = (torch.arange(side_h) + 0.5) / side_h
    inside_x = (cols[None] >= x0[:, None]) & (cols[None] < (x0 + w)[:, None])
    inside_y = (rows[None] >= y0[:, None]) & (rows[None] < (y0 + h)[:, None])
    chosen = torch.rand(n, generator=gen) < ERASE_P
    mask = (inside_y[:, :, None] & inside_x[:, None, :] & chosen[:, None, None])[:, None].to(x.device)
    return torch.where(mask, x.mean(dim=(2, 3), keepdim=True), x)


def view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random view of each image of a float NCHW batch in [0, 1]."""
    return random_erase(random_resized_crop(x, gen), gen)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy: each view must pick its partner out of the
    other 2N - 2 views of the batch. Written here (a softmax over cosine similarities) rather than
    taken from lightly or pytorch-metric-learning: a dependency for six lines."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    n = len(z1)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, partner)
