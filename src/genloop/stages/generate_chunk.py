"""One chunk of generate's work: some batches of images from the champion, written as PNGs.

The same function runs in this process, in a pool of processes or on Dask workers
(`genloop.core.chunk_map`). It reads the champion as a state dict (`weights_only=True`) from a
file the stage saved, so a worker needs neither the MLflow server nor the model's stored code.
A batch's images depend only on its seed (`generate.seed` + its first index), so a chunk that
runs twice (its worker died) writes the same files again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from genloop.models import load_generator, sample
from genloop.models.device import torch_threads
from genloop.models.spec import GeneratorSpec


@dataclass(frozen=True)
class GenerateJob:
    """What every chunk of one generate run shares."""

    weights: Path  # the champion's state dict; its spec beside it (.json)
    folder: Path  # where the PNGs go: the batch's staging folder
    n: int  # images in the whole batch
    batch_size: int
    seed: int  # generate.seed: a batch starting at image i draws its latent from seed + i
    label: str | None  # one class for every image, or None to cycle through the classes
    device: str  # "cpu" or "cuda"
    threads: int  # torch threads while the chunk runs (one per worker when workers share the cores)


# per process: a worker loads the champion once, not once per chunk
_LOADED: dict[tuple[Path, str], tuple[torch.nn.Module, GeneratorSpec]] = {}


def _generator(job: GenerateJob) -> tuple[torch.nn.Module, GeneratorSpec]:
    key = (job.weights, job.device)
    if key not in _LOADED:
        _LOADED.clear()  # another champion: drop the last one
        _LOADED[key] = load_generator(job.weights, job.device)
    return _LOADED[key]


def batch_starts(n: int, batch_size: int) -> list[int]:
    """The first image index of every batch of a run of `n` images."""
    return list(range(0, n, batch_size))


def generate_chunk(job: GenerateJob, starts: list[int]) -> list[dict[str, object]]:
    """Write the batches beginning at `starts` into `job.folder` as <index>.png; one row per image
    (file, seed, index within its batch, label)."""
    gen, spec = _generator(job)
    rows: list[dict[str, object]] = []
    with torch_threads(job.threads):
        for start in starts:
            count = min(job.batch_size, job.n - start)
            seed = job.seed + start  # one seed per batch: any batch can be regenerated alone
            images = sample(gen, spec, count, seed, job.label)
            for i, img in enumerate(images):
                name = f"{start + i:06d}.png"
                Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(job.folder / name)
                label = job.label if job.label is not None else (spec.classes[i % len(spec.classes)]
                                                                 if spec.classes else None)
                rows.append({"file": name, "seed": seed, "index": i, "label": label})
    return rows
