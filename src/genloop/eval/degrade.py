"""Controlled degradations of real images: the rungs of the calibration ladder.

Each function takes uint8 NCHW images and returns new uint8 NCHW images of the same shape.
Blur and JPEG use Pillow's own filters and codec (the ones users' images went through);
noise, the grey shift and mode dropping are a few tensor operations, so they are written here.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageFilter

# Each ladder goes from a light to a heavy degradation; its levels are in the ladder's unit.
LADDERS: dict[str, tuple[float, ...]] = {
    "blur": (0.5, 1.0, 2.0, 4.0),  # Gaussian blur radius, pixels at the data resolution
    "noise": (10.0, 20.0, 40.0, 80.0),  # sd of Gaussian pixel noise, 0-255 scale
    "jpeg": (50.0, 20.0, 10.0, 5.0),  # JPEG quality (lower is worse)
    "grey": (0.5, 1.0),  # share of the colour removed (RGB data only)
    "mode_drop": (0.5, 0.9),  # share of the images replaced by repeats of the others
}
FLOOR_LEVEL = {"blur": 0.0, "noise": 0.0, "jpeg": 100.0, "grey": 0.0, "mode_drop": 0.0}  # undegraded
UNITS = {"blur": "radius", "noise": "sd", "jpeg": "quality", "grey": "share", "mode_drop": "share"}
DESCRIBE = {
    "blur": "real images blurred with radius {level}",
    "noise": "real images with pixel noise of sd {level}",
    "jpeg": "real images saved as JPEG at quality {level}",
    "grey": "real images with {pct} of their colour removed",
    "mode_drop": "real images with {pct} of them replaced by repeats (modes dropped)",
}


def _per_image(images: torch.Tensor, fn: Callable[[Image.Image], Image.Image]) -> torch.Tensor:
    out = np.empty_like(images.numpy())
    for i, chw in enumerate(images.numpy()):
        pil = Image.fromarray(chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0))
        arr = np.asarray(fn(pil))
        out[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(out)


def blur(images: torch.Tensor, radius: float) -> torch.Tensor:
    """Gaussian blur of the given radius (Pillow's GaussianBlur)."""
    return _per_image(images, lambda im: im.filter(ImageFilter.GaussianBlur(radius)))


def jpeg(images: torch.Tensor, quality: float) -> torch.Tensor:
    """A round trip through Pillow's JPEG encoder at `quality`."""

    def roundtrip(im: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        return Image.open(buf).convert(im.mode)

    return _per_image(images, roundtrip)


# Noise and the grey shift work on this many images at a time: their float copies of 50k RGB
# 32-px images took about 2 GB at once (a 3.6 GB peak for a 50k-sample evaluate on 100k images).
BLOCK = 4096


def noise(images: torch.Tensor, sd: float, seed: int) -> torch.Tensor:
    """Additive Gaussian pixel noise of standard deviation `sd` (0-255 scale), clipped. The noise is
    drawn block by block from one generator: a set of at most BLOCK images gets one draw."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty_like(images)
    for i in range(0, len(images), BLOCK):
        block = images[i : i + BLOCK].float()
        block += sd * torch.randn(block.shape, generator=gen)
        out[i : i + BLOCK] = block.round_().clamp_(0, 255).to(torch.uint8)
    return out


def grey(images: torch.Tensor, share: float) -> torch.Tensor:
    """Move each pixel `share` of the way to its luminance (ITU-R 601, as Pillow's "L")."""
    if images.shape[1] != 3:
        return images.clone()
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    out = torch.empty_like(images)
    for i in range(0, len(images), BLOCK):
        x = images[i : i + BLOCK].float()
        luma = (x * weights).sum(dim=1, keepdim=True)
        out[i : i + BLOCK] = (x + share * (luma - x)).round().clamp(0, 255).to(torch.uint8)
    return out


def drop_modes(images: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """Keep (1 - share) of the images and fill the set back to its size with repeats of them."""
    gen = torch.Generator().manual_seed(seed)
    n = len(images)
    keep = max(1, round(n * (1 - share)))
    kept = torch.randperm(n, generator=gen)[:keep]
    return images[kept[torch.arange(n) % keep]].clone()


def apply(images: torch.Tensor, ladder: str, level: float, seed: int = 0) -> torch.Tensor:
    """`images` degraded by one rung of `ladder` (see LADDERS)."""
    if ladder == "blur":
        return blur(images, level)
    if ladder == "noise":
        return noise(images, level, seed)
    if ladder == "jpeg":
        return jpeg(images, level)
    if ladder == "grey":
        return grey(images, level)
    if ladder == "mode_drop":
        return drop_modes(images, level, seed)
    raise ValueError(f"unknown ladder {ladder!r}; ladders: {sorted(LADDERS)}")


def describe(ladder: str, level: float) -> str:
    """The rung in words, e.g. "real images blurred with radius 2"."""
    return DESCRIBE[ladder].format(level=f"{level:g}", pct=f"{level:.0%}")


def ladders_for(channels: int) -> dict[str, tuple[float, ...]]:
    """The ladders that apply to images with this many channels (no grey shift for grey data)."""
    return {k: v for k, v in LADDERS.items() if channels == 3 or k != "grey"}
