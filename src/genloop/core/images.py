"""Decoding untrusted image bytes and normalising them into training images."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError


class RejectedImage(Exception):
    """The bytes are not a usable image; the message is the reason shown in reports."""


@dataclass(frozen=True)
class Normalised:
    pixels: np.ndarray  # H x W x C uint8 (C = 1 for L)
    pixel_hash: str
    phash: str
    width: int  # of the original image
    height: int
    original_mode: str
    colour: bool  # whether the fitted image has colour (colour_in), whatever mode it was converted to
    note: str | None = None  # how the image was read, when that is not obvious (animation)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey images scaled into 8 bits by their own range."""
    arr = np.asarray(img, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return Image.fromarray(((arr - lo) * scale).round().astype(np.uint8), mode="L")


def _composite(img: Image.Image, background: str) -> Image.Image:
    rgba = img.convert("RGBA")
    under = Image.new("RGBA", rgba.size, ImageColor.getrgb(background))
    return Image.alpha_composite(under, rgba).convert("RGB")


GREY_MODES = frozenset({"1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})  # no colour, no alpha
COLOUR_TOLERANCE = 8  # channels this many levels (of 255) apart still read grey: JPEG chroma noise
COLOUR_SHARE = 0.01  # an image has colour when more than this share of its pixels are coloured


def to_mode(img: Image.Image, mode: str, background: str = "#ffffff") -> Image.Image:
    """Convert any PIL mode to L or RGB; transparency is composited on `background`."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _to_8bit(img)
    elif img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        img = _composite(img, background)
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, 1
    return img.convert(mode)


def colour_in(pixels: np.ndarray) -> bool:
    """Whether H x W x 3 RGB pixels have colour: more than COLOUR_SHARE of them have channels more
    than COLOUR_TOLERANCE levels apart. A grey palette, RGB that only repeats the grey level, or
    transparency on a grey background: no colour."""
    # the channels' spread as elementwise max/min of the three planes: numpy's reductions along the
    # short last axis took 0.1 ms of a 64-px image, this 0.02 ms of a 32-px one
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)  # uint8: max >= min, no wrap
    return bool(np.count_nonzero(spread > COLOUR_TOLERANCE) > COLOUR_SHARE * spread.size)


def may_have_colour(img: Image.Image) -> bool:
    """False when the decoded mode itself rules colour out (grey without transparency)."""
    return img.mode not in GREY_MODES or "transparency" in img.info


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Fully decode `data`, or raise RejectedImage with the reason."""
    return decode_frames(data, max_pixels)[0]


# formats whose EXIF block, orientation included, Pillow puts in `info["exif"]` once loaded (TIFF
# keeps it in its tags instead, so it is always passed to exif_transpose)
EXIF_IN_INFO = frozenset({"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP"})


def decode_frames(data: bytes, max_pixels: int) -> tuple[Image.Image, int]:
    """Fully decode the first frame of `data` (the only one of a still image); returns it and
    the number of frames, or raises RejectedImage with the reason."""
    if not data:
        raise RejectedImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise RejectedImage(
                    f"decompression bomb: {w}x{h} = {w * h} pixels > clean.max_pixels={max_pixels}"
                )
            frames = int(getattr(img, "n_frames", 1))
            if frames > 1:
                img.seek(0)  # animated images (GIF, APNG, WebP, multi-page TIFF): the first frame is used
            img.load()
            if img.format in EXIF_IN_INFO and "exif" not in img.info:
                return img, frames  # no EXIF, no orientation: exif_transpose's own check costs 0.03 ms
            return ImageOps.exif_transpose(img), frames
    except RejectedImage:
        raise
    except UnidentifiedImageError:
        raise RejectedImage("not an image: no known image format recognised") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RejectedImage(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise RejectedImage(f"truncated or corrupt image: {exc}") from None


PHASH_SIDE, PHASH_BITS = 32, 8  # imagehash.phash's defaults: a 32 x 32 grey image, its 8 x 8 lowest frequencies
# rows k < 8 of the unnormalised DCT-II matrix of size 32 (scipy.fftpack.dct's convention)
_DCT = 2.0 * np.cos(np.pi * np.arange(PHASH_BITS)[:, None] * (2 * np.arange(PHASH_SIDE)[None, :] + 1)
                    / (2 * PHASH_SIDE))


def grey_levels(pixels: np.ndarray) -> np.ndarray:
    """H x W x 3 RGB pixels as Pillow's `convert("L")` makes them (ITU-R 601-2 luma in its 16-bit
    fixed point, the same integers): numpy on the array clean already holds costs a third of
    converting an image and reading it back. A test keeps them equal."""
    v = pixels.astype(np.uint32)
    return ((v[..., 0] * 19595 + v[..., 1] * 38470 + v[..., 2] * 7471 + 0x8000) >> 16).astype(np.uint8)


def _phash_bits(grey: np.ndarray) -> str:
    """The perceptual hash of a PHASH_SIDE x PHASH_SIDE grey array, as hex."""
    # rounded: where the FFT's DCT gives exact zeros (a flat image) the product leaves 1e-13 noise
    low = np.round(_DCT @ grey.astype(np.float64) @ _DCT.T, 4).ravel()
    ordered = np.sort(low)  # np.median's own value, without its 0.04 ms of dispatch on 64 numbers
    median = (ordered[low.size // 2 - 1] + ordered[low.size // 2]) / 2
    return np.packbits(low > median).tobytes().hex()


def perceptual_hash(img: Image.Image) -> str:
    """imagehash.phash of `img` as hex (the same bits: grey, LANCZOS to 32 x 32, the 8 x 8 lowest
    DCT frequencies against their median). Hand-written because imagehash's two full 32-point
    DCTs and bit-by-bit hex string took 0.41 ms per image, 40 % of clean's work per image; the
    8 x 32 DCT matrix product and `np.packbits` take about 0.03 ms. A test keeps it equal to
    imagehash on random images."""
    grey = img.convert("L")
    if grey.size != (PHASH_SIDE, PHASH_SIDE):
        grey = grey.resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS)
    return _phash_bits(np.asarray(grey))


def _pixels_phash(pixels: np.ndarray) -> str:
    """perceptual_hash of normalised pixels (H x W, or H x W x 3 RGB); at 32 px straight from the
    array, without making an image of it."""
    if pixels.shape[:2] != (PHASH_SIDE, PHASH_SIDE):
        return perceptual_hash(Image.fromarray(pixels))
    return _phash_bits(grey_levels(pixels) if pixels.ndim == 3 else pixels)


def _std(pixels: np.ndarray) -> float:
    """The standard deviation of uint8 pixels from integer sums (np.std's float64 passes cost 0.1 ms)."""
    v = pixels.ravel().astype(np.int64)
    n = v.size
    total, squares = int(v.sum()), int(v @ v)
    return float(np.sqrt(max(squares * n - total * total, 0)) / n)


def normalise(
    data: bytes, *, mode: str, resolution: int, max_pixels: int, min_side: int, blank_std: float,
    background: str = "#ffffff",
) -> Normalised:
    """Decode, convert (`mode` L or RGB, transparency on `background`), square-crop, resize and
    keep its pixels only (no metadata); whether it has colour is judged on the fitted image."""
    img, frames = decode_frames(data, max_pixels)
    width, height = img.size
    original_mode = img.mode
    if min(width, height) < min_side:
        raise RejectedImage(f"too small: {width}x{height} < clean.min_side={min_side}")
    size = (resolution, resolution)
    if may_have_colour(img):
        # converted to RGB and fitted once; colour is judged on the image as it will be trained (the
        # square crop at data.resolution), then made grey if asked. Judging it on the decoded image
        # as well cost 0.15 ms of a 64-px image's 0.7 ms
        rgb = np.asarray(ImageOps.fit(to_mode(img, "RGB", background), size, method=Image.Resampling.LANCZOS))
        colour = colour_in(rgb)
        pixels = rgb if mode == "RGB" else grey_levels(rgb)
    else:
        colour = False
        pixels = np.asarray(ImageOps.fit(to_mode(img, mode, background), size, method=Image.Resampling.LANCZOS))
    std = _std(pixels)
    if std < blank_std:
        raise RejectedImage(f"blank image: pixel std {std:.2f} < clean.blank_std={blank_std}")
    pixel_hash = hashlib.sha256(f"{mode}{resolution}".encode())
    pixel_hash.update(pixels)  # the array's own buffer: no copy into bytes
    return Normalised(
        pixels=pixels[:, :, None] if pixels.ndim == 2 else pixels,
        pixel_hash=pixel_hash.hexdigest(),
        phash=_pixels_phash(pixels),
        width=width,
        height=height,
        original_mode=original_mode,
        colour=colour,
        note=f"animated: {frames} frames, the first frame is used" if frames > 1 else None,
    )
