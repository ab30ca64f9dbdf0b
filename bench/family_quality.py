"""Sample quality of each model family at the same training budget, through the real stages.

Budget: every family trains for the same number of epochs (default 10) over the same train
split of the built-in corpus (all 5,000 MNIST digits, 90% train), batch 64, i.e. the same
number of training images seen, with each family's settings from params.yaml; then the
evaluate stage scores `evaluate.n_samples` samples against the holdout split. collect, clean
and validate run once; the families then train and evaluate one after another in the same
workspace (their checkpoints are kept apart by the model section's hash; `train.resume:
never`, so every run trains from scratch and its time is honest).

Prints one row per family: training seconds and images/s, FID / KID, the real-data FID
floor and the feature extractor; writes bench/results/<family>_samples.png (the evaluate
stage's sample grid) and bench/results/family_quality.json. Usage, from the repository root:

  .venv/bin/python bench/family_quality.py [--epochs 10] [--limit 0] [--families dcgan,vae,ddpm]
                                           [--set key=value ...] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_stages import prepare_corpus, print_table  # noqa: E402
from offline_env import RESULTS, ROOT  # first: no telemetry, an embedded MLflow store

from genloop.core.config import load_params  # noqa: E402
from genloop.core.workspace import Workspace  # noqa: E402
from genloop.models import FAMILIES  # noqa: E402
from genloop.stages import evaluate, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per family (the budget)")
    parser.add_argument("--limit", type=int, default=0, help="collect at most this many digits (0: all 5,000)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated families to compare")
    parser.add_argument("--n-samples", type=int, default=0, help="evaluate.n_samples (0: params.yaml's)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="param override (repeatable)")
    parser.add_argument("--workdir", type=Path, default=None, help="workspace folder (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the workspace afterwards")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    base = [
        f"collect.sources=[{{uri: 'builtin:mnist', limit: {args.limit}}}]",
        "collect.dvc_add=false",
        f"train.epochs={args.epochs}",
        "train.resume=never",
        *([f"evaluate.n_samples={args.n_samples}"] if args.n_samples else []),
    ]
    params = ROOT / "params.yaml"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="genloop-family-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ws = Workspace.at(workdir)
    RESULTS.mkdir(parents=True, exist_ok=True)

    cfg = load_params(params, [*base, *args.sets])
    prepared = prepare_corpus(cfg, ws)  # the extractor too, so no family's evaluation time includes it
    images, data_s = prepared["clean_images"], prepared["seconds"]
    print(f"data: {images} clean images (+ extractor) in {data_s:.1f}s; "
          f"budget: {args.epochs} epochs of the train split, batch {cfg.train.batch_size}, "
          f"evaluate.n_samples={cfg.evaluate.n_samples}; workspace {workdir}")

    rows: list[dict[str, Any]] = []
    for name in families:
        fcfg = load_params(params, [*base, f"model.family={name}", *args.sets])
        t0 = time.perf_counter()
        summary = train.run(fcfg, ws)
        t1 = time.perf_counter()
        report = evaluate.run(fcfg, ws)
        eval_s = time.perf_counter() - t1
        shutil.copyfile(ws.reports / "eval_samples.png", RESULTS / f"{name}_samples.png")
        rows.append({
            "family": name,
            "hparams": getattr(fcfg.model, name).model_dump(),
            "epochs": fcfg.train.epochs,
            "steps": summary["steps"],
            "train_s": round(summary["seconds"], 1),
            "stage_s": round(t1 - t0, 1),
            "img_per_s": summary["img_per_s"],
            "fid": round(report["fid"], 3),
            "kid_mean": round(report["kid_mean"], 5),
            "fid_real_floor": round(report["fid_real_floor"], 3),
            "extractor": report["extractor"],
            "eval_s": round(eval_s, 1),
            "device": summary["device"],
        })
        print(f"  {name}: trained {summary['steps']} steps in {summary['seconds']:.1f}s, "
              f"FID {report['fid']:.2f}, evaluated in {eval_s:.1f}s", flush=True)

    print()
    print_table(rows, ["family", "train_s", "img_per_s", "fid", "kid_mean", "fid_real_floor", "extractor", "eval_s"])
    out = {"budget": {"epochs": args.epochs, "limit": args.limit, "batch_size": cfg.train.batch_size,
                      "n_samples": cfg.evaluate.n_samples, "overrides": args.sets},
           "clean_images": images, "rows": rows}
    (RESULTS / "family_quality.json").write_text(json.dumps(out, indent=2))
    print(f"\nsample grids: {', '.join(str(RESULTS / (r['family'] + '_samples.png')) for r in rows)}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
