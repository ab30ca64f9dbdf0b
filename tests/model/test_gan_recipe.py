"""The DCGAN recipe for small corpora: DiffAugment, the losses, lazy R1, and the within-class
diversity judge that tells a collapsed generator from a varied one."""

from __future__ import annotations

import contextlib

import pytest
import torch

from genloop.core.config import DIFFAUGMENT_OPS, ConfigError, DCGANParams, load_params
from genloop.core.dataset import ImageSet
from genloop.core.errors import GenloopError
from genloop.eval import diversity
from genloop.eval.diversity import class_diversity, diversity_ratio, feature_spread, pixel_spread
from genloop.models import GeneratorSpec, family
from genloop.models.augment import OPS, diff_augment, parse_policy
from genloop.models.dcgan import Discriminator, d_loss, g_loss, mode_seeking_term, paired, r1_penalty

SMALL = {"latent_dim": 8, "g_width": 8, "d_width": 8}


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ramp(n: int = 4, channels: int = 1, side: int = 16) -> torch.Tensor:
    """Images whose every pixel differs from every other, in [-1, 1)."""
    x = torch.arange(n * channels * side * side, dtype=torch.float64).view(n, channels, side, side)
    return x / x.numel() * 2 - 1


# ---- DiffAugment ---------------------------------------------------------------------------------


def test_the_params_policy_names_are_the_ops_implemented():
    assert tuple(OPS) == DIFFAUGMENT_OPS
    assert parse_policy("translation,cutout") == ("translation", "cutout") and parse_policy("") == ()
    with pytest.raises(GenloopError, match="model.dcgan.augment.*blur"):
        parse_policy("translation,blur")
    with pytest.raises(ConfigError, match="model.dcgan.augment"):
        load_params(None, ["model.dcgan.augment=translation,flip"])
    assert DCGANParams(augment=" colour , cutout ").augment == "colour,cutout"


@pytest.mark.parametrize("ops", [("colour",), ("translation",), ("cutout",), ("colour", "translation", "cutout")])
@pytest.mark.parametrize("channels", [1, 3])
def test_diff_augment_keeps_the_shape_and_is_differentiable(ops, channels):
    x = _ramp(2, channels, 8).requires_grad_(True)
    out = diff_augment(x, ops, rng=_rng())
    assert out.shape == x.shape and out.dtype == x.dtype
    # the same draws every call (a fresh seeded generator): the analytic gradient matches finite differences
    assert torch.autograd.gradcheck(lambda t: diff_augment(t, ops, rng=_rng()), (x,), eps=1e-6, atol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.abs().sum() > 0


def test_translation_shifts_the_image_and_fills_with_black():
    x = _ramp(8)
    out = diff_augment(x, ("translation",), rng=_rng(1))
    assert not torch.equal(out, x)
    most = 2  # 1/8 of 16
    for img, moved in zip(x, out, strict=True):
        matches = []
        for dy in range(-most, most + 1):
            for dx in range(-most, most + 1):
                shifted = torch.full_like(img, -1.0)
                ys, xs = slice(max(dy, 0), 16 + min(dy, 0)), slice(max(dx, 0), 16 + min(dx, 0))
                yt, xt = slice(max(-dy, 0), 16 + min(-dy, 0)), slice(max(-dx, 0), 16 + min(-dx, 0))
                shifted[:, ys, xs] = img[:, yt, xt]
                matches.append(torch.equal(shifted, moved))
        assert sum(matches) == 1  # exactly one integer shift within 1/8 of the side explains it


def test_cutout_blanks_one_square_of_at_most_half_the_side():
    x = _ramp(8) * 0.5 + 0.6  # no pixel is 0 before the cutout
    out = diff_augment(x, ("cutout",), rng=_rng(2))
    assert not torch.equal(out, x)
    for img, cut in zip(x, out, strict=True):
        hole = cut != img
        assert hole.any() and bool((cut[hole] == 0).all())
        rows, cols = hole[0].any(dim=1).nonzero().flatten(), hole[0].any(dim=0).nonzero().flatten()
        assert rows.numel() <= 8 and cols.numel() <= 8  # half of 16
        assert int(hole.sum()) == rows.numel() * cols.numel()  # a rectangle: an 8 x 8 square clipped by the edges


def test_colour_leaves_saturation_out_for_grey_images():
    grey = _ramp(3, 1, 8)
    out = diff_augment(grey, ("colour",), rng=_rng(3))
    # brightness then contrast only: exactly two draws per image from the generator
    rng = _rng(3)
    b, c = (torch.rand(3, 1, 1, 1, generator=rng, dtype=torch.float32).double() for _ in range(2))
    shifted = grey + (b - 0.5)
    mean = shifted.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(out, (shifted - mean) * (c + 0.5) + mean)
    rgb = _ramp(3, 3, 8)
    coloured = diff_augment(rgb, ("colour",), rng=_rng(3))
    spread_in = (rgb - rgb.mean(dim=1, keepdim=True)).abs().mean(dim=(1, 2, 3))
    spread_out = (coloured - coloured.mean(dim=1, keepdim=True)).abs().mean(dim=(1, 2, 3))
    assert not torch.allclose(spread_in, spread_out)  # RGB does get its saturation changed


def test_an_op_with_probability_zero_or_no_ops_is_the_identity():
    x = _ramp(4)
    assert torch.equal(diff_augment(x, ("translation", "cutout"), p=0.0, rng=_rng()), x)
    assert torch.equal(diff_augment(x, (), rng=_rng()), x)
    half = diff_augment(x, ("cutout",), p=0.5, rng=_rng(4))
    touched = (half != x).flatten(1).any(dim=1)
    assert 0 < int(touched.sum()) < 4 or int(touched.sum()) in (0, 4)  # per-image draws, not all-or-nothing
    many = diff_augment(_ramp(64), ("cutout",), p=0.5, rng=_rng(5))
    share = float((many != _ramp(64)).flatten(1).any(dim=1).double().mean())
    assert 0.3 < share < 0.7


# ---- losses and R1 -------------------------------------------------------------------------------


def test_hinge_and_nonsaturating_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(d_loss("hinge", real, fake)) == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)
    assert float(g_loss("hinge", fake)) == pytest.approx(1.0)
    sp = torch.nn.functional.softplus
    assert float(d_loss("nonsaturating", real, fake)) == pytest.approx(float(sp(-real).mean() + sp(fake).mean()))
    assert float(g_loss("nonsaturating", fake)) == pytest.approx(float(sp(-fake).mean()))


def test_r1_penalty_is_positive_and_trains_the_discriminator():
    torch.manual_seed(0)
    d = Discriminator(8, 1, 16, 3)
    real, labels = torch.rand(4, 1, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 0])
    r1 = r1_penalty(d, real, labels, augment=lambda t: diff_augment(t, ("translation",), rng=_rng()))
    assert r1.ndim == 0 and float(r1.detach()) > 0 and r1.requires_grad
    r1.backward()
    grads = [p.grad for p in d.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_lazy_r1_is_applied_every_r1_every_steps_and_the_schedule_is_checkpointed():
    spec = GeneratorSpec("dcgan", 16, 1, ["0", "1"], {**SMALL, "r1_gamma": 1.0, "r1_every": 3, "augment": "cutout"})
    torch.manual_seed(0)
    trainer = family("dcgan").Trainer(spec, lr=1e-3, beta1=0.5, device=torch.device("cpu"))
    real, labels = torch.rand(4, 1, 16, 16) * 2 - 1, torch.tensor([0, 1, 0, 1])
    r1 = [float(trainer.step(real, labels, contextlib.nullcontext)["r1"]) for _ in range(7)]
    assert r1[0] > 0
    assert r1[1] == r1[2] == r1[0] and r1[4] == r1[5] == r1[3] != r1[0]  # recomputed at steps 0, 3, 6 only
    assert r1[6] != r1[3]
    assert int(trainer.discriminator.state_dict()["steps"]) == 7
    off = family("dcgan").Trainer(GeneratorSpec("dcgan", 16, 1, [], {**SMALL, "r1_gamma": 0.0}), lr=1e-3,
                                  beta1=0.5, device=torch.device("cpu"))
    assert "r1" not in off.step(real, None, contextlib.nullcontext)


def test_the_unconditional_gan_trains_with_the_recipe():
    spec = GeneratorSpec("dcgan", 16, 1, [], {**SMALL, "loss": "hinge", "augment": "colour,translation,cutout",
                                              "r1_gamma": 1.0, "r1_every": 1})
    torch.manual_seed(0)
    trainer = family("dcgan").Trainer(spec, lr=1e-3, beta1=0.5, device=torch.device("cpu"))
    assert trainer.generator.embed is None and trainer.discriminator.embed is None
    losses = trainer.step(torch.rand(4, 1, 16, 16) * 2 - 1, None, contextlib.nullcontext)
    assert all(torch.isfinite(v) for v in losses.values()) and float(losses["r1"]) > 0


def test_mode_seeking_pairs_same_class_samples_and_punishes_an_ignored_latent():
    assert paired(torch.tensor([3, 1, 4, 1, 5])).tolist() == [3, 1, 3, 1, 5]
    assert paired(None) is None
    z = torch.randn(8, 4, generator=_rng())
    varied = torch.rand(8, 1, 4, 4, generator=_rng(1)) * 2 - 1
    collapsed = varied[:1].expand(8, -1, -1, -1)
    assert float(mode_seeking_term(collapsed, z)) > 1e4  # 1 / (0 + eps)
    assert float(mode_seeking_term(varied, z)) < 10
    # twice the image difference for the same latent difference halves the term
    assert float(mode_seeking_term(varied * 0.5, z)) == pytest.approx(2 * float(mode_seeking_term(varied, z)), rel=1e-3)
    spec = GeneratorSpec("dcgan", 16, 1, ["0", "1", "2"], {**SMALL, "mode_seeking": 1.0})
    torch.manual_seed(0)
    trainer = family("dcgan").Trainer(spec, lr=1e-3, beta1=0.5, device=torch.device("cpu"))
    losses = trainer.step(torch.rand(6, 1, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 2, 1, 0]), contextlib.nullcontext)
    assert float(losses["mode_seeking"]) > 0 and not losses["mode_seeking"].requires_grad


# ---- class_diversity -----------------------------------------------------------------------------


def _classes(n: int, k: int = 3) -> list[str]:
    return [str(i % k) for i in range(n)]


def _draw(n: int, seed: int, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and pixel images from the same class-structured distribution: class centres
    far apart, each image a centre plus noise whose scale grows with the class."""
    g = _rng(seed)
    centres, pixel_centres = torch.randn(k, 16, generator=_rng(99)) * 10, torch.rand(k, 1, 8, 8, generator=_rng(98))
    idx = torch.arange(n) % k
    scale = (idx + 1).float()[:, None]
    feats = centres[idx] + torch.randn(n, 16, generator=g) * scale
    noise = torch.randn(n, 1, 8, 8, generator=g) * 0.05 * scale[:, :, None, None]
    images = ((pixel_centres[idx] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return feats, images


def test_class_diversity_is_about_one_for_real_against_real_and_near_zero_when_collapsed():
    real_f, real_x = _draw(600, seed=1)
    fake_f, fake_x = _draw(150, seed=2)
    same = class_diversity(fake_f, fake_x, _classes(150), real_f, real_x, _classes(600))
    assert same["class_diversity"] == pytest.approx(1.0, abs=0.05)
    assert same["class_diversity_pixels"] == pytest.approx(1.0, abs=0.1)
    # one image per class, repeated: no within-class spread at all
    first = {c: i for i, c in reversed(list(enumerate(_classes(150))))}
    pick = torch.tensor([first[c] for c in _classes(150)])
    collapsed = class_diversity(fake_f[pick], fake_x[pick], _classes(150), real_f, real_x, _classes(600))
    assert collapsed == {"class_diversity": 0.0, "class_diversity_pixels": 0.0}


def test_class_diversity_sees_collapse_that_whole_set_spread_hides():
    real_f, _ = _draw(600, seed=1)
    fake_f, _ = _draw(150, seed=2)
    first = {c: i for i, c in reversed(list(enumerate(_classes(150))))}
    collapsed = fake_f[torch.tensor([first[c] for c in _classes(150)])]
    # over the whole set the class centres still spread the samples out...
    assert diversity_ratio(feature_spread, collapsed, None, real_f, None) > 0.8
    # ...within each class nothing is left
    assert diversity_ratio(feature_spread, collapsed, _classes(150), real_f, _classes(600)) == 0.0


def test_spreads_and_left_out_classes():
    assert feature_spread(torch.tensor([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    assert pixel_spread(torch.tensor([[[[0]]], [[[2]]]], dtype=torch.uint8)) == pytest.approx(2 ** 0.5)
    real = torch.randn(10, 4, generator=_rng())
    # class "b" has a single generated sample: left out, so only class "a" counts
    one_b = diversity_ratio(feature_spread, real[:3], ["a", "a", "b"], real, ["a"] * 5 + ["b"] * 5)
    assert one_b == pytest.approx(feature_spread(real[:2]) / feature_spread(real[:5]))
    assert diversity_ratio(feature_spread, real[:1], ["a"], real, ["a"] * 10) is None


def test_diversity_metrics_match_generated_and_real_classes_by_name(monkeypatch, tmp_path):
    """The generator's class indices and the data's are matched by class name, not by index."""
    real_f, real_x = _draw(600, seed=1)
    names = ["zero", "one", "two"]
    train = ImageSet(real_x, torch.tensor([int(c) for c in _classes(600)]), names, [str(i) for i in range(600)])
    monkeypatch.setattr(diversity, "load_split", lambda ws, split, **_: train)
    fake_f, fake_x = _draw(150, seed=2)
    # the generator lists the same classes in another order: its index 0 is the data's "two"
    order = ["two", "zero", "one"]
    asked = torch.tensor([order.index(names[int(c)]) for c in _classes(150)])
    out = diversity.diversity_metrics(None, real_f, fake_f, fake_x, (asked, order))
    assert out["class_diversity"] == pytest.approx(1.0, abs=0.05)
    # read by index instead, every class would be compared with another class's spread: not ~1 everywhere
    shuffled = diversity.diversity_metrics(None, real_f, fake_f, fake_x, (asked, names))
    assert shuffled["class_diversity"] != pytest.approx(1.0, abs=0.05)
    unlabelled = ImageSet(real_x, None, [], train.ids)
    monkeypatch.setattr(diversity, "load_split", lambda ws, split, **_: unlabelled)
    whole = diversity.diversity_metrics(None, real_f, fake_f, fake_x, (asked, order))
    assert whole["class_diversity"] == pytest.approx(1.0, abs=0.05)  # whole sets: the same distribution
    assert diversity.diversity_metrics(None, real_f[:10], fake_f, fake_x, None) == {}  # features of another split
