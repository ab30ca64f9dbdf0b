"""optimize: score the generated batch, drop near-copies of training images, keep the best.

Realism is the k-NN realism score of Kynkäänniemi et al. (2019) expressed as a percentile of
unseen real images (genloop.eval.realism): 0.5 is a typical real holdout image, 0.1 an image
less real-looking than 90 % of them, ~0 off the real manifold (blurred, noisy, garbled). It is
computed on the evaluation's feature extractor. Novelty is the distance to the nearest training
image in feature space, in units of the typical distance of an unseen real image (1.0 ~ as novel
as fresh real data, ~0 a copy). The curation score is realism_weight x realism + novelty_weight x
min(novelty, 1.5) / 1.5. Curated images and their scores land in outputs/curated/<model version>/
and, with `optimize.sink` set, in <sink>/<model version>/ (scores.parquet last, marking a complete
batch). reports/optimize.json also says how far realism spreads over the batch (`realism_spread`,
its interquartile range: 0.5 for real images, ~0 for a batch that all looks alike) and how well
the curation score agrees with reviewers' decisions (`agreement`, genloop.feedback.agreement).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from genloop.core.config import Params
from genloop.core.dataset import load_split
from genloop.core.errors import StageInputMissing
from genloop.core.grids import make_grid
from genloop.core.storage import atomic_dir, join_s3_uri, read_json, upload_dir, write_json_atomic
from genloop.core.workspace import Workspace
from genloop.eval.c2st import cross_fitted_realism
from genloop.eval.embed_chunk import embed_split
from genloop.eval.extractors import embed, get_extractor, nearest, novelty_scale
from genloop.eval.realism import DEFINITION, RealismScorer, interquartile_range
from genloop.feedback import agreement, tuning
from genloop.feedback.store import FeedbackError, FeedbackStore
from genloop.mlops import tracking

log = logging.getLogger(__name__)

C2ST_DEFINITION = ("realism: the image's P(real) from a C2ST discriminator (real training images vs the rest of "
                   "the batch, cross-fitted in two folds so no image is scored by a model that saw it)")


def combined_score(realism: np.ndarray, novelty: np.ndarray, w_real: float, w_novel: float) -> np.ndarray:
    """Weighted realism (a percentile in [0, 1]) plus novelty (capped at 1.5: past that, more novel is not
    better, scaled to [0, 1])."""
    return w_real * realism + w_novel * np.minimum(novelty, 1.5) / 1.5


def _latest_batch(ws: Workspace) -> tuple[str, Path, pd.DataFrame, list[np.ndarray]]:
    """The model version, folder, manifest and pixel arrays of the latest generated batch."""
    if not ws.report("generate").exists():
        raise StageInputMissing(f"{ws.report('generate')} not found: run `genloop generate` first")
    version = str(read_json(ws.report("generate"))["model_version"])
    src = ws.generated / version
    batch = pd.read_parquet(src / "manifest.parquet")
    return version, src, batch, [np.asarray(Image.open(src / f)) for f in batch["file"]]


def _score(cfg: Params, ws: Workspace, batch: pd.DataFrame,
           arrays: list[np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Realism, novelty (distance to the nearest training image in novelty units) and the combined
    score of every generated image, with which are near-copies and which are kept; the kept rows,
    best first; the extractor."""
    o = cfg.optimize
    images = torch.from_numpy(np.stack([a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in arrays]))
    extractor = get_extractor(cfg, ws)  # the evaluation's extractor: realism is judged as evaluation judges
    budget = cfg.evaluate.memory_budget_gb
    train_set = load_split(ws, "train", memory_budget_gb=budget)
    train_feats = embed_split(extractor, train_set.images, cfg.parallel)  # streamed: chunks on parallel.engine
    holdout_feats = embed_split(extractor, load_split(ws, "holdout", memory_budget_gb=budget).images, cfg.parallel)
    scale = novelty_scale(holdout_feats, train_feats)
    feats = embed(extractor.module, images)
    dist, idx = nearest(feats, train_feats)
    novelty = (dist / scale).numpy()
    bank, seed = cfg.evaluate.realism_bank, cfg.evaluate.seed
    realism = (RealismScorer(train_feats, holdout_feats, bank=bank, seed=seed)(feats) if o.realism == "knn"
               else cross_fitted_realism(train_feats, feats, seed=o.tune.seed)).numpy()
    scores = batch.assign(
        realism=realism,
        novelty=novelty,
        nearest_train_id=[train_set.ids[i] for i in idx.tolist()],
        score=combined_score(realism, novelty, o.realism_weight, o.novelty_weight),
    )
    scores["near_copy"] = scores["novelty"] < o.min_novelty
    kept = scores[~scores["near_copy"]].sort_values("score", ascending=False).head(o.keep)
    scores["kept"] = scores.index.isin(kept.index)
    return scores, kept, extractor.kind


def _write_curated(target: Path, src: Path, scores: pd.DataFrame, kept: pd.DataFrame,
                   arrays: list[np.ndarray]) -> None:
    """The kept images, every score and a grid of the best, published as one folder."""
    with atomic_dir(target) as tmp:
        for f in kept["file"]:
            shutil.copyfile(src / f, tmp / f)
        scores.to_parquet(tmp / "scores.parquet", index=False)
        if len(kept):
            grid_imgs = np.stack([arrays[i] if arrays[i].ndim == 3 else arrays[i][:, :, None]
                                  for i in kept.index[:80]])
            make_grid(grid_imgs, scale=2).save(tmp / "grid.png")


def _agreement(cfg: Params, ws: Workspace) -> dict[str, Any]:
    """How well the curation score agrees with reviewers, per reviewed model version and pooled."""
    try:
        records = FeedbackStore.open(cfg.feedback.store, ws).records()
    except FeedbackError as exc:
        log.warning("optimize: feedback store unreadable, no agreement figures: %s", exc)
        return {"problem": str(exc)}
    return agreement.report(records, ws, seed=cfg.optimize.tune.seed)


def _agreement_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The agreement figures as MLflow metrics: agreement.<version|pooled>.{auc,rating_spearman,decided,rated}."""
    entries = {**report.get("versions", {}), **({"pooled": report["pooled"]} if report.get("pooled") else {})}
    metrics: dict[str, float] = {}
    for name, entry in entries.items():
        metrics |= {f"agreement.{name}.{k}": entry[k] for k in ("decided", "rated")}
        metrics |= {f"agreement.{name}.{k}": entry[k]["value"] for k in ("auc", "rating_spearman") if entry[k]}
    return metrics


def run(cfg: Params, ws: Workspace) -> dict[str, Any]:
    """Curate the latest generated batch into outputs/curated/<version>/."""
    version, src, batch, arrays = _latest_batch(ws)
    scores, kept, extractor_kind = _score(cfg, ws, batch, arrays)
    target = ws.curated / version
    _write_curated(target, src, scores, kept, arrays)
    sink = join_s3_uri(cfg.optimize.sink, version) if cfg.optimize.sink else None
    uploaded = upload_dir(target, sink) if sink else []
    summary = {
        "model_version": version,
        "generated": len(scores),
        "near_copies_dropped": int(scores["near_copy"].sum()),
        "kept": len(kept),
        "folder": str(target),
        "mean_score_kept": round(float(kept["score"].mean()), 6) if len(kept) else None,
        "mean_realism_all": round(float(scores["realism"].mean()), 6),
        "realism_spread": round(interquartile_range(torch.as_tensor(scores["realism"].to_numpy())), 6),
        "realism_definition": (DEFINITION if cfg.optimize.realism == "knn" else C2ST_DEFINITION)
        + "; realism_spread: its interquartile range over the batch",
        "mean_novelty_all": round(float(scores["novelty"].mean()), 6),
        "extractor": extractor_kind,
        "sink": sink,
        "sink_objects": len(uploaded),
        "agreement": _agreement(cfg, ws),
    }
    with tracking.stage_run(ws, cfg, "optimize"):
        tracking.log_metrics({k: v for k, v in summary.items()
                              if isinstance(v, int | float) and not isinstance(v, bool)}
                             | _agreement_metrics(summary["agreement"]))
        if (target / "grid.png").exists():
            tracking.log_artifact(target / "grid.png", "curated")
        # this iteration becomes a trial of the tuning study; its proposal: reports/next_params.yaml
        summary["autotune"] = tuning.step(cfg, ws)
    write_json_atomic(ws.report("optimize"), summary)
    log.info("optimize: kept %d of %d (%d near-copies dropped) in %s",
             len(kept), len(scores), summary["near_copies_dropped"], target)
    return summary
