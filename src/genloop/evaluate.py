"""evaluate: FID and KID between generated and held-out real images, plus a memorisation
check (distance of each sample to its nearest training image).

Metrics come from torchmetrics with the feature extractor named in the report; offline it
is genloop's own in-domain extractor (see genloop.features). For scale, the report also
gives the FID of real training images against the holdout (`fid_real_floor`): a perfect
generator scores about that.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from genloop import tracking
from genloop.config import Params
from genloop.dataset import load_split
from genloop.features import (
    DomainExtractor,
    embed,
    get_extractor,
    nearest,
    novelty_scale,
    to_nchw_uint8,
)
from genloop.grids import make_grid
from genloop.models import load_generator, sample
from genloop.provenance import data_version
from genloop.storage import atomic_path, read_json, sha256_file, write_json_atomic
from genloop.workspace import Workspace

log = logging.getLogger(__name__)


def _batches(images: torch.Tensor, size: int = 500) -> list[torch.Tensor]:
    return [images[i : i + size].float() / 255.0 for i in range(0, len(images), size)]


def fid_kid(
    extractor: DomainExtractor, real: torch.Tensor, fake: torch.Tensor, kid_subset: int, seed: int
) -> dict[str, float]:
    """FID and KID (mean, std) of uint8 NCHW image sets through `extractor`."""
    torch.manual_seed(seed)  # KID draws random subsets
    fid = FrechetInceptionDistance(feature=extractor, normalize=True)
    subset = max(2, min(kid_subset, len(real), len(fake)))
    kid = KernelInceptionDistance(feature=extractor, normalize=True, subset_size=subset)
    for b in _batches(real):
        fid.update(b, real=True)
        kid.update(b, real=True)
    for b in _batches(fake):
        fid.update(b, real=False)
        kid.update(b, real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


def run(cfg: Params, ws: Workspace) -> dict[str, Any]:
    """Evaluate models/generator.pt against the holdout split; write reports/eval.json."""
    e = cfg.evaluate
    generator, spec = load_generator(ws.generator)
    holdout = load_split(ws, "holdout", classes=spec.classes or None)
    train_set = load_split(ws, "train", classes=spec.classes or None)
    extractor = get_extractor(cfg, ws)
    fake = to_nchw_uint8(sample(generator, spec, e.n_samples, seed=e.seed))
    real = holdout.images
    metrics = fid_kid(extractor.module, real, fake, e.kid_subset_size, e.seed)
    floor_n = min(len(train_set), max(len(real), e.n_samples))
    floor = fid_kid(extractor.module, real, train_set.images[:floor_n], e.kid_subset_size, e.seed)

    train_feats = embed(extractor.module, train_set.images)
    scale = novelty_scale(embed(extractor.module, real), train_feats)
    dist, idx = nearest(embed(extractor.module, fake), train_feats)
    novelty = dist / scale
    threshold = cfg.optimize.min_novelty
    closest = torch.argsort(novelty)[:8]
    pairs = torch.stack([fake[closest], train_set.images[idx[closest]]], dim=1).flatten(0, 1)
    pair_grid = make_grid(pairs.permute(0, 2, 3, 1).numpy(), columns=2, scale=3)
    sample_grid = make_grid(fake[:80].permute(0, 2, 3, 1).numpy(), columns=spec.num_classes or None, scale=2)

    report: dict[str, Any] = {
        "data_version": data_version(ws),
        "generator_sha256": sha256_file(ws.generator),
        "train_run_id": read_json(ws.report("train")).get("run_id") if ws.report("train").exists() else None,
        "extractor": extractor.describe(),
        "n_real": len(real),
        "n_fake": len(fake),
        "seed": e.seed,
        **{k: round(v, 6) for k, v in metrics.items()},
        "fid_real_floor": round(floor["fid"], 6),
        "kid_real_floor": round(floor["kid_mean"], 6),
        "memorisation": {
            "novelty_unit": round(scale, 6),
            "threshold": threshold,
            "share_below_threshold": round(float((novelty < threshold).float().mean()), 6),
            "median_novelty": round(float(novelty.median()), 6),
        },
    }
    with tracking.stage_run(ws, cfg, "evaluate") as run:
        tracking.log_metrics({
            "fid": metrics["fid"], "kid_mean": metrics["kid_mean"], "kid_std": metrics["kid_std"],
            "fid_real_floor": floor["fid"],
            "memorised_share": report["memorisation"]["share_below_threshold"],
        })
        tracking.tag_run({"genloop.extractor": extractor.kind})
        tracking.log_image(sample_grid, "eval/samples.png")
        tracking.log_image(pair_grid, "eval/closest_to_training.png")
        tracking.log_json(report, "eval/eval.json")
        report["run_id"] = run.info.run_id
    with atomic_path(ws.reports / "eval_samples.png") as tmp:
        sample_grid.save(tmp, format="PNG")
    write_json_atomic(ws.report("eval"), report)
    log.info("evaluate: FID %.3f (floor %.3f), KID %.4f±%.4f with %s",
             metrics["fid"], floor["fid"], metrics["kid_mean"], metrics["kid_std"], extractor.kind)
    return {k: report[k] for k in ("fid", "kid_mean", "kid_std", "fid_real_floor", "n_real", "n_fake")} | {
        "extractor": extractor.kind}
