"""score: judge any folder of images with the evaluation's judges, without training anything.

Another tool's output, a real set, an older curated batch: each image goes through clean's own
normalisation (mode, square crop, resolution), then the same extractor, reference, metrics,
C2ST, calibration ladder and memorisation check as `genloop evaluate`, against the current
data version. The report (default reports/score.json) has the same fields as eval.json, so two
folders, or a folder and a genloop generator, compare line by line.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from genloop.core.config import Params
from genloop.core.errors import GenloopError
from genloop.core.images import RejectedImage, normalise
from genloop.core.manifest import corpus_mode
from genloop.core.progress import Progress
from genloop.core.provenance import data_version
from genloop.core.storage import write_json_atomic
from genloop.core.workspace import Workspace
from genloop.eval.extractors import get_extractor
from genloop.eval.generator_eval import evaluate_generator
from genloop.eval.reference import load_reference
from genloop.stages.evaluate import calibrate, curation_score, memorisation_summary, rounded

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def read_folder(cfg: Params, ws: Workspace, folder: Path) -> tuple[np.ndarray, list[dict[str, str]], str]:
    """Every image under `folder` normalised as clean did the current data version (uint8 NHWC),
    the files it could not use with the reason, and a hash of the pixels (the evaluation cache key)."""
    if not folder.is_dir():
        raise GenloopError(f"{folder} is not a folder: give `genloop score` a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    mode = corpus_mode(ws.manifest)  # the data version's mode: the folder is judged against its images
    arrays, rejected = [], []
    digest = hashlib.sha256(f"{mode}{cfg.data.resolution}{cfg.data.background}".encode())
    c = cfg.clean
    with Progress("score: reading", len(files), "images") as bar:
        for path in files:
            try:
                norm = normalise(path.read_bytes(), mode=mode, resolution=cfg.data.resolution,
                                 max_pixels=c.max_pixels, min_side=c.min_side, blank_std=c.blank_std,
                                 background=cfg.data.background)
            except RejectedImage as exc:
                rejected.append({"file": str(path.relative_to(folder)), "reason": str(exc)})
            else:
                arrays.append(norm.pixels)
                digest.update(norm.pixel_hash.encode())
            bar.advance()
    if not arrays:
        raise GenloopError(f"{folder}: no usable image ({len(files)} image files, {len(rejected)} rejected"
                           f"{': ' + rejected[0]['reason'] if rejected else ''}); supported: "
                           f"{', '.join(sorted(IMAGE_SUFFIXES))}")
    return np.stack(arrays), rejected, digest.hexdigest()


def run(cfg: Params, ws: Workspace, folder: Path, out: Path | None = None) -> dict[str, Any]:
    """Score the images under `folder` against the current data version; write the report."""
    images, rejected, folder_sha = read_folder(cfg, ws, folder)
    extractor = get_extractor(cfg, ws)
    ref, train_set = load_reference(cfg, ws, extractor)
    started = time.perf_counter()
    result = evaluate_generator(cfg, ws, lambda n, seed: images, f"folder-{folder_sha}", extractor, ref,
                                train_set=train_set)
    metrics = dict(result.metrics) | {"curation_score": curation_score(cfg, ref, result.features)}
    _, readable = calibrate(cfg, ws, extractor, ref, train_set, metrics, result.features)
    report = {
        "folder": str(folder.resolve()),
        "n_images": len(images),
        "rejected": rejected,
        "data_version": data_version(ws),
        "extractor": extractor.describe(),
        "reference": ref.describe(),
        "n_real": len(ref.holdout),
        **rounded(metrics),
        "fid_real_floor": round(ref.floor["fid"], 6),
        "memorisation": memorisation_summary(cfg, result, ref) | {"per_sample": None},
        **readable,
        "seconds": round(time.perf_counter() - started, 3),
    }
    path = out or ws.reports / "score.json"
    write_json_atomic(path, report)
    for line in report.get("readable", []):
        log.info("score: %s", line)
    log.info("score: %d images from %s (%d rejected); report %s", len(images), folder, len(rejected), path)
    return report
