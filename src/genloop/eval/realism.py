"""The curation score: k-NN realism (Kynkäänniemi et al. 2019) as a percentile of unseen real images.

Raw realism ("Improved Precision and Recall Metric for Assessing Generative Models", NeurIPS
2019, section 5): for a feature f,

    R(f) = max over real training features r of radius_k(r) / ||f - r||

where radius_k(r) is the distance from r to its k-th nearest real neighbour, over the half of the
training features with the smallest radii (the paper's guard against outliers). R >= 1 means f lies
inside at least one real image's k-NN ball; the further f is from the real manifold, the smaller R.
R's scale depends on the extractor and the data, so `RealismScorer` reports its percentile: the
share of holdout real images (never trained on, scored against the same training manifold) whose
R is at most the sample's. An unseen real image therefore scores uniformly on [0, 1] (mean 0.5,
interquartile range 0.5); 0.1 reads "only 10 % of real unseen images look less real than this";
degraded or off-manifold images sit near 0. A copy of a training image scores 1.0 (optimize's
novelty check drops those).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from genloop.eval.distance_blocks import block_rows

# Hand-written on torch.cdist rather than prdc: prdc builds the full N x N real distance matrix in
# numpy (60,000 MNIST digits: 29 GB) and has no realism score; here the distances come in chunks of
# `_CHUNK` rows (fewer for a large N: genloop.eval.distance_blocks), so memory stays bounded. Each
# block's answer is written into one preallocated tensor, in place: a list of small per-block results
# left a live allocation in every freed block's place, and glibc's heap then grew by a block per block
# (a 1M corpus's 99k holdout rows against the realism bank: 2.1 -> 5.5 GB in 4 s).
_CHUNK = 512


@torch.no_grad()
def knn_radii(real: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each real feature to its k-th nearest other real feature."""
    if len(real) <= k:
        raise ValueError(f"the k-NN realism score needs more than k={k} real training images, got {len(real)}")
    # k + 1: each point is its own nearest neighbour at distance 0 (as prdc counts it)
    rows = block_rows(len(real), _CHUNK)
    out = torch.empty(len(real))
    for i in range(0, len(real), rows):
        out[i : i + rows] = torch.cdist(real[i : i + rows], real).topk(k + 1, dim=1, largest=False).values[:, k]
    return out


@torch.no_grad()
def knn_realism(feats: torch.Tensor, real: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """R(f) = max over real r of radius_k(r) / ||f - r|| for each row f of `feats` (larger: more real)."""
    rows = block_rows(len(real), _CHUNK)
    out = torch.empty(len(feats))
    for i in range(0, len(feats), rows):
        d = torch.cdist(feats[i : i + rows], real).clamp_min_(1e-12)
        torch.amax(torch.div(radii[None], d, out=d), dim=1, out=out[i : i + rows])
    return out


class RealismScorer:
    """Percentile realism against unseen real images: `scorer(feats)` is a tensor in [0, 1]."""

    def __init__(self, train_feats: torch.Tensor, holdout_feats: torch.Tensor, k: int = 3,
                 bank: int | None = None, seed: int = 0):
        """`bank`: build the manifold from at most this many training features (a seeded choice):
        its radii cost grows with the square of their number (89k: minutes; 1M: out of reach)."""
        if len(holdout_feats) == 0:
            raise ValueError("the realism percentile needs holdout images: the holdout split is empty")
        self.k = k
        train = train_feats.float()
        if bank is not None and len(train) > bank:
            train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:bank]]
        radii = knn_radii(train, k)
        # As the paper does: the half of the real images with the largest k-NN radii is left out, or a
        # few outliers with huge balls let far-off (heavily degraded) images read as real.
        keep = radii <= radii.median()
        self.train, self.radii = train[keep], radii[keep]
        self.holdout_realism = knn_realism(holdout_feats.float(), self.train, self.radii).sort().values

    def with_holdout(self, holdout_feats: torch.Tensor) -> RealismScorer:
        """The same training manifold (its radii are the costly part) against other unseen images:
        the calibration's bootstrap resamples the holdout."""
        other = copy.copy(self)
        other.holdout_realism = knn_realism(holdout_feats.float(), self.train, self.radii).sort().values
        return other

    def raw(self, feats: torch.Tensor) -> torch.Tensor:
        """Kynkäänniemi's R for each feature (unbounded; its scale depends on the extractor)."""
        return knn_realism(feats.float(), self.train, self.radii)

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        """The share of holdout images whose R is at most each feature's R: their empirical CDF,
        linearly interpolated between holdout values (off by < 1/n from the step function) and from
        0 at R = 0 to 1/n at the least real holdout image, so samples less real than every real
        image (a weak generator's whole batch) still keep their order instead of all scoring 0."""
        n = len(self.holdout_realism)
        xp = np.concatenate([[0.0], self.holdout_realism.numpy()])
        return torch.from_numpy(np.interp(self.raw(feats).numpy(), xp, np.arange(n + 1) / n)).float()


def interquartile_range(values: torch.Tensor) -> float:
    """Spread of a batch's scores: the 75th minus the 25th percentile (0.5 for unseen real images)."""
    if len(values) == 0:
        return float("nan")
    q = torch.quantile(values.float(), torch.tensor([0.25, 0.75]))
    return float(q[1] - q[0])


DEFINITION = (
    "realism: percentile of the sample's k-NN realism (Kynkaanniemi et al. 2019: max over training "
    "features r of radius_k(r) / distance to r) among unseen real holdout images scored the same way; "
    "unseen real images score uniformly on [0, 1] (mean 0.5, IQR 0.5), degraded images lower"
)

__all__ = ["DEFINITION", "RealismScorer", "interquartile_range", "knn_radii", "knn_realism"]
