"""evaluate: score models/generator.pt against the held-out real images.

Metrics: FID, KID (mean ± std), Inception Score (from the extractor's class logits) and
precision/recall/density/coverage, all from the named feature extractor (see
genloop.eval.extractors and genloop.eval.metrics). For scale, `fid_real_floor` is the FID of real
training images against the holdout: a perfect generator scores about that.

Memorisation: every sample's distance to its nearest training image, in novelty units
(1.0 ~ as far as a fresh real image is), goes to reports/memorisation.csv; the share below
`evaluate.memorisation_threshold` is in the report and the closest pairs are logged as a
grid. Each evaluation also appends a row to reports/eval_history.csv, the metric curves
across loop iterations (dvc plots, and `history_*` metrics of the MLflow run).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pandas as pd
import torch

from genloop.core.config import Params
from genloop.core.dataset import ImageSet
from genloop.core.grids import make_grid
from genloop.core.provenance import data_version
from genloop.core.storage import atomic_path, read_json, sha256_file, write_json_atomic
from genloop.core.workspace import Workspace
from genloop.eval import calibration, calibration_report
from genloop.eval import history as eval_history
from genloop.eval.calibration import Calibration
from genloop.eval.extractors import Extractor, get_extractor
from genloop.eval.generator_eval import GeneratorEval, asked_classes, evaluate_generator
from genloop.eval.metrics import DESCRIPTIONS, describe
from genloop.eval.realism import RealismScorer
from genloop.eval.reference import Reference, load_reference
from genloop.mlops import tracking
from genloop.models import load_generator, sample

log = logging.getLogger(__name__)

def rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def _memorisation_table(result: GeneratorEval, train_ids: list[str]) -> pd.DataFrame:
    mem = result.memorisation
    return pd.DataFrame({
        "sample": range(len(mem.novelty)),
        "seed": result.seed,
        "novelty": mem.novelty.numpy().round(6),
        "nearest_train_id": [train_ids[i] for i in mem.nearest_index.tolist()],
        "memorised": mem.memorised.numpy(),
    })


def closest_pairs_grid(result: GeneratorEval, train_images: torch.Tensor, pairs: int = 8) -> Any:
    """The samples nearest to a training image, each beside that training image."""
    mem = result.memorisation
    closest = torch.argsort(mem.novelty)[:pairs]
    tiles = torch.stack([result.images[closest], train_images[mem.nearest_index[closest]]], dim=1).flatten(0, 1)
    return make_grid(tiles.permute(0, 2, 3, 1).numpy(), columns=2, scale=3)


def memorisation_summary(cfg: Params, result: GeneratorEval, ref: Reference) -> dict[str, Any]:
    mem = result.memorisation
    return {
        "novelty_unit": round(ref.novelty_unit, 6),
        "threshold": cfg.evaluate.memorisation_threshold,
        "share_below_threshold": round(mem.share, 6),
        "n_memorised": int(mem.memorised.sum()),
        "median_novelty": round(float(mem.novelty.median()), 6),
        "per_sample": "reports/memorisation.csv",
    }


def _report(cfg: Params, ws: Workspace, result: GeneratorEval, ref: Reference, extractor: Extractor,
            generator_sha: str, seconds: float) -> dict[str, Any]:
    """reports/eval.json: the metrics, their real floor, the extractor and reference, memorisation."""
    return {
        "data_version": data_version(ws),
        "generator_sha256": generator_sha,
        "train_run_id": read_json(ws.report("train")).get("run_id") if ws.report("train").exists() else None,
        "extractor": extractor.describe(),
        "reference": ref.describe(),
        "n_real": len(ref.holdout),
        "n_fake": len(result.features),
        "seed": cfg.evaluate.seed,
        **rounded(result.metrics),
        "fid_real_floor": round(ref.floor["fid"], 6),
        "kid_real_floor": round(ref.floor["kid_mean"], 6),
        "memorisation": memorisation_summary(cfg, result, ref),
        "seconds": round(seconds, 3),
    }


def curation_score(cfg: Params, ref: Reference, features: torch.Tensor) -> float:
    """The mean curation score (optimize's realism percentile) of a set of features."""
    e = cfg.evaluate
    scorer = RealismScorer(ref.train, ref.holdout, k=e.pr_neighbourhood, bank=e.realism_bank, seed=e.seed)
    return float(scorer(features).mean())


def calibrate(cfg: Params, ws: Workspace, extractor: Extractor, ref: Reference, train_set: ImageSet,
              metrics: dict[str, Any], features: torch.Tensor) -> tuple[Calibration | None, dict[str, Any]]:
    """The ladder (cached per data version and extractor), the gate's metric, and where this
    evaluation (`metrics` of the samples' `features`) sits on the ladder: the part of eval.json that
    makes the numbers readable."""
    cal = (calibration.load_or_compute(cfg, ws, extractor, ref, train_set)
           if cfg.evaluate.calibration.enabled else None)
    name, why = calibration.choose_gate_metric(cfg, cal)
    out: dict[str, Any] = {"gate_metric": {"name": name, "why": why},
                           "definitions": {m: describe(m) for m in metrics if m in DESCRIPTIONS}}
    if cal is not None:
        out["calibration"] = calibration_report.write(cal, (name, why), ws.reports, train_set.images)
        placed, judged = calibration.at_ladder_size(cfg, cal, ref, features, metrics)
        out["ladder_position"] = calibration_report.positions(cal, placed)
        out["readable"] = calibration_report.readable(cal, placed, name, judged if judged < len(features) else None)
        if judged < len(features):
            out["ladder_position_samples"] = judged
    return cal, out


def _log_run(ws: Workspace, cfg: Params, report: dict[str, Any], result: GeneratorEval, ref: Reference,
             extractor: Extractor, history: pd.DataFrame, grids: dict[str, Any], cal: Calibration | None) -> str:
    """The evaluate run in MLflow: metrics, the curves across iterations, tags, grids; its run id."""
    with tracking.stage_run(ws, cfg, "evaluate") as run:
        tracking.log_metrics({k: v for k, v in result.metrics.items() if v is not None} | {
            "fid_real_floor": ref.floor["fid"], "memorised_share": result.memorisation.share,
            "eval_seconds": report["seconds"]})
        for _, row in history.iterrows():  # the curves across loop iterations, in one run
            tracking.log_metrics({f"history_{k}": row[k] for k in eval_history.HISTORY_METRICS
                                  if k in row and pd.notna(row[k])},
                                 step=int(row["iteration"]))
        tracking.tag_run({"genloop.extractor": extractor.kind, "genloop.extractor_fingerprint": extractor.fingerprint,
                          "genloop.reference_key": ref.key})
        for name, grid in grids.items():
            tracking.log_image(grid, f"eval/{name}.png")
        tracking.log_artifact(ws.reports / "memorisation.csv", "eval")
        tracking.log_artifact(ws.reports / "eval_history.png", "eval")
        if cal is not None:
            calibration_report.log(cal, ws.reports)
            tracking.tag_run({"genloop.readable": " | ".join(report["readable"])[:4000]})
        tracking.log_json(report, "eval/eval.json")
        return run.info.run_id


def run(cfg: Params, ws: Workspace) -> dict[str, Any]:
    """Evaluate models/generator.pt against the holdout split; write reports/eval.json."""
    generator, spec = load_generator(ws.generator)
    extractor = get_extractor(cfg, ws)
    ref, train_set = load_reference(cfg, ws, extractor)
    generator_sha = sha256_file(ws.generator)
    started = time.perf_counter()
    result = evaluate_generator(cfg, ws, lambda n, seed: sample(generator, spec, n, seed), generator_sha,
                                extractor, ref, asked=lambda n: asked_classes(spec, n), train_set=train_set)
    metrics = dict(result.metrics) | {"curation_score": curation_score(cfg, ref, result.features)}
    cal, readable = calibrate(cfg, ws, extractor, ref, train_set, metrics, result.features)
    report = _report(cfg, ws, result, ref, extractor, generator_sha, time.perf_counter() - started)
    report |= {"curation_score": round(metrics["curation_score"], 6)} | readable
    mem = result.memorisation
    with atomic_path(ws.reports / "memorisation.csv") as tmp:
        _memorisation_table(result, ref.train_ids).to_csv(tmp, index=False)
    report["corpus"] = eval_history.corpus_mix(ws)
    history = eval_history.append(ws, {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "data_version": report["data_version"],
        "generator": generator_sha[:12], "extractor": f"{extractor.kind}:{extractor.fingerprint}",
        **metrics, "memorised_share": mem.share, **report["corpus"],
    })
    eval_history.plot(history, ws.reports / "eval_history.png")
    grids = {"samples": make_grid(result.images[:80].permute(0, 2, 3, 1).numpy(), columns=spec.num_classes or None,
                                  scale=2),
             "closest_to_training": closest_pairs_grid(result, train_set.images)}
    report["run_id"] = _log_run(ws, cfg, report, result, ref, extractor, history, grids, cal)
    with atomic_path(ws.reports / "eval_samples.png") as tmp:
        grids["samples"].save(tmp, format="PNG")
    write_json_atomic(ws.report("eval"), report)
    log.info("evaluate: FID %.3f (floor %.3f), KID %.4f±%.4f, precision %.3f, recall %.3f, memorised %.1f%% with %s",
             result.metrics["fid"], ref.floor["fid"], result.metrics["kid_mean"], result.metrics["kid_std"],
             result.metrics["precision"], result.metrics["recall"], 100 * mem.share, extractor.kind)
    for line in report.get("readable", []):
        log.info("evaluate: %s", line)
    keys = ("fid", "kid_mean", "kid_std", "inception_score", "precision", "recall", "fid_real_floor", "n_real",
            "n_fake")
    return {k: report[k] for k in keys} | {"memorised_share": report["memorisation"]["share_below_threshold"],
                                          "extractor": extractor.kind, "gate_metric": report["gate_metric"]["name"],
                                          "readable": report.get("readable", [])}
