"""Clean images stored as shards: one uint8 `.npy` array of N x H x W x C images per file.

data/clean holds a few hundred shards instead of one PNG per image, and the manifest names each
image's `shard` and `offset`. `.npy` was chosen by measured load speed (bench/shard_format.py):
a shard is read with one `np.load`, memory-mapped, about 25x faster than decoding the same images
from PNG files or from PNG bytes in Parquet, for a similar size on disk (the PNGs of 32-px images
barely compress). numpy's own format is used (no pickles: `allow_pickle=False`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from genloop.core.errors import StageInputMissing
from genloop.core.storage import atomic_path

SUFFIX = ".npy"


def shard_name(keys: Iterable[str]) -> str:
    """A shard's file name from the keys of its images, in order: the same chunk always writes the
    same file, so a chunk run again (its worker died) replaces it with identical bytes."""
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode())
        h.update(b"\n")
    return h.hexdigest()[:24] + SUFFIX


def write_shard(path: Path, images: np.ndarray) -> None:
    """Write N x H x W x C uint8 `images` to `path` atomically and durably."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"a shard holds N x H x W x C uint8 images, not {images.dtype} {images.shape}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, images, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())


def _open(path: Path) -> np.ndarray:
    if not path.exists():
        raise StageInputMissing(f"{path} is listed in the manifest but missing: run `dvc checkout` "
                                "or `genloop clean` again")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise StageInputMissing(f"{path} is not a readable image shard ({exc}): run `genloop clean` again") from None
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise StageInputMissing(f"{path} holds {arr.dtype} {arr.shape}, not N x H x W x C uint8 images: "
                                "run `genloop clean` again")
    return arr


def read_images(folder: Path, shards: Sequence[str], offsets: Sequence[int]) -> np.ndarray:
    """The images at (`shards[i]`, `offsets[i]`) under `folder`, in that order, as one N x H x W x C
    uint8 array. Each shard is opened once (memory-mapped) and only the rows asked for are read."""
    rows = pd.DataFrame({"shard": list(shards), "offset": np.asarray(offsets, dtype=np.int64)})
    out: np.ndarray | None = None
    for name, group in rows.groupby("shard", sort=False):
        arr = _open(folder / str(name))
        offs = group["offset"].to_numpy()
        if len(offs) and (offs.min() < 0 or offs.max() >= len(arr)):
            raise StageInputMissing(f"{folder / str(name)} holds {len(arr)} images, the manifest asks for "
                                    f"image {int(offs.max())}: run `genloop clean` again")
        if out is None:
            out = np.empty((len(rows), *arr.shape[1:]), dtype=np.uint8)
        elif arr.shape[1:] != out.shape[1:]:
            raise StageInputMissing(f"{folder / str(name)} holds {arr.shape[1:]} images, other shards "
                                    f"{out.shape[1:]}: run `genloop clean` again")
        out[group.index.to_numpy()] = arr[offs]
    if out is None:
        raise StageInputMissing(f"no images asked for from {folder}")
    return out


def manifest_images(folder: Path, manifest: pd.DataFrame) -> np.ndarray:
    """The images of the manifest rows `manifest` (columns shard, offset) from the shards in `folder`."""
    return read_images(folder, manifest["shard"].astype(str).tolist(), manifest["offset"].astype("int64").tolist())


def to_pil(pixels: np.ndarray) -> Image.Image:
    """One H x W x C shard image as a PIL image (L for one channel, RGB for three)."""
    grey = pixels.shape[2] == 1
    return Image.fromarray(pixels[:, :, 0] if grey else pixels, mode="L" if grey else "RGB")
