"""Model recipes for small corpora, measured: each family's options at a fixed budget.

Each setting trains one family (`--family`: dcgan, the GAN recipe; vae, the VAE's prior and KL
weight) for the same number of epochs on a corpus (default the built-in 5,000 MNIST digits, 90%
train, batch 64, `train.resume: never`) through the real train stage, then the evaluate stage
scores `evaluate.n_samples` samples against the holdout. The corpus is prepared once per
workspace by bench_stages.prepare_corpus (collect, clean, validate, extractor, calibration
ladder; skipped when `--workdir` already holds clean data).

Prints one row per setting: training seconds, class_diversity (features and pixels: generated
spread within a class over real spread within it, ~1 for real images), FID and where it sits
on the blur ladder, C2ST AUC and accuracy, class consistency, recall; writes each setting's
evaluate sample grid to <workdir>/grids/<setting>.png (with `--save-grid NAME`, the last
setting's also to bench/results/NAME) and the rows to bench/results/<family>_recipe.json
(merged by corpus, setting and epochs, so settings can be measured in separate runs). Usage,
from the repository root:

  nice -n 10 .venv/bin/python bench/recipe.py --family dcgan --settings base,hinge [--epochs 10]
      [--workdir DIR] [--set key=value ...] [--save-grid gan_mnist_samples.png]

Settings (model.<family> overrides; a dotted key is a whole param): see SETTINGS below.
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

from bench_stages import corpus_sources, prepare_corpus, print_table  # noqa: E402
from offline_env import RESULTS, ROOT  # first: no telemetry, an embedded MLflow store

from genloop.core.config import load_params  # noqa: E402
from genloop.core.workspace import Workspace  # noqa: E402
from genloop.stages import evaluate, train  # noqa: E402

# every setting starts from the family before its recipe and changes what its name says
_OLD_DCGAN = {"loss": "nonsaturating", "augment": "''", "r1_gamma": "0", "mode_seeking": "0"}
_DCGAN: dict[str, dict[str, str]] = {
    "base": {},
    "hinge": {"loss": "hinge"},
    "ns_tc": {"augment": "translation,cutout"},
    "hinge_tc": {"loss": "hinge", "augment": "translation,cutout"},
    "hinge_t": {"loss": "hinge", "augment": "translation"},
    "hinge_ctc": {"loss": "hinge", "augment": "colour,translation,cutout"},
    "hinge_tc_r1": {"loss": "hinge", "augment": "translation,cutout", "r1_gamma": "1"},
    "hinge_tc_r1x10": {"loss": "hinge", "augment": "translation,cutout", "r1_gamma": "10"},
    "ns_tc_r1": {"augment": "translation,cutout", "r1_gamma": "1"},
    "hinge_ms1": {"loss": "hinge", "mode_seeking": "1"},
    "hinge_ms03": {"loss": "hinge", "mode_seeking": "0.3"},
    "hinge_tc_ms03": {"loss": "hinge", "augment": "translation,cutout", "mode_seeking": "0.3"},
    "hinge_tc_ms1": {"loss": "hinge", "augment": "translation,cutout", "mode_seeking": "1"},
    "ns_ms03": {"mode_seeking": "0.3"},
    "hinge_ms01": {"loss": "hinge", "mode_seeking": "0.1"},
    "hinge_tc_ms01": {"loss": "hinge", "augment": "translation,cutout", "mode_seeking": "0.1"},
    "hinge_tc_r1_ms01": {"loss": "hinge", "augment": "translation,cutout", "r1_gamma": "1", "mode_seeking": "0.1"},
    "ns_ms01": {"mode_seeking": "0.1"},
    "ns_ms02": {"mode_seeking": "0.2"},
    "ns_ms005": {"mode_seeking": "0.05"},
    "ns_tc_ms01": {"augment": "translation,cutout", "mode_seeking": "0.1"},
    "ns_t_ms01": {"augment": "translation", "mode_seeking": "0.1"},
    "ns_r1_ms01": {"r1_gamma": "1", "mode_seeking": "0.1"},
    "ns_ms01_uncond": {"mode_seeking": "0.1", "model.conditional": "no"},  # a dotted key is a whole param
}
_OLD_VAE = {"prior": "normal", "beta": "1.0"}
_VAE: dict[str, dict[str, str]] = {
    "base": {},
    "fitted": {"prior": "fitted"},
    "fitted_k1": {"prior": "fitted", "prior_components": "1"},
    "fitted_k10": {"prior": "fitted", "prior_components": "10"},
    "fitted_t08": {"prior": "fitted", "prior_temperature": "0.8"},
    "beta05": {"beta": "0.5"},
    "fitted_beta05": {"prior": "fitted", "beta": "0.5"},
    "fitted_beta025": {"prior": "fitted", "beta": "0.25"},
    "beta01": {"beta": "0.1"},
    "fitted_beta01": {"prior": "fitted", "beta": "0.1"},
    "fitted_beta005": {"prior": "fitted", "beta": "0.05"},
    "fitted_beta01_k4": {"prior": "fitted", "beta": "0.1", "prior_components": "4"},
    "fitted_beta01_t09": {"prior": "fitted", "beta": "0.1", "prior_temperature": "0.9"},
    "fitted_beta01_k10": {"prior": "fitted", "beta": "0.1", "prior_components": "10"},
    "fitted_beta01_z64": {"prior": "fitted", "beta": "0.1", "latent_dim": "64"},
}


def _settings(old: dict[str, str], changes: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    table = {name: [f"{k}={v}" for k, v in (old | change).items()] for name, change in changes.items()}
    table["defaults"] = []  # params.yaml as it is
    return table


SETTINGS: dict[str, dict[str, list[str]]] = {"dcgan": _settings(_OLD_DCGAN, _DCGAN), "vae": _settings(_OLD_VAE, _VAE)}

COLUMNS = ["setting", "train_s", "class_diversity", "class_diversity_pixels", "fid", "fid_blur", "c2st_auc",
           "c2st_accuracy", "class_consistency", "recall"]


def _row(family: str, name: str, epochs: int, summary: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    blur = report.get("ladder_position", {}).get("fid", {}).get("blur", {})
    r = {k: report.get(k) for k in ("class_diversity", "class_diversity_pixels", "fid", "c2st_auc",
                                    "c2st_accuracy", "class_consistency", "recall")}
    return {"setting": name, "epochs": epochs, "overrides": SETTINGS[family].get(name, []), "steps": summary["steps"],
            "resumed_from_step": summary["resumed_from_step"],
            "train_s": round(summary["seconds"], 1), **{k: round(v, 3) if isinstance(v, float) else v
                                                        for k, v in r.items()},
            "fid_blur": blur.get("text"), "readable": report.get("readable", [])}


def _save(family: str, rows: list[dict[str, Any]], budget: dict[str, Any]) -> None:
    """Merge the rows into bench/results/<family>_recipe.json by (corpus, setting, epochs)."""
    path = RESULTS / f"{'gan' if family == 'dcgan' else family}_recipe.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []

    def key(r: dict[str, Any]) -> tuple[str, str, int]:
        return r.get("corpus", "mnist"), r["setting"], r.get("epochs", 0)

    new = {key(r) for r in rows}
    kept = [r for r in old if key(r) not in new]
    path.write_text(json.dumps({"budget": budget, "rows": kept + rows}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(SETTINGS), default="dcgan")
    parser.add_argument("--settings", default="base,defaults",
                        help="comma-separated; " + "; ".join(f"{f}: {', '.join(t)}" for f, t in SETTINGS.items()))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n-samples", type=int, default=500)
    parser.add_argument("--corpus", default="mnist", help="mnist, mnist-unlabelled (unconditional), emoji or a folder")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="param override (repeatable)")
    parser.add_argument("--workdir", type=Path, default=None, help="workspace (reused when it holds clean data)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine, 2 threads ran 5x slower per step)")
    parser.add_argument("--resume", action="store_true",
                        help="continue each setting from its last checkpoint in this workspace (e.g. 5, then 10 "
                             "epochs: two shorter runs instead of one long one); train_s then counts the new steps")
    parser.add_argument("--save-grid", default="", help="copy the last setting's sample grid to bench/results/NAME")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import torch

    torch.set_num_threads(args.threads)  # data preparation and evaluation too, not only train
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"genloop-{args.family}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ws = Workspace.at(workdir)
    base = [*corpus_sources(args.corpus, workdir), "collect.dvc_add=false", f"model.family={args.family}",
            f"train.epochs={args.epochs}", f"train.resume={'auto' if args.resume else 'never'}",
            f"train.threads={args.threads}", f"evaluate.n_samples={args.n_samples}", "evaluate.calibration.bootstrap=5"]
    params = ROOT / "params.yaml"
    if not ws.manifest.exists():
        prepare_corpus(load_params(params, [*base, *args.sets]), ws, ladder=True)
    rows = []
    for name in [s.strip() for s in args.settings.split(",") if s.strip()]:
        overrides = [o if "." in o.split("=")[0] else f"model.{args.family}.{o}" for o in SETTINGS[args.family][name]]
        cfg = load_params(params, [*base, *overrides, *args.sets])
        started = time.perf_counter()
        summary = train.run(cfg, ws)
        report = json.loads(ws.report("eval").read_text()) if evaluate.run(cfg, ws) else {}
        (workdir / "grids").mkdir(exist_ok=True)
        shutil.copyfile(ws.reports / "eval_samples.png", workdir / "grids" / f"{name}.png")
        rows.append({"corpus": args.corpus, **_row(args.family, name, args.epochs, summary, report)})
        print(f"{name}: {time.perf_counter() - started:.0f}s, {rows[-1]}", flush=True)
    print()
    print_table(rows, COLUMNS)
    _save(args.family, rows, {"corpus": args.corpus, "n_samples": args.n_samples, "calibration_bootstrap": 5,
                 "threads": args.threads, "overrides": args.sets})
    if args.save_grid:
        shutil.copyfile(workdir / "grids" / f"{rows[-1]['setting']}.png", RESULTS / args.save_grid)
    print(f"\nworkspace {workdir}; grids in {workdir / 'grids'}")


if __name__ == "__main__":
    sys.exit(main())
