"""Image grids for people to look at (sample sheets, side-by-side comparisons)."""

from __future__ import annotations

import io
import math
from typing import Any

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


def side_by_side(
    left: Any, right: Any, columns: int, captions: tuple[str, str], scale: int = 2
) -> Image.Image:
    """Two uint8 NCHW image sets as grids next to each other, each under its caption
    (e.g. champion vs challenger drawn from the same seeds: image i of each is a pair)."""
    from PIL import ImageDraw

    grids = [make_grid(x.permute(0, 2, 3, 1).numpy(), columns=columns, scale=scale).convert("RGB")
             for x in (left, right)]
    gap, header = 16, 14
    sheet = Image.new("RGB", (grids[0].width + gap + grids[1].width, header + max(g.height for g in grids)), "white")
    draw = ImageDraw.Draw(sheet)
    for x, grid, caption in ((0, grids[0], captions[0]), (grids[0].width + gap, grids[1], captions[1])):
        sheet.paste(grid, (x, header))
        draw.text((x + 2, 1), caption, fill="black")
    return sheet


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
