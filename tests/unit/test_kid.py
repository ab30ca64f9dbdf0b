"""KID on standardised features: a nearly dead feature dimension must not dominate it."""

from __future__ import annotations

import pytest
import torch

from genloop.eval.metrics import kid


def _features(n: int, seed: int) -> torch.Tensor:
    return torch.relu(torch.randn(n, 32, generator=torch.Generator().manual_seed(seed)) + 0.5)


def test_a_unit_that_fires_once_in_the_real_set_does_not_swamp_kid() -> None:
    real, other = _features(400, 0), _features(400, 1)
    real[:, 0], other[:, 0] = 0.0, 0.0
    real[7, 0] = 0.01  # the unit fires faintly on one real image: sd ~ 5e-4
    other[:20, 0] = 0.5  # and a little more on a few images of another real sample
    shifted = _features(400, 2) + 1.0  # a genuinely different distribution
    same, _ = kid(real, other, subset_size=50, seed=0)
    different, _ = kid(real, shifted, subset_size=50, seed=0)
    assert same < 0.1 * different
    assert abs(same) < 0.5


def test_kid_is_reproducible_by_seed_and_leaves_the_global_generator_alone() -> None:
    real, fake = _features(200, 3), _features(200, 4) * 1.5
    state = torch.random.get_rng_state()
    first = kid(real, fake, subset_size=50, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())
    assert kid(real, fake, subset_size=50, seed=5) == first


def test_fid_fed_in_float64_blocks_reads_as_one_whole_update(monkeypatch) -> None:
    """FidAgainst feeds torchmetrics a block of rows at a time (no float64 copy of a 99k-row
    holdout); FID keeps sums, so the value must be the one a single whole-set update gives."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from genloop.eval import metrics

    gen = torch.Generator().manual_seed(3)
    real, fake = torch.randn(300, 6, generator=gen), torch.randn(200, 6, generator=gen) * 1.3 + 0.2
    whole = FrechetInceptionDistance(feature=metrics._Precomputed(6)).double()
    whole.update(real.double(), real=True)
    whole.update(fake.double(), real=False)
    monkeypatch.setattr(metrics, "FID_BLOCK", 64)  # 5 and 4 blocks
    blocked = metrics.FidAgainst(real)
    assert blocked(fake) == pytest.approx(float(whole.compute()), rel=1e-9)
    assert blocked(real) == pytest.approx(0.0, abs=1e-6)


def test_kid_lets_go_of_its_feature_copies_without_waiting_for_the_cyclic_collector() -> None:
    """A torchmetrics metric is in a reference cycle: without a reset its standardised copies of both
    sets outlive the call (five 99k-row copies at once in a 1M corpus's calibration)."""
    import gc

    from torchmetrics.image.kid import KernelInceptionDistance

    gc.collect()
    gc.disable()
    try:
        kid(_features(300, 5), _features(300, 6), subset_size=50, seed=0)
        held = [o for o in gc.get_objects() if type(o) is KernelInceptionDistance]
        assert held, "the metric is gone: no cycle left to guard against"
        assert all(not o.real_features and not o.fake_features for o in held)
    finally:
        gc.enable()
