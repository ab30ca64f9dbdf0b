"""Reference statistics: the real images every generator is compared with, as features.

The holdout split (set aside by `clean`, stable by image hash) is the real reference; the
train split is the bank for the memorisation check. Their features, the novelty unit and
the real-vs-real floor are cached under `.genloop/cache/reference/` by a key made of the
data version, the clean manifest's content hash, the extractor's kind and weights
fingerprint and the sample counts. Never by path: a new data version or a retrained
extractor always misses.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from genloop.core.config import Params
from genloop.core.dataset import ImageSet, load_split
from genloop.core.heap import release_free_heap
from genloop.core.provenance import data_version
from genloop.core.storage import atomic_path, sha256_bytes, sha256_file, write_text_atomic
from genloop.core.workspace import Workspace
from genloop.eval.embed_chunk import embed_split
from genloop.eval.extractors import Extractor, nearest, novelty_unit
from genloop.eval.metrics import KID_FEATURES, FidAgainst, kid
from genloop.models import load_torch_file

log = logging.getLogger(__name__)
# Holdout images whose nearest training image sets the novelty unit (a median) and the calibration's
# unseen-real memorisation share: a seeded choice of this many. All 99k against 844k training images
# at 1M was over 15 minutes of distance blocks on 2 cores. On the 100k corpus the median of 1,000
# holdout images had a relative sd of 0.95 % (200 draws), so about 0.3 % for 10,000.
NOVELTY_PROBE = 10_000
CACHE_FORMAT = "holdout-nearest"  # what the cached .pt holds beyond the features: a new format misses old entries


@dataclass(frozen=True)
class Reference:
    key: str
    holdout: torch.Tensor  # features of the real reference images
    train: torch.Tensor  # features of the training images (memorisation bank)
    holdout_nearest: torch.Tensor  # distances of (at most NOVELTY_PROBE) holdout images to their nearest training image
    train_ids: list[str]
    novelty_unit: float  # holdout_nearest's median
    floor: dict[str, float]  # FID/KID of real training images against the holdout
    cached: bool  # True when loaded from the cache

    def describe(self) -> dict[str, object]:
        return {"key": self.key, "n_holdout": len(self.holdout), "n_train": len(self.train),
                "novelty_unit": round(self.novelty_unit, 6), "cached": self.cached}


def reference_key(ws: Workspace, extractor: Extractor, n_holdout: int, n_train: int, n_samples: int) -> str:
    """The cache key: what the statistics depend on, never where files are."""
    parts = [data_version(ws), sha256_file(ws.manifest), extractor.kind, extractor.fingerprint,
             str(n_holdout), str(n_train), str(n_samples), KID_FEATURES,  # how the floor's KID is computed
             CACHE_FORMAT]
    return sha256_bytes("|".join(parts).encode())[:20]


def load_reference(cfg: Params, ws: Workspace, extractor: Extractor) -> tuple[Reference, ImageSet]:
    """The reference statistics for this data version and extractor (cached), plus the
    training images (the memorisation grid shows them beside their nearest samples)."""
    budget = cfg.evaluate.memory_budget_gb
    holdout_set = load_split(ws, "holdout", memory_budget_gb=0)  # the manifest only: read on a cache miss
    train_set = load_split(ws, "train", memory_budget_gb=budget)
    n_samples = cfg.evaluate.n_samples
    key = reference_key(ws, extractor, len(holdout_set), len(train_set), n_samples)
    path = ws.judge_cache / "reference" / f"{key}.pt"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        tensors = load_torch_file(path, "cached reference statistics", keys=("holdout", "train", "holdout_nearest"),
                                  fix="Delete it; the next evaluation recomputes it.")
        meta = json.loads(meta_path.read_text())
        log.info("reference statistics: cached (%s)", key[:8])
        ref = Reference(key, tensors["holdout"], tensors["train"], tensors["holdout_nearest"], meta["train_ids"],
                        meta["novelty_unit"], meta["floor"], cached=True)
        return ref, train_set
    # streamed when over the budget: chunks on parallel.engine; the holdout's images go once embedded
    holdout = embed_split(extractor, holdout_set.images if holdout_set.nbytes > budget * 1e9
                          else holdout_set.images[:], cfg.parallel)
    del holdout_set
    train = embed_split(extractor, train_set.images, cfg.parallel)
    floor_n = min(len(train), max(len(holdout), n_samples))
    kid_mean, _ = kid(holdout, train[:floor_n], cfg.evaluate.kid_subset_size, cfg.evaluate.seed)
    floor = {"fid": FidAgainst(holdout)(train[:floor_n]), "kid_mean": kid_mean, "n": floor_n}
    # once: the novelty unit and the calibration's memorisation check both read these distances (a
    # holdout of 100k against 900k training images is minutes of distance blocks on 2 cores)
    probe = holdout
    if len(holdout) > NOVELTY_PROBE:
        probe = holdout[torch.randperm(len(holdout), generator=torch.Generator().manual_seed(cfg.evaluate.seed))
                        [:NOVELTY_PROBE]]
    holdout_nearest, _ = nearest(probe, train)
    unit = novelty_unit(holdout_nearest)
    _save(path, {"holdout": holdout, "train": train, "holdout_nearest": holdout_nearest},
          {"train_ids": train_set.ids, "novelty_unit": unit, "floor": floor, "data_version": data_version(ws),
           "extractor": extractor.kind, "extractor_fingerprint": extractor.fingerprint})
    log.info("reference statistics: %d holdout, %d train images (%s)", len(holdout), len(train), key[:8])
    release_free_heap()  # the embedding pass's batches
    return Reference(key, holdout, train, holdout_nearest, train_set.ids, unit, floor, cached=False), train_set


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> None:
    """Tensors first, metadata last: the metadata's presence marks a complete entry."""
    with atomic_path(path) as tmp:
        torch.save(tensors, tmp)
    write_text_atomic(path.with_suffix(".json"), json.dumps(meta))
