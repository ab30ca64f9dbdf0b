"""Clean images stored as shards: one uint8 `.npy` array of N x H x W x C images per file.

data/clean holds a few hundred shards instead of one PNG per image, and the manifest names each
image's `shard` and `offset`. `.npy` was chosen by measured load speed (bench/shard_format.py):
a shard is read with one `np.load`, memory-mapped, about 100x faster than decoding the same
images from PNG files or from PNG bytes in Parquet. The price is disk: raw pixels take about 4x
the bytes of PNG on flat-coloured 32-px images (`bench/README.md`). numpy's own format, without
pickles (`allow_pickle=False`).
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from genloop.core.errors import StageInputMissing
from genloop.core.storage import atomic_path

if TYPE_CHECKING:  # torch and pandas are imported where they are used: clean's workers need neither
    import pandas as pd
    import torch

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


def _check_rows(path: Path, arr: np.ndarray, last: int) -> None:
    if last >= len(arr):
        raise StageInputMissing(f"{path} holds {len(arr)} images, the manifest asks for image {last}: "
                                "run `genloop clean` again")


def _by_shard(shards: Sequence[str]) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """The distinct shard names in first-seen order, each row's number among them, and the rows
    of each shard."""
    names = list(dict.fromkeys(shards))
    number = {n: i for i, n in enumerate(names)}
    ids = np.fromiter((number[s] for s in shards), dtype=np.int64, count=len(shards))
    order = np.argsort(ids, kind="stable")
    bounds = np.searchsorted(ids[order], np.arange(len(names) + 1))
    return names, ids, [order[bounds[k] : bounds[k + 1]] for k in range(len(names))]


def read_images(folder: Path, shards: Sequence[str], offsets: Sequence[int],
                channels_first: bool = False) -> np.ndarray:
    """The images at (`shards[i]`, `offsets[i]`) under `folder`, in that order, as one N x H x W x C
    uint8 array (N x C x H x W with `channels_first`, transposed shard by shard: a whole-array
    transpose would hold the split twice). Each shard is opened once (memory-mapped) and only the
    rows asked for are read."""
    offsets = np.asarray(offsets, dtype=np.int64)
    names, _, groups = _by_shard(shards)
    out: np.ndarray | None = None
    for name, rows in zip(names, groups, strict=True):
        arr = _open(folder / name)
        offs = offsets[rows]
        _check_rows(folder / name, arr, int(offs.max()))
        hwc = arr.shape[1:]
        if out is None:
            shape = hwc if not channels_first else (hwc[2], hwc[0], hwc[1])
            out, first = np.empty((len(offsets), *shape), dtype=np.uint8), hwc
        elif hwc != first:
            raise StageInputMissing(f"{folder / name} holds {hwc} images, other shards "
                                    f"{first}: run `genloop clean` again")
        out[rows] = arr[offs].transpose(0, 3, 1, 2) if channels_first else arr[offs]
    if out is None:
        raise StageInputMissing(f"no images asked for from {folder}")
    return out


def manifest_images(folder: Path, manifest: pd.DataFrame, channels_first: bool = False) -> np.ndarray:
    """The images of the manifest rows `manifest` (columns shard, offset) from the shards in `folder`."""
    return read_images(folder, manifest["shard"].astype(str).tolist(), manifest["offset"].astype("int64").tolist(),
                       channels_first)


def to_pil(pixels: np.ndarray) -> Image.Image:
    """One H x W x C shard image as a PIL image (L for one channel, RGB for three)."""
    grey = pixels.shape[2] == 1
    return Image.fromarray(pixels[:, :, 0] if grey else pixels, mode="L" if grey else "RGB")


class ShardedImages:
    """The images of manifest rows, read from their shards batch by batch: what training indexes
    instead of a resident tensor when the train split is over `train.memory_budget_gb`.

    Indexing with a LongTensor of row numbers or a slice returns those images as an N x C x H x W
    uint8 tensor on the CPU, exactly what the same index of the resident tensor returns. Each
    image is one `os.pread` at its offset in its shard (the `.npy` header gives where the array
    starts), so only the batch is in memory, not a memory map of every shard touched so far."""

    def __init__(self, folder: Path, shards: Sequence[str], offsets: Sequence[int]) -> None:
        names, ids, groups = _by_shard(shards)
        self._paths = [folder / n for n in names]
        self._row = np.asarray(offsets, dtype=np.int64)
        starts, shape = [], None
        for path, rows in zip(self._paths, groups, strict=True):
            arr = _open(path)
            _check_rows(path, arr, int(self._row[rows].max()))
            if shape is not None and arr.shape[1:] != shape:
                raise StageInputMissing(f"{path} holds {arr.shape[1:]} images, other shards {shape}: "
                                        "run `genloop clean` again")
            shape = arr.shape[1:]
            starts.append(arr.offset)  # type: ignore[attr-defined]  # np.memmap: where the data begins
            del arr
        assert shape is not None, "no shards"
        self._shard = ids
        self._start = np.array(starts, dtype=np.int64)
        self._hwc = tuple(int(v) for v in shape)
        self._bytes = int(np.prod(shape))
        self._fds: dict[int, int] = {}
        h, w, c = self._hwc
        self.shape = (len(self._row), c, h, w)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def device(self) -> torch.device:
        import torch

        return torch.device("cpu")

    def to(self, device: torch.device) -> ShardedImages:
        """Stays on disk: each batch goes to the device after it is read."""
        return self

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            self._fds[shard] = os.open(self._paths[shard], os.O_RDONLY)
        return self._fds[shard]

    def __getitem__(self, index: torch.Tensor | slice) -> torch.Tensor:
        import torch

        if isinstance(index, slice):
            rows = np.arange(len(self))[index]
        else:  # row numbers, or a boolean mask over the rows (as a tensor takes either)
            rows = (index.nonzero() if index.dtype == torch.bool else index).cpu().numpy().reshape(-1)
        out = np.empty((len(rows), self._bytes), dtype=np.uint8)
        for k, r in enumerate(rows.tolist()):
            s = int(self._shard[r])
            data = os.pread(self._fd(s), self._bytes, int(self._start[s] + self._row[r] * self._bytes))
            if len(data) != self._bytes:
                raise StageInputMissing(f"{self._paths[s]} ends before image {int(self._row[r])}: "
                                        "run `genloop clean` again")
            out[k] = np.frombuffer(data, dtype=np.uint8)
        return torch.from_numpy(out.reshape(len(rows), *self._hwc).transpose(0, 3, 1, 2).copy())

    def subset(self, rows: np.ndarray) -> ShardedImages:
        """The images of `rows` (row numbers), still read from the shards per batch."""
        out = copy.copy(self)
        out._shard, out._row, out._fds = self._shard[rows], self._row[rows], {}
        out.shape = (len(rows), *self.shape[1:])
        return out

    def close(self) -> None:
        fds = getattr(self, "_fds", {})  # absent when __init__ raised
        for fd in fds.values():
            os.close(fd)
        fds.clear()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "_fds"} | {"_fds": {}}
