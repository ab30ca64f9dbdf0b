"""Build a colour test corpus from a public package: every glyph of Noto Color Emoji (Debian's
`fonts-noto-color-emoji`), rendered to a small square PNG on white.

The glyphs come from the font itself (fontTools): each single code point of its cmap, and each
sequence its GSUB ligatures draw as one glyph (skin tones, ZWJ families, flags, keycaps); one
image per distinct picture (glyphs that draw the same bitmap are written once). Code points that
are not an emoji on their own are left out (see NOT_ALONE). Each glyph is drawn by Pillow at the
font's bitmap size in colour, cropped to its bounding box with a margin, composited on white
(RGB), padded to a square and resized to --size with LANCZOS. A file is named by its code points
in hex: <out>/1f600.png, <out>/1f1e9-1f1ea.png.

  .venv/bin/python bench/build_emoji_corpus.py --out DIR [--size 64] [--limit N] [--seed 0] [--grid PNG]

Prints one summary line and writes a sample grid (default <out>-grid.png, beside <out>) to look at.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
DEBIAN_PACKAGE = "fonts-noto-color-emoji"
STRIKE = 109  # the font's one bitmap strike (CBDT): FreeType draws a colour bitmap font only at this size
MARGIN = 0.06  # of the glyph's longer side, white space kept around it before padding to a square
GRID_N = 64

# Code points in the cmap that are not an emoji on their own, left out as single images: ASCII
# (space, keycap bases # * 0-9, controls), ZWJ, the combining keycap, variation selectors and
# tags (format characters), the regional indicator letters (a flag is a pair of them) and the
# skin tone modifiers (colour swatches). Sequences that use them are kept.
NOT_ALONE = (
    range(0x0000, 0x0080),
    range(0x200D, 0x200E),
    range(0x20E3, 0x20E4),
    range(0xFE00, 0xFE10),
    range(0x1F1E6, 0x1F200),
    range(0x1F3FB, 0x1F400),
    range(0xE0000, 0xE0080),
)


def font_sequences(font_path: Path = FONT) -> list[tuple[int, ...]]:
    """The code point sequences that draw each distinct colour glyph of the font once: single
    code points from its cmap first, then the sequences its GSUB ligatures join into one glyph."""
    from fontTools.ttLib import TTFont

    font = TTFont(str(font_path), lazy=True)
    cmap = font.getBestCmap()
    glyph_of: dict[str, tuple[int, ...]] = {}
    for cp, glyph in sorted(cmap.items()):
        if not any(cp in r for r in NOT_ALONE):
            glyph_of.setdefault(glyph, (cp,))
    code_of = {glyph: cp for cp, glyph in sorted(cmap.items(), reverse=True)}  # the lowest code point
    for lookup in font["GSUB"].table.LookupList.Lookup:
        for sub in lookup.SubTable if lookup.LookupType == 4 else ():
            for first, ligatures in sorted(sub.ligatures.items()):
                for lig in ligatures:
                    parts = [first, *lig.Component]
                    if lig.LigGlyph not in glyph_of and all(p in code_of for p in parts):
                        glyph_of[lig.LigGlyph] = tuple(code_of[p] for p in parts)
    return list(glyph_of.values())


def render(font: ImageFont.FreeTypeFont, seq: tuple[int, ...], size: int) -> Image.Image | None:
    """One glyph as a size x size RGB image on white; None when it draws nothing or, for a
    sequence the layout engine did not join into one glyph, more than one emoji."""
    text = "".join(map(chr, seq))
    left, top, right, bottom = font.getbbox(text)
    if right - left > 1.5 * (bottom - top):  # drawn as several glyphs side by side
        return None
    canvas = Image.new("RGBA", (right - left, bottom - top), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((-left, -top), text, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = round(max(glyph.size) * (1 + 2 * MARGIN))
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def build_corpus(out: Path, size: int = 64, limit: int = 0, seed: int = 0,
                 font_path: Path = FONT) -> list[Path]:
    """Write the font's emoji as <out>/<code points>.png (size x size RGB) and return their paths:
    all of them, or `limit` drawn at random with `seed` (the same seed gives the same files)."""
    if not font_path.is_file():
        raise FileNotFoundError(f"{font_path} is missing: install the Debian package {DEBIAN_PACKAGE} "
                                f"(apt-get install {DEBIAN_PACKAGE})")
    seqs = font_sequences(font_path)
    if limit:
        random.Random(seed).shuffle(seqs)
    # RAQM joins ligature sequences into their one glyph; BASIC layout would draw them apart
    font = ImageFont.truetype(str(font_path), STRIKE, layout_engine=ImageFont.Layout.RAQM)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    seen: set[bytes] = set()  # a few glyphs draw the same bitmap as another (e.g. some families)
    for seq in seqs:
        img = render(font, seq, size)
        if img is None or img.tobytes() in seen:
            continue
        seen.add(img.tobytes())
        path = out / ("-".join(f"{cp:04x}" for cp in seq) + ".png")
        img.save(path)
        written.append(path)
        if len(written) == limit:
            break
    return written


def sample_grid(paths: list[Path], n: int = GRID_N, seed: int = 0) -> Image.Image:
    """n of the images (drawn with seed) tiled into one sheet, at twice their size."""
    from genloop.core.grids import make_grid

    chosen = sorted(random.Random(seed).sample(paths, min(n, len(paths))))
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in chosen])
    return make_grid(images, scale=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder the PNGs are written to")
    parser.add_argument("--size", type=int, default=64, help="side of each square image in pixels")
    parser.add_argument("--limit", type=int, default=0, help="write at most this many, drawn at random (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit draw and of the grid's sample")
    parser.add_argument("--grid", type=Path, default=None, help="sample grid PNG (default: <out>-grid.png)")
    parser.add_argument("--font", type=Path, default=FONT, help="the Noto Color Emoji font file")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        paths = build_corpus(args.out, args.size, args.limit, args.seed, args.font)
    except FileNotFoundError as err:
        sys.exit(str(err))
    grid = args.grid or args.out.parent / f"{args.out.name}-grid.png"
    if paths:
        sample_grid(paths, seed=args.seed).save(grid)
    print(f"{len(paths)} emoji at {args.size}x{args.size} RGB in {args.out} "
          f"({time.perf_counter() - start:.1f} s); sample grid: {grid}")


if __name__ == "__main__":
    main()
