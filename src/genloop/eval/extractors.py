"""Feature extractors for evaluation and curation, and nearest-neighbour distances.

Standard pretrained features are used when their weights are on disk, in this order of
preference: DINOv2 (FD-DINOv2) and CLIP's vision tower from local Hugging Face directories
(`evaluate.dinov2_weights`, `evaluate.clip_weights`; see eval/pretrained.py), then Inception
(torchmetrics' port of torch-fidelity's InceptionV3; `evaluate.inception_weights`, or
torch-fidelity's file in the torch hub cache). Otherwise genloop trains its own in-domain
extractor on the clean train split: a small CNN trained with SimCLR's contrastive loss on two
views of each image (eval/contrastive.py), plus a class head trained jointly when every image
has a label. The contrastive loss makes the features carry within-class variation, so that a
set which lost its diversity moves FID, not only one that lost sharpness. It is cached by data
version, so statistics from one data version are never reused for another. Every extractor has
a `fingerprint` (the hash of its weights) that keys cached statistics.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from genloop.core.config import Params
from genloop.core.dataset import ImageSet, load_split, to_unit
from genloop.core.errors import ConfigError, GenloopError
from genloop.core.manifest import corpus_mode
from genloop.core.progress import Progress
from genloop.core.provenance import data_version
from genloop.core.seeding import seeded
from genloop.core.storage import atomic_path, sha256_bytes, sha256_file, write_text_atomic
from genloop.core.workspace import Workspace
from genloop.eval import distance_blocks
from genloop.eval.contrastive import nt_xent, view
from genloop.eval.distance_blocks import block_rows
from genloop.eval.pretrained import PretrainedExtractor, pretrained_unavailable, weights_dir
from genloop.models import load_torch_file

log = logging.getLogger(__name__)


RECIPE = "contrastive-v1"  # part of the cache key: weights trained another way are never reused


class DomainExtractor(nn.Module):
    """A small CNN: 128-d features, a SimCLR projection head, and a class head when there are labels.

    Takes images as float in [0, 1] (N, C, H, W), as torchmetrics passes them with
    normalize=True.
    """

    num_features = 128
    projection = 64

    def __init__(self, channels: int, resolution: int, num_classes: int):
        super().__init__()
        self.channels, self.resolution, self.num_classes = channels, resolution, num_classes
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, 32, 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, 1, 1), nn.ReLU(True), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(128 * 16, self.num_features), nn.ReLU(True),
        )
        self.projector = nn.Sequential(  # SimCLR's g(): the loss acts on its output, features come before it
            nn.Linear(self.num_features, self.num_features), nn.BatchNorm1d(self.num_features), nn.ReLU(True),
            nn.Linear(self.num_features, self.projection),
        )
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else None
        # the training features' mean and spread: realism of unlabelled images is how typical their features are
        self.register_buffer("feat_mean", torch.zeros(self.num_features))
        self.register_buffer("feat_std", torch.ones(self.num_features))

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        if x.shape[1] != self.channels:  # torchmetrics probes with 3-channel dummies
            x = x.mean(dim=1, keepdim=True) if self.channels == 1 else x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear")
        return x * 2 - 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self._prep(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features and, for the classifier, its class logits (for the Inception Score)."""
        h = self.features(x)
        return h, (self.head(h) if self.head is not None else None)

    @torch.no_grad()
    def realism(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image score in [0, 1]: classifier confidence, or how typical the features are of the
        training images (exp(-z^2 / 2) of their mean squared z-score) when there are no labels."""
        h = self.features(x)
        if self.head is not None:
            return F.softmax(self.head(h), dim=1).max(dim=1).values
        z = (h - self.feat_mean) / self.feat_std
        return torch.exp(-0.5 * z.pow(2).mean(dim=1))


class InceptionExtractor(nn.Module):
    """Standard FID Inception (2048-d pool features, 1008 logits) from local weights."""

    num_features = 2048
    num_classes = 1008

    def __init__(self, weights: Path):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(weights),
        )

    @staticmethod
    def _prep(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats, logits = self.net._torch_fidelity_forward(self._prep(x))  # one pass, both outputs
        return feats.reshape(len(x), -1), logits.reshape(len(x), -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[0]


@dataclass(frozen=True)
class Extractor:
    module: DomainExtractor | InceptionExtractor | PretrainedExtractor
    kind: str  # "dinov2" | "clip" | "inception-v3" | "domain-classifier" | "domain-contrastive"
    path: Path
    data_version: str
    accuracy: float | None
    reason: str  # why this extractor was chosen
    fingerprint: str  # sha256 of the weights: part of every statistics cache key

    def describe(self) -> dict[str, object]:
        return {
            "name": self.kind,
            "path": str(self.path),
            "fingerprint": self.fingerprint,
            "data_version": self.data_version,
            "train_accuracy": self.accuracy,
            "features": self.module.num_features,
            "why": self.reason,
        }


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's file name


def inception_weights_path(cfg: Params) -> Path:
    """Where Inception weights are looked for: evaluate.inception_weights, else the torch hub cache."""
    if cfg.evaluate.inception_weights:
        return Path(cfg.evaluate.inception_weights).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def _inception_unavailable(cfg: Params) -> str | None:
    """Why standard Inception features cannot be used here (None when they can)."""
    weights = inception_weights_path(cfg)
    if not weights.is_file():
        return f"no Inception weights at {weights} (set evaluate.inception_weights to a local copy)"
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return "torch-fidelity (and torchvision) are not installed"
    return None


def _loss(module: DomainExtractor, x: torch.Tensor, y: torch.Tensor | None,
          gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """NT-Xent on two views of the batch, plus cross-entropy on both views when there are labels;
    and how many views the class head got right."""
    h = module.features(torch.cat([view(x, gen), view(x, gen)]))
    z = module.projector(h)
    loss = nt_xent(z[: len(x)], z[len(x):])
    if module.head is None or y is None:
        return loss, 0
    logits, y2 = module.head(h), y.repeat(2)
    return loss + F.cross_entropy(logits, y2), int((logits.argmax(1) == y2).sum())


@torch.no_grad()
def _set_feature_stats(module: DomainExtractor, images: torch.Tensor) -> None:
    module.eval()
    feats = embed(module, images)
    module.feat_mean.copy_(feats.mean(0))
    module.feat_std.copy_(feats.std(0).clamp_min(1e-4))


def _fit(module: DomainExtractor, data: ImageSet, epochs: int, seed: int) -> float | None:
    """Train on the clean split; the class head's accuracy on the last epoch's views (None without labels)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=2e-3)
    n, batch = len(data), 128
    steps = max(1, math.ceil(n / batch)) * epochs
    gen = torch.Generator().manual_seed(seed)
    correct = seen = 0
    module.train()
    with Progress("extractor", steps, "steps") as bar:
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, batch):
                idx = perm[i : i + batch]
                if len(idx) < 2:  # NT-Xent needs another image to contrast with
                    continue
                y = data.labels[idx] if data.labels is not None else None
                loss, right = _loss(module, data.images[idx].float() / 255.0, y, gen)
                if epoch == epochs - 1 and module.head is not None:
                    correct, seen = correct + right, seen + 2 * len(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.advance(loss=loss.item())
    _set_feature_stats(module, data.images)
    return correct / seen if seen else None


def domain_extractor(cfg: Params, ws: Workspace, reason: str = "evaluate.extractor=domain") -> Extractor:
    """The in-domain extractor for the current data version: loaded if cached, else trained."""
    version = data_version(ws)
    data = load_split(ws, "train", memory_budget_gb=0)  # the manifest only: a cached extractor reads no image
    channels = data.images.shape[1]
    # a bounded share of a large split: training time stays flat as the corpus grows
    data = data.subsample(cfg.evaluate.extractor_max_images, cfg.evaluate.seed)
    key = sha256_bytes(
        f"{version}|{sha256_file(ws.manifest)}|{cfg.data.resolution}|{corpus_mode(ws.manifest)}|"
        f"{cfg.evaluate.extractor_epochs}|{data.classes}|{len(data)}|{RECIPE}".encode()
    )[:16]
    path = ws.judge_cache / "extractors" / f"{key}.pt"
    with seeded(cfg.evaluate.seed):  # seeded initial weights: one data version, one extractor
        module = DomainExtractor(channels, cfg.data.resolution, len(data.classes))
    kind = "domain-classifier" if data.classes else "domain-contrastive"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        fix = "Delete it; the next evaluation retrains the extractor."
        state = load_torch_file(path, "cached extractor weights", fix=fix)
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise GenloopError(f"{path} (cached extractor weights) does not fit the extractor: "
                               f"{str(exc).splitlines()[0]}. {fix}") from None
        module.eval()
        accuracy = json.loads(meta_path.read_text()).get("train_accuracy")
        log.info("extractor: cached %s for data %s", kind, str(version)[:8])
        log.debug("extractor weights: %s", path)
    else:
        if data.nbytes <= cfg.evaluate.memory_budget_gb * 1e9:  # the training epochs read it from memory
            data = ImageSet(data.images[:], data.labels, data.classes, data.ids)
        accuracy = _fit(module, data, cfg.evaluate.extractor_epochs, seed=cfg.evaluate.seed)
        with atomic_path(path) as tmp:
            torch.save(module.state_dict(), tmp)
        write_text_atomic(meta_path, json.dumps({"kind": kind, "data_version": version,
                                                 "train_accuracy": accuracy, "train_images": len(data)}))
    return Extractor(module, kind, path, version, accuracy, reason, sha256_file(path)[:16])


STANDARD = ("dinov2", "clip", "inception")  # evaluate.extractor=auto's order of preference
NAMES = {"dinov2": "DINOv2", "clip": "CLIP", "inception": "Inception"}


def standard_unavailable(cfg: Params, kind: str) -> str | None:
    """Why a standard pretrained extractor ("dinov2", "clip", "inception") cannot be used (None: it can)."""
    return _inception_unavailable(cfg) if kind == "inception" else pretrained_unavailable(cfg, kind)


def _standard(cfg: Params, ws: Workspace, kind: str, reason: str) -> Extractor:
    if kind == "inception":
        path = inception_weights_path(cfg)
        return Extractor(InceptionExtractor(path), "inception-v3", path, data_version(ws), None, reason,
                         sha256_file(path)[:16])
    path = weights_dir(cfg, kind)
    module = PretrainedExtractor(kind, path)
    return Extractor(module, kind, path, data_version(ws), None, reason, module.fingerprint)


def get_extractor(cfg: Params, ws: Workspace) -> Extractor:
    """The evaluation extractor: the chosen standard one, or with "auto" the first of DINOv2, CLIP and
    Inception whose weights are local, else the in-domain one; `reason` says why."""
    choice = cfg.evaluate.extractor
    if choice == "domain":
        return domain_extractor(cfg, ws)
    why_not: list[str] = []
    for kind in STANDARD if choice == "auto" else (choice,):
        missing = standard_unavailable(cfg, kind)
        if missing is None:
            path = inception_weights_path(cfg) if kind == "inception" else weights_dir(cfg, kind)
            reason = "; ".join([f"evaluate.extractor={choice}: standard {NAMES[kind]} weights found at {path}",
                                *why_not])
            return _standard(cfg, ws, kind, reason)
        why_not.append(missing)
    if choice != "auto":
        raise ConfigError(f"evaluate.extractor={choice} but {why_not[0]}; "
                          "use evaluate.extractor=auto to fall back to the in-domain extractor")
    return domain_extractor(cfg, ws, reason="auto: " + "; ".join(why_not))


# Images per forward pass of an embedding. bench/embed_batch.py, 2 cores, 10,000 32-px RGB images
# through the domain extractor: 128 ran at 1.51x the rate of 512 with 88 against 184 MB of
# activations (the large batches' activations outgrow the caches).
EMBED_BATCH = 128


@torch.no_grad()
def embed(module: nn.Module, images: torch.Tensor, batch: int = EMBED_BATCH) -> torch.Tensor:
    """Features of uint8 NCHW images."""
    return embed_with_logits(module, images, batch)[0]


@torch.no_grad()
def embed_with_logits(
    module: nn.Module, images: torch.Tensor, batch: int = EMBED_BATCH
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features of uint8 NCHW images and the extractor's class logits (None without a classifier).

    Each batch's outputs are copied into tensors allocated once, not kept as a list of small
    per-batch results between the batches' large freed activations: the pattern that grew the heap
    by a block per block in `realism.knn_realism` (see there)."""
    feats: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    for i in range(0, len(images), batch):
        f, lg = module.features_and_logits(images[i : i + batch].float() / 255.0)
        if feats is None:
            feats = torch.empty(len(images), f.shape[1], device=f.device)
            logits = torch.empty(len(images), lg.shape[1], device=lg.device) if lg is not None else None
        feats[i : i + len(f)] = f
        if logits is not None and lg is not None:
            logits[i : i + len(lg)] = lg
    if feats is None:
        raise ValueError("no images to embed")
    return feats, logits


@torch.no_grad()
def nearest(query: torch.Tensor, bank: torch.Tensor, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to, and index of, each query feature's nearest neighbour in `bank` (the first on ties).

    The bank is taken BANK_ROWS rows at a time and the running minimum kept, so the extra memory is
    a block's, not a copy of the bank (see distance_blocks)."""
    best = torch.full((len(query),), math.inf, dtype=query.dtype)
    where = torch.zeros(len(query), dtype=torch.long)
    for start in range(0, len(bank), distance_blocks.BANK_ROWS):
        part = bank[start : start + distance_blocks.BANK_ROWS]
        rows = block_rows(len(part), batch)
        for i in range(0, len(query), rows):
            m = torch.cdist(query[i : i + rows], part).min(dim=1)
            closer = m.values < best[i : i + rows]  # strict: an earlier part keeps a tie
            best[i : i + rows] = torch.where(closer, m.values, best[i : i + rows])
            where[i : i + rows] = torch.where(closer, m.indices + start, where[i : i + rows])
    return best, where


def novelty_unit(holdout_nearest: torch.Tensor) -> float:
    """Median distance from a real unseen image to its nearest training image (`holdout_nearest`):
    the unit that makes novelty comparable across extractors (1.0 ~ as novel as fresh real data)."""
    return float(holdout_nearest.median().clamp_min(1e-8))


def novelty_scale(holdout_feats: torch.Tensor, train_feats: torch.Tensor) -> float:
    """`novelty_unit` of the holdout features' distances to their nearest training features."""
    return novelty_unit(nearest(holdout_feats, train_feats)[0])


def to_nchw_uint8(nhwc: torch.Tensor | object) -> torch.Tensor:
    t = torch.as_tensor(nhwc)
    return t.permute(0, 3, 1, 2).contiguous()


__all__ = ["Extractor", "DomainExtractor", "InceptionExtractor", "PretrainedExtractor", "get_extractor",
           "domain_extractor", "standard_unavailable", "embed",
           "embed_with_logits", "nearest", "novelty_scale", "novelty_unit", "to_nchw_uint8", "to_unit"]
