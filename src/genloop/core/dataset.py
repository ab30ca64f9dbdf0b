"""Clean images as one uint8 tensor, resident on the training device when it fits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from genloop.core.errors import StageInputMissing
from genloop.core.heap import release_free_heap
from genloop.core.manifest import read_manifest
from genloop.core.shards import ShardedImages, manifest_images
from genloop.core.workspace import Workspace


@dataclass
class ImageSet:
    images: torch.Tensor | ShardedImages  # uint8 N x C x H x W, in memory or read from the shards per batch
    labels: torch.Tensor | None  # long N, indices into classes
    classes: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def nbytes(self) -> int:
        """The images' size in memory (all of them, also when they stream)."""
        n, c, h, w = self.images.shape
        return n * c * h * w

    def subsample(self, most: int, seed: int) -> ImageSet:
        """At most `most` of the images, a seeded choice kept in row order (itself when it has no more)."""
        if len(self) <= most:
            return self
        rows = np.sort(np.random.default_rng(seed).choice(len(self), most, replace=False))
        index = torch.from_numpy(rows)
        images = self.images.subset(rows) if isinstance(self.images, ShardedImages) else self.images[index]
        labels = self.labels[index] if self.labels is not None else None
        return ImageSet(images, labels, self.classes, [self.ids[i] for i in rows])

    def to(self, device: torch.device) -> ImageSet:
        labels = self.labels.to(device) if self.labels is not None else None
        return ImageSet(self.images.to(device), labels, self.classes, self.ids)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def load_split(ws: Workspace, split: str | None, classes: list[str] | None = None,
               memory_budget_gb: float | None = None) -> ImageSet:
    """Images of one split ('train', 'holdout', or None for all) from data/clean: in memory, or,
    when they take more than `memory_budget_gb`, a `ShardedImages` that reads them per batch."""
    manifest = read_manifest(ws.manifest, only=["id", "shard", "offset", "label", "split"])
    rows = manifest if split is None else manifest[manifest["split"] == split]
    if rows.empty:
        raise StageInputMissing(f"no {split or ''} images in {ws.manifest}: run `genloop clean`")
    rows = rows.reset_index(drop=True)
    streamed = ShardedImages(ws.clean, rows["shard"].astype(str).tolist(), rows["offset"].astype("int64").tolist())
    if memory_budget_gb is not None and int(np.prod(streamed.shape)) > memory_budget_gb * 1e9:
        images: torch.Tensor | ShardedImages = streamed
    else:
        streamed.close()
        images = torch.from_numpy(manifest_images(ws.clean, rows, channels_first=True))
    labels = None
    if classes is None:
        classes = sorted(rows["label"].dropna().unique().tolist(), key=_natural)
    if classes and rows["label"].notna().all():
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index.get(str(c), -1) for c in rows["label"]], dtype=torch.long)
        if (labels < 0).any():
            labels = None
    image_set = ImageSet(images, labels, list(classes) if labels is not None else [], rows["id"].tolist())
    del manifest, rows
    release_free_heap()  # the manifest's Arrow buffers and Python strings (0.3 GB at 1M rows)
    return image_set


def _natural(label: str) -> tuple[int, object]:
    return (0, int(label)) if str(label).lstrip("-").isdigit() else (1, str(label))


def has_labels(manifest: pd.DataFrame) -> bool:
    return bool(len(manifest)) and bool(manifest["label"].notna().all())
