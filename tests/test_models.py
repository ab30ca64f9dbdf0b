"""Model family contracts: shapes, conditioning, determinism, checkpoint loading."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from genloop.errors import GenloopError
from genloop.models import GeneratorSpec, family, load_generator, sample, save_generator

SMALL = {"latent_dim": 8, "g_width": 8, "d_width": 8}


@pytest.mark.parametrize("resolution,channels,classes", [(16, 1, []), (32, 3, ["a", "b", "c"]), (8, 1, ["x"])])
def test_dcgan_trains_a_step_and_samples_the_configured_shape(resolution, channels, classes):
    spec = GeneratorSpec("dcgan", resolution, channels, classes, SMALL)
    trainer = family("dcgan").Trainer(spec, lr=1e-3, beta1=0.5, device=torch.device("cpu"))
    real = torch.rand(4, channels, resolution, resolution) * 2 - 1
    labels = torch.tensor([i % len(classes) for i in range(4)]) if classes else None
    before = [p.clone() for p in trainer.generator.parameters()]
    losses = trainer.step(real, labels, contextlib.nullcontext)
    assert set(losses) >= {"loss_d", "loss_g"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.generator.parameters(), strict=True))
    images = sample(trainer.generator.eval(), spec, 5, seed=1)
    assert images.shape == (5, resolution, resolution, channels)
    assert images.dtype == np.uint8


def test_sampling_is_deterministic_per_seed_and_labels_pick_the_class():
    spec = GeneratorSpec("dcgan", 16, 1, ["0", "1"], SMALL)
    gen = family("dcgan").build_generator(spec).eval()
    a, b, c = sample(gen, spec, 6, seed=3), sample(gen, spec, 6, seed=3), sample(gen, spec, 6, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    only_one = sample(gen, spec, 4, seed=3, label="1")
    assert only_one.shape == (4, 16, 16, 1)
    with pytest.raises(GenloopError, match="not a class"):
        sample(gen, spec, 2, seed=0, label="7")


def test_generator_round_trips_through_a_state_dict(tmp_path):
    spec = GeneratorSpec("dcgan", 16, 1, [], SMALL)
    gen = family("dcgan").build_generator(spec).eval()
    save_generator(gen, spec, tmp_path / "g.pt")
    loaded, loaded_spec = load_generator(tmp_path / "g.pt")
    assert loaded_spec == spec
    assert np.array_equal(sample(gen, spec, 3, seed=9), sample(loaded, loaded_spec, 3, seed=9))
    # the weights file is a plain state dict: loadable with weights_only=True
    state = torch.load(tmp_path / "g.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_unknown_family_is_named():
    with pytest.raises(GenloopError, match="model.family='stylegan'"):
        family("stylegan")
