"""The VAE's fitted latent prior: a Gaussian mixture over the training images' encodings, held
in the decoder's buffers, that sampling draws from instead of N(0, I)."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from genloop.models import GeneratorSpec, family, load_generator, sample, save_generator

vae = family("vae")
TINY = {"latent_dim": 4, "width": 8, "kl_warmup_steps": 2, "prior": "fitted", "prior_components": 3}


def _two_blob_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW 16x16 images of two kinds (a bright left half, a bright right half) and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.zeros(n, 1, 16, 16)
    images[labels == 0, :, :, :8] = 1.0
    images[labels == 1, :, :, 8:] = 1.0
    images = (images * 200 + torch.rand(n, 1, 16, 16, generator=g) * 55).to(torch.uint8)
    return images, labels


def _trained(spec: GeneratorSpec, images: torch.Tensor, labels: torch.Tensor | None, steps: int = 60) -> object:
    torch.manual_seed(0)
    trainer = vae.Trainer(spec, 1e-3, 0.5, torch.device("cpu"))
    for i in range(steps):
        idx = torch.arange(i * 16, i * 16 + 16) % len(images)
        real = images[idx].float() / 127.5 - 1
        trainer.step(real, None if labels is None else labels[idx], contextlib.nullcontext)
    return trainer


def _capture(gen: torch.nn.Module) -> list[torch.Tensor]:
    """Replace the decoder's forward by one that records the latents it is given."""
    seen: list[torch.Tensor] = []

    def forward(z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(z.detach().clone())
        return torch.zeros(len(z), 1, 16, 16)

    gen.forward = forward
    return seen


def test_until_fitted_the_prior_is_the_standard_normal():
    """Samples drawn during training (epoch grids) read the first latent_dim coordinates as N(0, I)."""
    spec = GeneratorSpec("vae", 16, 1, [], TINY)
    gen = vae.build_generator(spec).eval()
    assert vae.latent_shape(spec) == (5,)  # z and the component picker
    seen = _capture(gen)
    latent = torch.randn(7, 5)
    vae.generate(gen, spec, latent, None)
    assert torch.allclose(seen[0], latent[:, :4])


def test_the_mixture_picks_components_by_weight_and_shifts_and_scales_by_each():
    spec = GeneratorSpec("vae", 16, 1, [], {**TINY, "prior_components": 2, "prior_temperature": 0.5})
    gen = vae.build_generator(spec).eval()
    gen.prior_weight.copy_(torch.tensor([[0.25, 0.75]]))
    gen.prior_mean.copy_(torch.tensor([[[10.0, 0, 0, 0], [-10.0, 0, 0, 0]]]))
    gen.prior_scale.copy_(torch.stack([torch.eye(4), 2 * torch.eye(4)])[None])
    seen = _capture(gen)
    latent = torch.randn(20_000, 5, generator=torch.Generator().manual_seed(0))
    vae.generate(gen, spec, latent, None)
    z = seen[0]
    first = z[:, 0] > 0
    assert first.float().mean().item() == pytest.approx(0.25, abs=0.02)
    # component 1: mean 10, scale 1 x temperature 0.5; component 2: mean -10, scale 2 x 0.5
    assert z[first, 0].mean().item() == pytest.approx(10.0, abs=0.05)
    assert z[first, 1].std().item() == pytest.approx(0.5, abs=0.03)
    assert z[~first, 0].mean().item() == pytest.approx(-10.0, abs=0.05)
    assert z[~first, 1].std().item() == pytest.approx(1.0, abs=0.03)


def test_finish_fits_one_mixture_per_class_where_the_encodings_lie():
    images, labels = _two_blob_images(400)
    spec = GeneratorSpec("vae", 16, 1, ["left", "right"], TINY)
    trainer = _trained(spec, images, labels)
    gen = trainer.generator.eval()
    fitted = vae.finish(trainer, gen, images, labels, seed=0)
    assert fitted["encodings"] == 400
    # 200 encodings per class, at least 2 x latent_dim = 8 per component: all 3 components
    assert fitted["components"] == [3, 3]
    assert torch.allclose(gen.prior_weight.sum(1), torch.ones(2))
    mu = vae._encode(trainer.encoder, images, labels)
    for c in range(2):
        mix_mean = (gen.prior_weight[c, :, None] * gen.prior_mean[c]).sum(0)
        assert torch.allclose(mix_mean, mu[labels == c].mean(0), atol=1e-3)
    # a class with a handful of images gets one component
    few = torch.cat([torch.nonzero(labels == 0)[:100, 0], torch.nonzero(labels == 1)[:5, 0]])
    assert vae.finish(trainer, gen, images[few], labels[few], seed=0)["components"] == [3, 1]


def test_unconditional_models_fit_one_mixture_for_the_corpus_and_it_survives_a_save(tmp_path):
    images, _ = _two_blob_images(300)
    spec = GeneratorSpec("vae", 16, 1, [], TINY)
    trainer = _trained(spec, images, None)
    gen = trainer.generator.eval()
    assert vae.finish(trainer, gen, images, None)["components"] == [3]
    save_generator(gen, spec, tmp_path / "g.pt")
    loaded, loaded_spec = load_generator(tmp_path / "g.pt")
    assert torch.equal(loaded.prior_mean, gen.prior_mean)
    assert np.array_equal(sample(gen, spec, 8, seed=3), sample(loaded, loaded_spec, 8, seed=3))


def test_a_generator_saved_before_the_fitted_prior_still_loads_and_samples_from_the_normal(tmp_path):
    """A spec without the `prior` key (written by an older genloop) rebuilds a decoder without
    prior buffers and draws z from N(0, I), so registered models keep working."""
    old_hp = {"latent_dim": 4, "width": 8, "beta": 1.0, "kl_warmup_steps": 2, "lr": 1e-3}
    spec = GeneratorSpec("vae", 16, 1, [], old_hp)
    gen = vae.build_generator(spec).eval()
    assert not hasattr(gen, "prior_mean")
    save_generator(gen, spec, tmp_path / "g.pt")
    assert "prior" not in json.loads((tmp_path / "g.json").read_text())["hparams"]
    loaded, loaded_spec = load_generator(tmp_path / "g.pt")
    assert vae.latent_shape(loaded_spec) == (4,)
    assert np.array_equal(sample(gen, spec, 4, seed=1), sample(loaded, loaded_spec, 4, seed=1))


def test_the_fitted_prior_draws_samples_nearer_the_training_images_than_the_normal():
    """On two-kind images a briefly trained VAE decodes N(0, I) latents into blends more often
    than latents from the fitted mixture; measured as the distance to the nearest training image."""
    images, labels = _two_blob_images(400)
    spec = GeneratorSpec("vae", 16, 1, [], TINY)
    trainer = _trained(spec, images, None, steps=150)
    gen = trainer.generator.eval()
    normal = sample(gen, spec, 200, seed=5)
    vae.finish(trainer, gen, images, None)
    fitted = sample(gen, spec, 200, seed=5)
    real = images.permute(0, 2, 3, 1).reshape(len(images), -1).float()

    def nearest(x: np.ndarray) -> float:
        flat = torch.from_numpy(x).reshape(len(x), -1).float()
        return torch.cdist(flat, real).min(1).values.mean().item()

    assert nearest(fitted) < nearest(normal)


def test_auto_components_are_four_per_class_and_sixteen_for_an_unlabelled_corpus():
    auto = {**TINY, "prior_components": "auto"}
    assert vae.build_generator(GeneratorSpec("vae", 16, 1, ["a", "b"], auto)).prior_weight.shape == (2, 4)
    assert vae.build_generator(GeneratorSpec("vae", 16, 1, [], auto)).prior_weight.shape == (1, 16)
