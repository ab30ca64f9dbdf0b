"""Standard pretrained feature extractors from local Hugging Face weights: DINOv2 and CLIP.

FD-DINOv2 (the Fréchet distance in DINOv2 features) tracks human judgement of generated images
better than Inception's FID (Stein et al., 2023); CLIP's vision tower is the other common choice.
Both load with `transformers` (the optional `pretrained` extra) from a directory on disk only
(`from_pretrained(dir, local_files_only=True)`): evaluation never downloads. Images are resized
to the processor's crop size (224) and normalised with the processor's mean and std from the
directory's preprocessor_config.json; the features are the model's pooled output (the CLS token
after the final layer norm).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from genloop.core.config import Params
from genloop.core.errors import ConfigError
from genloop.core.storage import sha256_bytes, sha256_file

MODELS = {"dinov2": "Dinov2Model", "clip": "CLIPVisionModel"}  # transformers class per kind
PARAM = {"dinov2": "evaluate.dinov2_weights", "clip": "evaluate.clip_weights"}
WEIGHT_FILES = ("*.safetensors", "*.bin")


def weights_dir(cfg: Params, kind: str) -> Path | None:
    """The local directory the params name for `kind` ("dinov2" or "clip"), or None."""
    value = cfg.evaluate.dinov2_weights if kind == "dinov2" else cfg.evaluate.clip_weights
    return Path(value).expanduser() if value else None


def pretrained_unavailable(cfg: Params, kind: str) -> str | None:
    """Why the `kind` extractor cannot be used here (None when it can)."""
    path = weights_dir(cfg, kind)
    if path is None:
        return f"{PARAM[kind]} is not set (a local Hugging Face directory of the model)"
    if not (path / "config.json").is_file():
        return f"no {kind} weights at {path} ({PARAM[kind]}: a directory with config.json and the weights)"
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed (pip install 'genloop[pretrained]')"
    return None


def _processor_stats(path: Path) -> tuple[list[float], list[float], int]:
    """Mean, std and input side from the processor config that ships with the weights."""
    config = path / "preprocessor_config.json"
    if not config.is_file():
        raise ConfigError(f"{config} is missing: download the whole model repository into {path}, "
                          "not only its weights")
    try:
        proc = json.loads(config.read_text())
        crop = proc.get("crop_size", 224)
        side = int(crop["height"] if isinstance(crop, dict) else crop)
        return [float(v) for v in proc["image_mean"]], [float(v) for v in proc["image_std"]], side
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{config} does not hold image_mean, image_std and crop_size ({exc}): "
                          "download the model repository again") from None


def _fingerprint(path: Path) -> str:
    """Hash of the config and every weight file: part of every statistics cache key."""
    files = [path / "config.json"] + sorted(f for pattern in WEIGHT_FILES for f in path.glob(pattern))
    return sha256_bytes("|".join(f"{f.name}:{sha256_file(f)}" for f in files).encode())[:16]


class PretrainedExtractor(nn.Module):
    """DINOv2 or CLIP's vision tower: pooled features, no class logits (so no Inception Score)."""

    def __init__(self, kind: str, path: Path):
        super().__init__()
        import transformers

        self.kind = kind
        self.net = getattr(transformers, MODELS[kind]).from_pretrained(str(path), local_files_only=True).eval()
        mean, std, self.side = _processor_stats(path)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.num_features = int(self.net.config.hidden_size)
        self.fingerprint = _fingerprint(path)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(self.side, self.side), mode="bicubic", antialias=True, align_corners=False)
        return (x.clamp(0, 1) - self.mean) / self.std

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pixels = self._prep(x)
        extra = {"interpolate_pos_encoding": True} if self.kind == "clip" else {}  # DINOv2 always interpolates
        return self.net(pixel_values=pixels, **extra).pooler_output, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[0]
