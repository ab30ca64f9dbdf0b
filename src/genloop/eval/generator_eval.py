"""Evaluate one generator against the reference: samples, features, metrics, memorisation.

The evaluate stage runs it on the freshly trained generator; the promotion gate runs it on
the champion with the very same extractor, reference, sample count and seed, so the two
are compared on equal terms. Results are cached under `.genloop/cache/evals/` by (generator
weights hash, reference key, sample count, seed, metric settings): re-evaluating a
champion on an unchanged data version costs nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from genloop.core.config import Params
from genloop.core.storage import atomic_path, sha256_bytes, write_text_atomic
from genloop.core.workspace import Workspace
from genloop.eval.extractors import Extractor, embed_with_logits, to_nchw_uint8
from genloop.eval.metrics import Memorisation, memorisation, suite
from genloop.eval.reference import Reference
from genloop.models import load_torch_file

log = logging.getLogger(__name__)

Sampler = Callable[[int, int], Any]  # (n, seed) -> uint8 NHWC images


@dataclass(frozen=True)
class GeneratorEval:
    generator_sha256: str
    images: torch.Tensor  # uint8 NCHW, drawn from `seed`
    features: torch.Tensor
    logits: torch.Tensor | None
    metrics: dict[str, float | None]
    memorisation: Memorisation
    seed: int
    cached: bool


def eval_key(cfg: Params, generator_sha256: str, ref: Reference) -> str:
    e = cfg.evaluate
    settings = [generator_sha256, ref.key, e.n_samples, e.seed, e.kid_subset_size, e.is_splits,
                e.pr_neighbourhood, e.memorisation_threshold]
    return sha256_bytes("|".join(map(str, settings)).encode())[:20]


def evaluate_generator(
    cfg: Params, ws: Workspace, sampler: Sampler, generator_sha256: str, extractor: Extractor, ref: Reference
) -> GeneratorEval:
    """Draw `evaluate.n_samples` images from `evaluate.seed` and score them (cached)."""
    e = cfg.evaluate
    path = ws.cache / "evals" / f"{eval_key(cfg, generator_sha256, ref)}.pt"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        t = load_torch_file(path, "cached evaluation", keys=("images", "features", "novelty", "nearest_index"),
                            fix="Delete it; the next evaluation recomputes it.")
        metrics = json.loads(meta_path.read_text())["metrics"]
        mem = Memorisation(t["novelty"], t["nearest_index"], e.memorisation_threshold)
        log.info("evaluation of %s: cache hit", generator_sha256[:12])
        return GeneratorEval(generator_sha256, t["images"], t["features"], t.get("logits"), metrics, mem, e.seed,
                             cached=True)
    images = to_nchw_uint8(sampler(e.n_samples, e.seed))
    features, logits = embed_with_logits(extractor.module, images)
    metrics = suite(ref.holdout, features, logits, kid_subset_size=e.kid_subset_size, is_splits=e.is_splits,
                    pr_neighbourhood=e.pr_neighbourhood, seed=e.seed)
    mem = memorisation(features, ref.train, ref.novelty_unit, e.memorisation_threshold)
    tensors = {"images": images, "features": features, "novelty": mem.novelty, "nearest_index": mem.nearest_index}
    if logits is not None:
        tensors["logits"] = logits
    with atomic_path(path) as tmp:
        torch.save(tensors, tmp)
    write_text_atomic(meta_path, json.dumps({"metrics": metrics, "generator_sha256": generator_sha256,
                                             "reference": ref.key}))
    return GeneratorEval(generator_sha256, images, features, logits, metrics, mem, e.seed, cached=False)
