"""Distribution metrics of generated images, computed from extractor features.

The computations are torchmetrics' (FID, KID, Inception Score) and prdc's definitions of
precision, recall, density and coverage (Kynkäänniemi et al. 2019, Naeem et al. 2020; computed in
chunks here, checked against prdc in the tests). genloop extracts
features once and feeds them through a pass-through module, so the same features serve
every metric, the reference statistics can be cached, and the bootstrap of the promotion
gate resamples feature rows instead of re-running the extractor.

KID is computed on features standardised by the real set's per-dimension mean and standard
deviation (floored at a tenth of the median, `KID_FEATURES`), so the polynomial kernel
(x.y / d + 1)^3 sees unit-scale features whatever the extractor: values are then comparable
across extractors and readable (about 0 for real images, growing with the difference) instead of
thousands on raw activations.

C2ST (genloop.eval.c2st) adds a classifier two-sample test: AUC 0.5 = indistinguishable.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from genloop.core.seeding import seeded
from genloop.eval.c2st import c2st
from genloop.eval.extractors import nearest
from genloop.eval.realism import knn_radii

log = logging.getLogger(__name__)

LOWER_IS_BETTER = ("fid", "kid_mean", "c2st_auc")
KID_FEATURES = "standardised-by-real-sd-floor-0.1-median"  # part of every cache key holding a KID value
FID_BLOCK = 8192  # feature rows per float64 update of FID's sums

DESCRIPTIONS = {
    "fid": "Frechet distance between real and generated feature distributions (0 = identical)",
    "kid_mean": "kernel inception distance (unbiased MMD, cubic polynomial kernel) on features standardised "
                "by the real set's per-dimension mean and sd; about 0 for real images",
    "inception_score": "exp(mean KL(p(y|x) || p(y))) of the extractor's class logits (higher: confident and varied)",
    "precision": "share of samples inside the real k-NN manifold (fidelity)",
    "recall": "share of real images inside the samples' k-NN manifold (diversity)",
    "c2st_auc": "AUC of a discriminator (logistic regression on standardised features and their squares) "
                "telling held-out real from held-out generated images; 0.5 = indistinguishable, 1 = always told apart",
    "c2st_accuracy": "accuracy of the same discriminator at P(real) = 0.5; 0.5 = chance",
    "class_consistency": "share of conditional samples that an independent classifier trained on real images "
                         "assigns to the class asked for",
    "coverage": "share of real images whose k-NN ball holds a sample (diversity, robust to outliers)",
    "density": "how many real k-NN balls hold each sample, over k (fidelity; ~1 for real images)",
    "curation_score": "mean of optimize's realism: the k-NN realism percentile among unseen real images "
                      "(~0.5 for real images, lower when less real)",
    "class_diversity": "mean over classes of the samples' spread (mean pairwise feature distance) within a class "
                       "over the real images' spread within it (~1 for real images, ~0 for one image per class; "
                       "whole sets when unlabelled)",
    "class_diversity_pixels": "class_diversity with spread = mean per-pixel standard deviation, on raw pixels",
}


def describe(metric: str) -> str:
    """What `metric` measures, in a sentence a report can carry."""
    base = metric.removesuffix("_low").removesuffix("_high").removesuffix("_std")
    return DESCRIPTIONS.get(base, metric)


class _Precomputed(nn.Module):
    """Hands torchmetrics features that were already extracted."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FidAgainst:
    """FID against fixed real features: the real statistics are computed once (torchmetrics
    keeps them across `reset()` with reset_real_features=False), each call adds a fake set."""

    def __init__(self, real: torch.Tensor):
        self.metric = FrechetInceptionDistance(
            feature=_Precomputed(real.shape[1]), reset_real_features=False
        ).double()
        self._update(real, real=True)

    def __call__(self, fake: torch.Tensor) -> float:
        self.metric.reset()
        self._update(fake, real=False)
        return float(self.metric.compute())

    def _update(self, features: torch.Tensor, real: bool) -> None:
        """In float64 a block at a time: FID keeps sums, so blocks give the same statistics without a
        float64 copy of the whole set (a 1M corpus's 99k holdout: 0.1 GB)."""
        for i in range(0, len(features), FID_BLOCK):
            self.metric.update(features[i : i + FID_BLOCK].double(), real=real)


# _let_go: a torchmetrics Metric sits in a reference cycle, so it and the features it stores stay
# alive until Python's cyclic collector runs. KID keeps the standardised copies of both sets: at 1M,
# five 99k-row copies (0.25 GB) were alive at once during the calibration. `reset()` empties them.


def kid(real: torch.Tensor, fake: torch.Tensor, subset_size: int, seed: int, subsets: int = 100) -> tuple[float, float]:
    """KID mean and std over random subsets (torchmetrics), reproducible by `seed`, on features
    standardised by `real`'s per-dimension mean and sd.

    The sd is floored at a tenth of the median sd of the dimensions that vary: a ReLU unit that
    fires on one real image in hundreds has a tiny sd, and dividing by it blew a handful of other
    real images up to KID 797 (against 0.55 for shifted digits) in CI."""
    mean, sd = real.mean(0), real.std(0)
    live = sd[sd > 1e-8]
    floor = 0.1 * float(live.median()) if len(live) else 1.0
    sd = torch.clamp(sd, min=floor)
    real, fake = (real - mean).div_(sd), (fake - mean).div_(sd)  # one copy each
    size = max(2, min(subset_size, len(real), len(fake)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subset_size=size, subsets=subsets)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with seeded(seed):  # KID draws its subsets from torch's global generator
        mean, std = metric.compute()
    metric.reset()  # see _let_go
    return float(mean), float(std)


def inception_score(logits: torch.Tensor, splits: int) -> tuple[float, float]:
    """Inception Score mean and std over `splits` (torchmetrics), from class logits."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=min(splits, len(logits)))
    metric.update(logits)
    with seeded(0):  # torchmetrics shuffles before splitting
        mean, std = metric.compute()
    metric.reset()  # see _let_go
    return float(mean), float(std)


@torch.no_grad()
def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int, chunk: int = 256) -> dict[str, float]:
    """Precision, recall, density and coverage of equal-sized real and fake feature sets.

    The definitions and the k-NN radii (each point its own 0th neighbour) are prdc's (Naeem et al.
    2020), and tests/unit/test_calibration_logic.py checks the values against prdc itself. They are
    computed here, in chunks of real rows with torch.cdist, because prdc hard-codes
    `pairwise_distances(n_jobs=8)`: inside a Prefect task, sklearn's worker threads then warn
    once per chunk, and it holds three full N x N float matrices (10,000 samples: 1.2 GB).
    """
    n = min(len(real), len(fake))  # `chunk` real rows a block: against 10,000 samples, 10 MB of distances
    real, fake = real[:n].float(), fake[:n].float()
    real_radii, fake_radii = knn_radii(real, k), knn_radii(fake, k)
    fake_inside = torch.zeros(n, dtype=torch.bool)  # inside some real image's k-NN ball
    fake_balls = torch.zeros(n)  # how many real balls each fake sample is inside
    real_recalled = torch.zeros(n, dtype=torch.bool)  # some fake ball holds this real image
    real_covered = torch.zeros(n, dtype=torch.bool)  # its own ball holds some fake sample
    for i in range(0, n, chunk):
        d = torch.cdist(real[i : i + chunk], fake)
        inside = d < real_radii[i : i + chunk, None]
        fake_inside |= inside.any(dim=0)
        fake_balls += inside.sum(dim=0)
        real_recalled[i : i + chunk] = (d < fake_radii[None]).any(dim=1)
        real_covered[i : i + chunk] = inside.any(dim=1)
    return {"precision": float(fake_inside.float().mean()), "recall": float(real_recalled.float().mean()),
            "density": float(fake_balls.mean() / k), "coverage": float(real_covered.float().mean()),
            "pr_samples": n}


@dataclass(frozen=True)
class Memorisation:
    """Each sample's distance to its nearest training image, in novelty units."""

    novelty: torch.Tensor  # (n_fake,)
    nearest_index: torch.Tensor  # index into the training set
    threshold: float

    @property
    def memorised(self) -> torch.Tensor:
        return self.novelty < self.threshold

    @property
    def share(self) -> float:
        return float(self.memorised.float().mean())


def memorisation(fake: torch.Tensor, train: torch.Tensor, unit: float, threshold: float) -> Memorisation:
    """Nearest training image of every sample, distances divided by `unit` (the median
    distance of a fresh real image to the training set)."""
    dist, idx = nearest(fake, train)
    return Memorisation(dist / unit, idx, threshold)


def suite(
    real: torch.Tensor, fake: torch.Tensor, fake_logits: torch.Tensor | None, *, kid_subset_size: int,
    is_splits: int, pr_neighbourhood: int, seed: int, real_train: torch.Tensor | None = None,
) -> dict[str, float | None]:
    """Every distribution metric of `fake` against `real` features; with `real_train` (real
    images other than `real`), the C2ST too: trained on real_train, scored on `real`."""
    kid_mean, kid_std = kid(real, fake, kid_subset_size, seed)
    out: dict[str, float | None] = {"fid": FidAgainst(real)(fake), "kid_mean": kid_mean, "kid_std": kid_std}
    if fake_logits is not None:
        out["inception_score"], out["inception_score_std"] = inception_score(fake_logits, is_splits)
    else:
        out["inception_score"] = out["inception_score_std"] = None  # an autoencoder has no classes
    out.update(precision_recall(real, fake, pr_neighbourhood))
    if real_train is not None:
        out.update(c2st(real_train, real, fake, seed=seed).as_metrics())
    return out
