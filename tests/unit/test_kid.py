"""KID on standardised features: a nearly dead feature dimension must not dominate it."""

from __future__ import annotations

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
