"""One chunk of clean's work: decode and normalise a list of data/raw files into one shard.

Kept apart from `genloop.stages.clean` so that a worker process or Dask worker imports only
what the chunk needs (numpy, Pillow, pyarrow), not the stage's tables (pandas, pydantic): about
0.5 s less per worker start.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from genloop.core.images import Fitted, RejectedImage, finish, fit
from genloop.core.shards import shard_name, write_shard

SHARDS = "shards"  # the cache's folder of shards

# One row per raw file of the cache index. A chunk comes back as an Arrow record batch of these
# columns rather than a dict per file: at 1M files the dicts took about 1.5 KB each in the parent
# (3.2 GB peak for a first clean), the batch about 0.3 KB.
CACHE_SCHEMA = pa.schema([
    ("raw_sha256", pa.string()),
    ("reason", pa.string()),  # null when kept
    ("pixel_hash", pa.string()),
    ("phash", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("original_mode", pa.string()),
    ("colour", pa.bool_()),  # null when dropped
    ("note", pa.string()),  # null unless reading it needed a choice (an animation: its first frame)
    ("clean_sha256", pa.string()),  # of the image's bytes in its shard: the manifest's sha256
    ("shard", pa.string()),  # the file in <cache>/shards (and data/clean) holding the image; null when dropped
    ("offset", pa.int64()),  # the image's index in its shard
])


@dataclass(frozen=True)
class ChunkJob:
    """What a clean chunk needs: plain values only, so that it pickles to a process or Dask worker."""

    raw: Path
    cache: Path
    mode: str
    resolution: int
    max_pixels: int
    min_side: int
    blank_std: float
    background: str


def clean_chunk(job: ChunkJob, files: list[tuple[str, str]]) -> pa.RecordBatch:
    """Normalise each (raw sha256, data/raw path) of one chunk; the images kept go into one shard,
    `job.cache/shards/<name>.npy`, named after the chunk's files. One CACHE_SCHEMA row per file,
    with its shard and offset when kept, the reason when dropped. The shard is written atomically
    under a name the chunk decides, so a chunk run again after its worker died leaves exactly what
    one run leaves. The same function runs in this process, in a process pool and on Dask workers
    (`genloop.core.chunk_map`)."""
    name = shard_name(sha for sha, _ in files)
    reasons: dict[str, str] = {}
    fitted: list[tuple[str, Fitted]] = []
    for sha, rel in files:
        try:
            try:
                data = (job.raw / rel).read_bytes()
            except FileNotFoundError:
                raise RejectedImage(f"missing from data/raw ({rel}); run `dvc checkout data.dvc`") from None
            fitted.append((sha, fit(data, mode=job.mode, resolution=job.resolution, max_pixels=job.max_pixels,
                                    min_side=job.min_side, background=job.background)))
        except RejectedImage as exc:
            reasons[sha] = str(exc)
    done = dict(zip((sha for sha, _ in fitted),
                    finish([f for _, f in fitted], mode=job.mode, resolution=job.resolution, blank_std=job.blank_std),
                    strict=True))
    columns: dict[str, list[object]] = {f.name: [] for f in CACHE_SCHEMA}
    images: list[np.ndarray] = []
    for sha, _ in files:
        out = done.get(sha)
        row: dict[str, object]
        if out is None or isinstance(out, RejectedImage):
            row = {"raw_sha256": sha, "reason": reasons[sha] if out is None else str(out)}
        else:
            row = {"raw_sha256": sha, "pixel_hash": out.pixel_hash, "phash": out.phash, "width": out.width,
                   "height": out.height, "original_mode": out.original_mode, "colour": out.colour,
                   "note": out.note, "clean_sha256": hashlib.sha256(out.pixels).hexdigest(), "shard": name,
                   "offset": len(images)}
            images.append(out.pixels)
        for column, values in columns.items():
            values.append(row.get(column))
    if images:
        write_shard(job.cache / SHARDS / name, np.stack(images))  # durable before its rows reach the index
    return pa.RecordBatch.from_pydict(columns, schema=CACHE_SCHEMA)
