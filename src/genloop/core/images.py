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
    """... x 3 RGB pixels as Pillow's `convert("L")` makes them (ITU-R 601-2 luma in its 16-bit
    fixed point, the same integers), for one image or a stack: numpy on the array clean already
    holds costs a third of converting an image and reading it back. A test keeps them equal."""
    v = pixels.astype(np.uint32)
    return ((v[..., 0] * 19595 + v[..., 1] * 38470 + v[..., 2] * 7471 + 0x8000) >> 16).astype(np.uint8)


def _phash_bits(grey: np.ndarray) -> list[str]:
    """The perceptual hashes of N x PHASH_SIDE x PHASH_SIDE grey arrays, as hex."""
    # rounded: where the FFT's DCT gives exact zeros (a flat image) the product leaves 1e-13 noise
    low = np.round(_DCT @ grey.astype(np.float64) @ _DCT.T, 4).reshape(len(grey), -1)
    ordered = np.sort(low, axis=1)  # np.median's own value, without its dispatch
    half = low.shape[1] // 2
    median = (ordered[:, half - 1] + ordered[:, half]) / 2
    return [row.tobytes().hex() for row in np.packbits(low > median[:, None], axis=1)]


def perceptual_hash(img: Image.Image) -> str:
    """imagehash.phash of `img` as hex (the same bits: grey, LANCZOS to 32 x 32, the 8 x 8 lowest
    DCT frequencies against their median). Hand-written because imagehash's two full 32-point
    DCTs and bit-by-bit hex string took 0.41 ms per image, 40 % of clean's work per image; the
    8 x 32 DCT matrix product and `np.packbits` take about 0.03 ms (clean's batches of images,
    `finish`, a few microseconds each). A test keeps it equal to imagehash on random images."""
    grey = img.convert("L")
    if grey.size != (PHASH_SIDE, PHASH_SIDE):
        grey = grey.resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS)
    return _phash_bits(np.asarray(grey)[None])[0]


@dataclass(frozen=True)
class Fitted:
    """An image decoded, converted and fitted to the output size, before the checks on its pixels."""

    pixels: np.ndarray  # r x r x 3 RGB when `rgb`, else r x r in the mode asked (r x r x 3 for RGB)
    rgb: bool  # the source may have colour: fitted in RGB, judged, then made grey if L is asked
    width: int  # of the original image
    height: int
    original_mode: str
    note: str | None


def fit(data: bytes, *, mode: str, resolution: int, max_pixels: int, min_side: int,
        background: str = "#ffffff") -> Fitted:
    """Decode, convert (`mode` L or RGB, transparency on `background`), square-crop and resize;
    raises RejectedImage with the reason."""
    img, frames = decode_frames(data, max_pixels)
    width, height = img.size
    original_mode = img.mode
    if min(width, height) < min_side:
        raise RejectedImage(f"too small: {width}x{height} < clean.min_side={min_side}")
    # an image that may have colour is converted to RGB and fitted once; colour is judged on the
    # image as it will be trained (the square crop at data.resolution), then made grey if asked.
    # Judging it on the decoded image as well cost 0.15 ms of a 64-px image's 0.7 ms
    rgb = may_have_colour(img)
    img = to_mode(img, "RGB" if rgb else mode, background)
    pixels = np.asarray(ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.LANCZOS))
    note = f"animated: {frames} frames, the first frame is used" if frames > 1 else None
    return Fitted(pixels, rgb, width, height, original_mode, note)


# images per block of `finish`'s array work: about 2**20 pixel values at a time, so that a chunk of
# large images never holds more than a few MB of int64 copies
FINISH_BLOCK_VALUES = 1 << 20


def finish(fitted: list[Fitted], *, mode: str, resolution: int, blank_std: float) -> list[Normalised | RejectedImage]:
    """The checks and hashes on the pixels of fitted images: the colour flag, the grey conversion
    when L is asked, the blank check, the pixel hash and the perceptual hash. One Normalised per
    image, or the RejectedImage saying why it is blank.

    Hand-written as array work over blocks of images: each of these is a few numpy calls whose
    dispatch (10-25 us each) cost more than their arithmetic on one 32-px image, about 0.08 ms of
    clean's 0.7 ms per image; over a block they cost about 0.01 ms per image."""
    out: list[Normalised | RejectedImage] = []
    per_image = resolution * resolution * 3
    step = max(1, FINISH_BLOCK_VALUES // per_image)
    prefix = f"{mode}{resolution}".encode()
    for start in range(0, len(fitted), step):
        block = fitted[start : start + step]
        colour = np.zeros(len(block), dtype=bool)
        judged = [i for i, f in enumerate(block) if f.rgb]
        if judged:
            rgb = np.stack([block[i].pixels for i in judged])
            # the channels' spread as elementwise max/min of the three planes (numpy's reductions
            # along the short last axis were 5 x slower); uint8: max >= min, no wrap
            r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
            spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
            coloured = np.count_nonzero((spread > COLOUR_TOLERANCE).reshape(len(judged), -1), axis=1)
            colour[judged] = coloured > COLOUR_SHARE * resolution * resolution
        if mode == "L":
            pixels = np.stack([grey_levels(f.pixels) if f.rgb else f.pixels for f in block])[..., None]
        else:
            pixels = np.stack([f.pixels for f in block])
        # the standard deviation from integer sums: exact, and np.std's float64 passes cost more
        v = pixels.reshape(len(block), -1).astype(np.int64)
        n = v.shape[1]
        spread2 = np.einsum("ij,ij->i", v, v) * n - v.sum(axis=1) ** 2
        std = np.sqrt(np.maximum(spread2, 0)) / n
        if resolution == PHASH_SIDE:
            grey = pixels[..., 0] if mode == "L" else grey_levels(pixels)
            phashes = _phash_bits(grey)
        else:
            phashes = [perceptual_hash(Image.fromarray(p[..., 0] if mode == "L" else p)) for p in pixels]
        for i, f in enumerate(block):
            if std[i] < blank_std:
                out.append(RejectedImage(f"blank image: pixel std {std[i]:.2f} < clean.blank_std={blank_std}"))
                continue
            digest = hashlib.sha256(prefix)
            digest.update(pixels[i])  # the array's own buffer: no copy into bytes
            out.append(Normalised(pixels=pixels[i], pixel_hash=digest.hexdigest(), phash=phashes[i], width=f.width,
                                  height=f.height, original_mode=f.original_mode, colour=bool(colour[i]),
                                  note=f.note))
    return out


def normalise(
    data: bytes, *, mode: str, resolution: int, max_pixels: int, min_side: int, blank_std: float,
    background: str = "#ffffff",
) -> Normalised:
    """One image through `fit` and `finish`: its pixels only (no metadata), with the colour flag
    judged on the fitted image; raises RejectedImage with the reason."""
    fitted = fit(data, mode=mode, resolution=resolution, max_pixels=max_pixels, min_side=min_side,
                 background=background)
    done = finish([fitted], mode=mode, resolution=resolution, blank_std=blank_std)[0]
    if isinstance(done, RejectedImage):
        raise done
    return done
