"""DINOv2 and CLIP extractors really load from a local Hugging Face directory (tiny random models
written with save_pretrained), and evaluate.extractor=auto prefers dinov2 > clip > inception > domain."""

from __future__ import annotations

import pytest
import torch

from genloop.core.config import load_params
from genloop.core.errors import ConfigError
from genloop.core.workspace import Workspace
from genloop.eval.extractors import embed, get_extractor, standard_unavailable

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)


def _save(kind: str, path, seed: int = 0):
    """A randomly initialised model and its processor config, as `huggingface-cli download` leaves them."""
    torch.manual_seed(seed)
    if kind == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY))
        proc = transformers.BitImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                                              crop_size={"height": 224, "width": 224})
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY))
        proc = transformers.CLIPImageProcessor(crop_size={"height": 224, "width": 224})
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def _cfg(tmp_path, **weights):
    sets = [f"evaluate.{k}_weights={v}" for k, v in weights.items()]
    return load_params(None, [*sets, f"evaluate.inception_weights={tmp_path / 'no-inception.pth'}"])


def _digits() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(6, 1, 32, 32, generator=gen) * 255).to(torch.uint8)


@pytest.mark.parametrize("kind", ["dinov2", "clip"])
def test_pretrained_extractor_loads_local_weights_and_embeds(kind, tmp_path):
    path = _save(kind, tmp_path / kind)
    cfg = _cfg(tmp_path, **{kind: path})
    ex = get_extractor(cfg, Workspace.at(tmp_path / "ws"))
    assert ex.kind == kind and ex.accuracy is None and ex.module.num_features == 32
    assert ex.reason.startswith(f"evaluate.extractor=auto: standard {'DINOv2' if kind == 'dinov2' else 'CLIP'} "
                                f"weights found at {path}")
    images = _digits()
    feats, logits = ex.module.features_and_logits(images.float() / 255)
    assert feats.shape == (6, 32) and logits is None
    assert torch.allclose(embed(ex.module, images, batch=4), feats, atol=1e-5)  # batching does not change them
    assert (torch.cdist(feats, feats) + torch.eye(6)).min() > 1e-4  # different images, different features
    # the pooled CLS output of the model itself, on the processor's size and statistics
    net = getattr(transformers, {"dinov2": "Dinov2Model", "clip": "CLIPVisionModel"}[kind]).from_pretrained(path)
    x = torch.nn.functional.interpolate(images.float().div(255).expand(-1, 3, -1, -1), size=(224, 224),
                                        mode="bicubic", antialias=True).clamp(0, 1)
    proc = transformers.AutoImageProcessor.from_pretrained(path)
    x = (x - torch.tensor(proc.image_mean).view(1, 3, 1, 1)) / torch.tensor(proc.image_std).view(1, 3, 1, 1)
    extra = {"interpolate_pos_encoding": True} if kind == "clip" else {}
    with torch.no_grad():
        assert torch.allclose(net(pixel_values=x, **extra).pooler_output, feats, atol=1e-5)


def test_auto_prefers_dinov2_then_clip_and_fingerprints_the_weights(tmp_path):
    dino, clip = _save("dinov2", tmp_path / "dino"), _save("clip", tmp_path / "clip")
    ws = Workspace.at(tmp_path / "ws")
    both = get_extractor(_cfg(tmp_path, dinov2=dino, clip=clip), ws)
    assert both.kind == "dinov2"
    only_clip = get_extractor(_cfg(tmp_path, dinov2=tmp_path / "absent", clip=clip), ws)
    assert only_clip.kind == "clip"
    assert f"no dinov2 weights at {tmp_path / 'absent'}" in only_clip.reason
    other = get_extractor(_cfg(tmp_path, dinov2=_save("dinov2", tmp_path / "dino2", seed=1)), ws)
    assert other.fingerprint != both.fingerprint  # other weights: no cached statistics are shared


def test_chosen_pretrained_extractor_without_weights_is_a_config_error(tmp_path):
    cfg = load_params(None, ["evaluate.extractor=dinov2"])
    assert standard_unavailable(cfg, "dinov2") == "evaluate.dinov2_weights is not set (a local Hugging Face " \
                                                  "directory of the model)"
    with pytest.raises(ConfigError, match="evaluate.extractor=dinov2 but evaluate.dinov2_weights is not set"):
        get_extractor(cfg, Workspace.at(tmp_path / "ws"))
