"""Image grids for people to look at (sample sheets, side-by-side comparisons)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile uint8 NHWC images into one PIL image (white padding)."""
    n, h, w, c = images.shape
    cols = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    sheet = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        sheet[y : y + h, x : x + w] = img
    out = Image.fromarray(sheet[:, :, 0] if c == 1 else sheet)
    if scale > 1:
        out = out.resize((out.width * scale, out.height * scale), Image.Resampling.NEAREST)
    return out


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
