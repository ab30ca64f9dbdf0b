"""The self-supervised in-domain extractor: views that never smooth or add noise, a loss that
rewards matching views, and features that tell blurred images from sharp ones."""

from __future__ import annotations

import torch

from genloop.core.dataset import ImageSet
from genloop.eval import degrade
from genloop.eval.contrastive import nt_xent, view
from genloop.eval.extractors import DomainExtractor, _fit, embed
from genloop.eval.metrics import FidAgainst


def _shapes(n: int, seed: int) -> torch.Tensor:
    """n uint8 32x32 grey images, each a few bright rectangles with sharp edges on black."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, 32, 32, dtype=torch.uint8)
    for img in images:
        for _ in range(3):
            x0, y0 = torch.randint(0, 24, (2,), generator=gen).tolist()
            w, h = torch.randint(3, 9, (2,), generator=gen).tolist()
            img[0, y0 : y0 + h, x0 : x0 + w] = int(torch.randint(120, 256, (1,), generator=gen))
    return images


def test_views_move_and_erase_pixels_but_never_create_new_intensities():
    x = _shapes(64, 0).float() / 255
    v = view(x, torch.Generator().manual_seed(1))
    assert v.shape == x.shape and not torch.equal(v, x)
    erased = 0
    for src, out in zip(x, v, strict=True):  # nearest-neighbour crops and one flat erased patch: no blur, no noise
        new = out.flatten()[~torch.isclose(out.flatten()[:, None], src.unique()[None]).any(dim=1)]
        assert len(new.unique()) <= 1
        erased += len(new) > 0
    assert 0 < erased < len(x)  # some views are erased, not all


def test_nt_xent_is_lower_when_each_view_has_its_partner():
    z = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    partners = nt_xent(z, z + 0.05 * torch.randn_like(z))
    strangers = nt_xent(z, z[torch.roll(torch.arange(32), 1)])
    assert partners < strangers - 1.0


def test_contrastive_features_tell_blurred_from_sharp_and_score_realism():
    train = ImageSet(_shapes(64, 2), None, [], [str(i) for i in range(64)])
    module = DomainExtractor(channels=1, resolution=32, num_classes=0)
    assert _fit(module, train, epochs=2, seed=0) is None  # no labels: no accuracy
    sharp_a, sharp_b = _shapes(200, 3), _shapes(200, 4)
    fid = FidAgainst(embed(module, sharp_a))
    floor = fid(embed(module, sharp_b))
    blurred = fid(embed(module, degrade.apply(sharp_b, "blur", 1.0)))
    assert blurred > 3 * floor
    noise = (torch.rand(200, 1, 32, 32, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
    assert module.realism(sharp_b.float() / 255).median() > module.realism(noise.float() / 255).median()
