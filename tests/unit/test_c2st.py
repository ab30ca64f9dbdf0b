"""The classifier two-sample test and class consistency, on synthetic features with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from genloop.eval.c2st import c2st, delong_interval, pixels
from genloop.eval.metrics import LOWER_IS_BETTER
from genloop.eval.real_classifier import class_consistency, translate


def _gauss(n: int, seed: int, dim: int = 32, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * scale + shift


def test_two_draws_of_one_gaussian_are_indistinguishable():
    r = c2st(_gauss(600, 1), _gauss(400, 2), _gauss(800, 3), seed=0)
    assert abs(r.auc - 0.5) < 0.1
    assert r.auc_low < 0.5 < r.auc_high
    assert r.accuracy_low < 0.5 < r.accuracy_high
    assert r.as_metrics() == {"c2st_auc": r.auc, "c2st_auc_low": r.auc_low, "c2st_auc_high": r.auc_high,
                              "c2st_accuracy": r.accuracy}
    assert "c2st_auc" in LOWER_IS_BETTER


def test_noise_is_told_apart_from_real():
    real = _gauss(1000, 1)
    noise = torch.rand(800, 32, generator=torch.Generator().manual_seed(4)) * 6 - 3  # uniform, not Gaussian
    r = c2st(real[:600], real[600:], noise, seed=0)
    assert r.auc > 0.95 and r.auc_low > 0.9
    # the held-out fakes score low P(real), and they are the half the discriminator never saw
    assert float(r.fake_scores.mean()) < 0.2


def test_lost_spread_is_seen_not_only_a_shifted_mean():
    # mode dropping shrinks the spread with the mean unchanged: a linear probe on the features
    # alone sees nothing here; the squared features let the test see it
    r = c2st(_gauss(600, 1), _gauss(400, 2), _gauss(800, 5, scale=0.7), seed=0)
    assert r.auc > 0.9


def test_classes_are_balanced_and_the_fake_halves_disjoint():
    r = c2st(_gauss(1000, 1), _gauss(300, 2), _gauss(400, 3), seed=7)
    assert r.n_train == 200  # fake half A: 200 rows; real train subsampled to match
    assert r.n_test == 200  # real test 300, fake half B 200
    assert len(r.fake_scores) == len(r.fake_index) == 200
    assert len(set(r.fake_index.tolist())) == 200
    again = c2st(_gauss(1000, 1), _gauss(300, 2), _gauss(400, 3), seed=7)
    assert again.auc == r.auc and torch.equal(again.fake_index, r.fake_index)


def test_c2st_refuses_images_and_tiny_sets():
    with pytest.raises(ValueError, match="2-D"):
        c2st(torch.zeros(10, 1, 8, 8), torch.zeros(10, 64), torch.zeros(10, 64), seed=0)
    with pytest.raises(ValueError, match="at least 4 fake"):
        c2st(_gauss(10, 1), _gauss(10, 2), _gauss(3, 3), seed=0)


def test_pixels_downsample_and_flatten():
    images = torch.full((3, 1, 28, 28), 255, dtype=torch.uint8)
    images[:, :, :14] = 0
    x = pixels(images, size=16)
    assert x.shape == (3, 256)
    assert x.view(3, 16, 16)[0, :7].max() == 0 and x.view(3, 16, 16)[0, 9:].min() == 1


def test_delong_interval_agrees_with_a_bootstrap():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(300), np.zeros(300)]
    scores = np.r_[rng.normal(0.8, 1, 300), rng.normal(0, 1, 300)]
    low, high = delong_interval(labels, scores, 0.95)
    boots = []
    for _ in range(400):  # the AUC of a resample: the share of (positive, negative) pairs ranked right
        pos, neg = scores[rng.integers(0, 300, 300)], scores[rng.integers(300, 600, 300)]
        boots.append((pos[:, None] > neg[None, :]).mean())
    b_low, b_high = np.quantile(boots, [0.025, 0.975])
    assert low < roc_auc_score(labels, scores) < high
    assert abs(low - b_low) < 0.02 and abs(high - b_high) < 0.02


def test_class_consistency_counts_hits_with_a_wilson_interval():
    asked = torch.arange(100) % 10
    logits = torch.nn.functional.one_hot(asked, 10).float()
    logits[:20] = torch.nn.functional.one_hot((asked[:20] + 1) % 10, 10).float()  # 20 asked wrongly
    out = class_consistency(logits, asked)
    assert out["class_consistency"] == 0.8 and out["class_consistency_n"] == 100
    # Wilson score interval at 95 %, by its formula
    z, n, p = 1.959963984540054, 100, 0.8
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    assert out["class_consistency_low"] == pytest.approx(centre - half, abs=1e-9)
    assert out["class_consistency_high"] == pytest.approx(centre + half, abs=1e-9)
    perfect = class_consistency(torch.nn.functional.one_hot(asked, 10).float(), asked)
    assert perfect["class_consistency"] == 1.0 and perfect["class_consistency_high"] == 1.0
    assert perfect["class_consistency_low"] < 1.0


def test_class_consistency_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="logits"):
        class_consistency(torch.zeros(5, 10), torch.zeros(4, dtype=torch.long))


def test_translation_moves_each_image_by_at_most_the_shift():
    x = torch.zeros(64, 1, 12, 12)
    x[:, :, 6, 6] = 1.0
    moved = translate(x, 2, torch.Generator().manual_seed(0))
    where = moved[:, 0].flatten(1).argmax(1)
    rows, cols = where // 12, where % 12
    assert moved.sum(dim=(1, 2, 3)).eq(1).all()  # whole-pixel moves: the dot is kept, not smeared
    assert (rows - 6).abs().max() <= 2 and (cols - 6).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 10  # each image its own offset
