"""The embedding pass over a streamed split as a chunk map (`genloop.core.chunk_map`).

A split larger than `evaluate.memory_budget_gb` is read from data/clean's shards; its rows are
cut into chunks of `parallel.chunk_size` images and embedded on the engine `parallel.engine`
names, each worker rebuilding the evaluation's extractor once from its weights on disk (a state
dict read with `weights_only=True`, or the pretrained weights folder). A split held in memory,
or any split on a GPU, is embedded in this process: there the pass is one device's work.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from genloop.core.chunk_map import chunk_map
from genloop.core.config import ParallelParams
from genloop.core.heap import release_free_heap
from genloop.core.shards import ShardedImages
from genloop.eval.extractors import DomainExtractor, Extractor, InceptionExtractor, embed
from genloop.eval.pretrained import PretrainedExtractor
from genloop.models import load_torch_file
from genloop.models.device import threads_per_chunk, torch_threads


@dataclass(frozen=True)
class ExtractorSource:
    """How a worker rebuilds the evaluation's extractor: its kind, weights and (in-domain) shape."""

    kind: str
    path: Path
    shape: tuple[int, int, int]  # the in-domain extractor's channels, resolution, classes

    @classmethod
    def of(cls, extractor: Extractor) -> ExtractorSource:
        m = extractor.module
        shape = (m.channels, m.resolution, m.num_classes) if isinstance(m, DomainExtractor) else (0, 0, 0)
        return cls(extractor.kind, Path(extractor.path).resolve(), shape)

    def load(self) -> nn.Module:
        if self.kind.startswith("domain-"):
            module = DomainExtractor(*self.shape)
            module.load_state_dict(load_torch_file(self.path, "cached extractor weights",
                                                   fix="Delete it; the next evaluation retrains the extractor."))
            return module.eval()
        if self.kind == "inception-v3":
            return InceptionExtractor(self.path).eval()
        return PretrainedExtractor(self.kind, self.path).eval()


@dataclass(frozen=True)
class EmbedJob:
    source: ExtractorSource
    threads: int


_LOADED: dict[ExtractorSource, nn.Module] = {}  # per process: a worker rebuilds the extractor once


def embed_chunk(job: EmbedJob, images: ShardedImages) -> torch.Tensor:
    """Features of one chunk's images (read from their shards)."""
    if job.source not in _LOADED:
        _LOADED.clear()
        _LOADED[job.source] = job.source.load()
    with torch_threads(job.threads):
        return embed(_LOADED[job.source], images)


def embed_split(extractor: Extractor, images: torch.Tensor | ShardedImages, settings: ParallelParams) -> torch.Tensor:
    """`embed(extractor.module, images)`; a streamed split on CPUs as chunks on the engine."""
    if isinstance(images, torch.Tensor) or torch.cuda.is_available() or len(images) <= settings.chunk_size:
        return embed(extractor.module, images)
    size = settings.chunk_size  # the default 512 is 4 of embed()'s batches: the same batches as in one process
    chunks = [images.subset(np.arange(i, min(i + size, len(images)))) for i in range(0, len(images), size)]
    job = EmbedJob(ExtractorSource.of(extractor), threads_per_chunk(settings, len(chunks)))
    return _gather(chunk_map(partial(embed_chunk, job), chunks, settings))


def _gather(parts: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(parts)`, each part let go once copied and the freed heap returned every 64 parts:
    at 1M images the features are 0.43 GB, and a plain cat held them twice."""
    out = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype)
    start = 0
    for i in range(len(parts)):
        part, parts[i] = parts[i], None  # type: ignore[call-overload]
        out[start : start + len(part)] = part
        start += len(part)
        del part
        if i % 64 == 63:
            release_free_heap()
    return out
