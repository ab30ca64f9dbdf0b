"""Within-class diversity: does a generator draw varied samples of each class, or one per class?

FID and recall see a collapsed conditional generator only indirectly (ten sharp digits, one
per class, still cover every class). `class_diversity` asks directly: for each class c,

    spread(generated samples asked for c) / spread(real training images of class c)

averaged over the classes, where spread is the mean pairwise Euclidean distance between the
evaluation extractor's features. About 1 for real images, near 0 for a generator that draws
one image per class, above 1 for samples more scattered than the data (noise).
`class_diversity_pixels` is the same ratio with spread = the mean per-pixel standard
deviation, which needs no extractor and reads in pixels. Without labels (or for an
unconditional generator) both are taken over the whole set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from genloop.core.dataset import ImageSet, load_split
from genloop.core.workspace import Workspace

log = logging.getLogger(__name__)

MAX_PER_SET = 1000  # real images per class kept (seeded subsample): the pairwise distances stay cheap
Spread = Callable[[torch.Tensor], float]


def feature_spread(features: torch.Tensor) -> float:
    """Mean pairwise Euclidean distance between the rows of `features` (the diagonal left out)."""
    f = features.float().flatten(1)
    n = len(f)
    # exact differences (not the matmul expansion, whose rounding reads identical rows as apart)
    return float(torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist").sum() / (n * (n - 1)))


def pixel_spread(images: torch.Tensor) -> float:
    """Mean over pixels and channels of the per-pixel standard deviation across the images."""
    return float(images.float().std(dim=0).mean())


def _subsample(rows: torch.Tensor, seed: int) -> torch.Tensor:
    """At most MAX_PER_SET of the row numbers `rows` (seeded), in the order the set would be drawn."""
    if len(rows) <= MAX_PER_SET:
        return rows
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:MAX_PER_SET]]


def diversity_ratio(spread: Spread, fake: torch.Tensor, fake_classes: list[str] | None,
                    real: torch.Tensor, real_classes: list[str] | None, seed: int = 0) -> float | None:
    """Mean over classes of spread(fake of c) / spread(real of c); over the whole sets when either
    side has no classes. Classes with fewer than 2 images on a side, or no real spread, are left
    out; None when none is left."""
    # row numbers first, images last: `real` may be a split read from its shards, of which only the
    # subsample is read
    if fake_classes is None or real_classes is None:
        groups = {"all": (torch.arange(len(fake)), torch.arange(len(real)))}
    else:
        groups = {}
        for c in dict.fromkeys(fake_classes):
            fake_rows = torch.tensor([x == c for x in fake_classes]).nonzero().flatten()
            real_rows = torch.tensor([x == c for x in real_classes]).nonzero().flatten()
            groups[c] = (fake_rows, real_rows)
    ratios = []
    for f, r in groups.values():
        if len(f) < 2 or len(r) < 2:
            continue
        real_spread = spread(real[_subsample(r, seed)])
        if real_spread > 0:
            ratios.append(spread(fake[_subsample(f, seed)]) / real_spread)
    return sum(ratios) / len(ratios) if ratios else None


def class_diversity(fake_features: torch.Tensor, fake_images: torch.Tensor, fake_classes: list[str] | None,
                    real_features: torch.Tensor, real_images: torch.Tensor,
                    real_classes: list[str] | None) -> dict[str, float | None]:
    """`class_diversity` (on features) and `class_diversity_pixels` of a generated set against the
    real one; `*_classes`: the class name of each image (None: the whole set is one group)."""
    return {
        "class_diversity": diversity_ratio(feature_spread, fake_features, fake_classes, real_features,
                                           real_classes),
        "class_diversity_pixels": diversity_ratio(pixel_spread, fake_images, fake_classes, real_images,
                                                  real_classes),
    }


def diversity_metrics(ws: Workspace, real_features: torch.Tensor, fake_features: torch.Tensor,
                      fake_images: torch.Tensor,
                      asked: tuple[torch.Tensor, list[str]] | None,
                      memory_budget_gb: float | None = None, train: ImageSet | None = None) -> dict[str, float | None]:
    """class_diversity of generated images against the train split (`real_features`: its features,
    in its order); `asked`: the class index asked for per sample and the class names (None:
    unconditional). Real classes come from the split's labels when every image has one. `train`:
    the split when the caller holds it already; else it is loaded, its images streamed from the
    shards when they take more than `memory_budget_gb`."""
    if train is None:
        train = load_split(ws, "train", memory_budget_gb=memory_budget_gb)
    if len(train) != len(real_features):
        log.warning("class diversity: %d train features for %d train images; not computed",
                    len(real_features), len(train))
        return {}
    fake_classes = [asked[1][i] for i in asked[0].tolist()] if asked is not None else None
    real_classes = [train.classes[i] for i in train.labels.tolist()] if train.labels is not None else None
    if fake_classes is not None and real_classes is None:
        fake_classes = None  # the generator's classes are not the data's: compare whole sets
    return class_diversity(fake_features, fake_images, fake_classes, real_features, train.images, real_classes)
