"""Evaluate one generator against the reference: samples, features, metrics, memorisation.

The evaluate stage runs it on the freshly trained generator; the promotion gate runs it on
the champion with the very same extractor, reference, sample count and seed, so the two
are compared on equal terms. Results are cached under `.genloop/cache/evals/` by (generator
weights hash, reference key, sample count, seed, metric settings, the classes asked for):
re-evaluating a champion on an unchanged data version costs nothing.

Besides the distribution metrics (genloop.eval.metrics, C2ST included: trained on the real
train split's features, scored on the holdout's), a conditional generator on labelled data
gets `class_consistency`: the share of its samples that an independent classifier of real
images (genloop.eval.real_classifier) assigns to the class asked for, with that classifier's
own holdout accuracy beside it as the ceiling a perfect generator would reach.
Every evaluation also gets `class_diversity` (genloop.eval.diversity): the samples' spread within
each class over the real training images' spread within it, which reads near 0 for a generator
that draws one image per class.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from genloop.core.config import Params
from genloop.core.dataset import ImageSet
from genloop.core.heap import release_free_heap
from genloop.core.storage import atomic_path, sha256_bytes, write_text_atomic
from genloop.core.workspace import Workspace
from genloop.eval.diversity import diversity_metrics
from genloop.eval.extractors import Extractor, embed_with_logits, to_nchw_uint8
from genloop.eval.metrics import KID_FEATURES, Memorisation, memorisation, suite
from genloop.eval.real_classifier import RECIPE, class_consistency, real_classifier
from genloop.eval.reference import Reference
from genloop.models import GeneratorSpec, class_labels, load_torch_file

log = logging.getLogger(__name__)

Sampler = Callable[[int, int], Any]  # (n, seed) -> uint8 NHWC images
Asked = Callable[[int], "tuple[torch.Tensor, list[str]] | None"]  # n -> (class asked per sample, class names)


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


C2ST_SETTINGS = "c2st:quadratic-logistic-v1"  # part of the cache key
DIVERSITY_SETTINGS = "class-diversity-v1"  # part of the cache key


def asked_classes(spec: GeneratorSpec, n: int) -> tuple[torch.Tensor, list[str]] | None:
    """What `genloop.models.sample(..., label=None)` asks a conditional generator for: the
    class index of each of `n` samples and the class names they index; None if unconditional."""
    labels = class_labels(spec, n, None)
    return None if labels is None else (labels, list(spec.classes))


def eval_key(cfg: Params, generator_sha256: str, ref: Reference, asked: bool = False) -> str:
    """The cache key; `asked`: whether class consistency was requested (the classes asked for
    follow from the generator, which `generator_sha256` names)."""
    e = cfg.evaluate
    settings = [generator_sha256, ref.key, e.n_samples, e.seed, e.kid_subset_size, e.is_splits,
                e.pr_neighbourhood, e.memorisation_threshold, KID_FEATURES, C2ST_SETTINGS, DIVERSITY_SETTINGS]
    if asked:
        settings += ["class-consistency", e.classifier_epochs, RECIPE]
    return sha256_bytes("|".join(map(str, settings)).encode())[:20]


def consistency_metrics(cfg: Params, ws: Workspace, images: torch.Tensor, asked_labels: torch.Tensor,
                        label_names: list[str] | None) -> dict[str, float]:
    """Class consistency of `images` asked for `asked_labels` (indices into `label_names`, or
    into the data's classes when None), and the judge's own holdout accuracy; empty for
    unlabelled data."""
    clf = real_classifier(cfg, ws)
    if clf is None:
        log.info("class consistency: the data has no labels; not computed")
        return {}
    asked = asked_labels.long()
    if label_names is not None:  # the generator's classes, by name, as the classifier's indices
        index = {c: i for i, c in enumerate(clf.classes)}
        mapped = torch.tensor([index.get(str(c), -1) for c in label_names], dtype=torch.long)
        asked = mapped[asked]
        keep = asked >= 0
        if not keep.all():
            log.warning("class consistency: %d samples were asked for classes the current data lacks; left out",
                        int((~keep).sum()))
        images, asked = images[keep], asked[keep]
    if len(asked) == 0:
        return {}
    out = class_consistency(clf.logits(images), asked)
    return out | {"real_classifier_holdout_accuracy": clf.holdout_accuracy}


def evaluate_generator(
    cfg: Params, ws: Workspace, sampler: Sampler, generator_sha256: str, extractor: Extractor, ref: Reference,
    asked: Asked | None = None, train_set: ImageSet | None = None,
) -> GeneratorEval:
    """Draw `evaluate.n_samples` images from `evaluate.seed` and score them (cached).

    `asked(n)`: the classes the sampler asks for (`lambda n: asked_classes(spec, n)`), called
    only on a cache miss, after sampling; with it, labelled data also gets class consistency.
    `train_set`: the train split when the caller holds it (`load_reference` returns it), so it is
    not read a second time.
    """
    e = cfg.evaluate
    path = ws.cache / "evals" / f"{eval_key(cfg, generator_sha256, ref, asked is not None)}.pt"
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
                    pr_neighbourhood=e.pr_neighbourhood, seed=e.seed, real_train=ref.train)
    classes = asked(len(images)) if asked is not None else None
    if classes is not None:
        metrics.update(consistency_metrics(cfg, ws, images, *classes))
    metrics.update(diversity_metrics(ws, ref.train, features, images, classes,
                                     memory_budget_gb=e.memory_budget_gb, train=train_set))
    mem = memorisation(features, ref.train, ref.novelty_unit, e.memorisation_threshold)
    tensors = {"images": images, "features": features, "novelty": mem.novelty, "nearest_index": mem.nearest_index}
    if logits is not None:
        tensors["logits"] = logits
    with atomic_path(path) as tmp:
        torch.save(tensors, tmp)
    write_text_atomic(meta_path, json.dumps({"metrics": metrics, "generator_sha256": generator_sha256,
                                             "reference": ref.key}))
    release_free_heap()  # sampling's and the judges' temporaries
    return GeneratorEval(generator_sha256, images, features, logits, metrics, mem, e.seed, cached=False)
