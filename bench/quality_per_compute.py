"""Quality per compute: genloop's families and a peer diffusion model, each given the same wall clock.

What is compared: for each budget (minutes of training wall clock) every genloop family trains
with `train.max_minutes=<budget>` (and train.epochs large enough that the budget ends it), then
genloop's evaluate stage judges `--n-samples` samples. The peer is lucidrains'
denoising-diffusion-pytorch (bench/qpc_peer.py: its Unet and GaussianDiffusion with its
Trainer's own step and defaults in a minimal loop, DDIM sampling from its EMA model), trained on
the same clean train split for the same budget; its samples are written as PNGs and judged by
`genloop score` (genloop.stages.score), which uses the very extractor, holdout reference,
judges and calibration ladder that evaluate uses, in the same workspace.

Fairness: the same data (collect, clean, validate run once; both sides read the clean train
split), the same wall clock (checked after every training step; genloop's clock also covers
its per-epoch grids and checkpoints, as its train stage does them), the same judges on the same
number of samples, the same DDIM step count for both diffusion models (--sampling-steps), and
each side's own recipe (genloop: params.yaml; the peer: its Unet scaled to 32 px and its
Trainer's defaults, see bench/qpc_peer.py). genloop trains class-conditional on labelled data
(model.conditional=auto); the peer is unconditional, so class consistency is n/a for it
(`--set model.conditional=no` for an unconditional genloop). The peer runs in its own
interpreter (--peer-python, default .venv-peer/bin/python: bench/README.md says how to make
it), because the package imports torchvision, which does not load with the CPU build of torch
the project pins.

Judges per row: FID on the calibrated extractor and where it sits on the blur ladder, C2ST AUC
and accuracy, class consistency where labels exist, recall and coverage; and the cost: train
steps, images seen, train seconds, sampling seconds per image. Per budget: genloop's best FID
and C2ST AUC over the peer's. Writes bench/results/quality_per_compute.json (another
corpus: quality_per_compute_<corpus>.json; --quick adds _quick) and each (family, budget) sample grid to
bench/results/qpc_<corpus>_<family>_<budget>m.png.

  .venv/bin/python bench/quality_per_compute.py [--budgets 2,5,15] [--families dcgan,vae,ddpm]
      [--source mnist|emoji|DIR] [--resolution 32] [--mode L|RGB] [--n-samples 1000] [--quick]

Progress goes to the log (WARNING and up only); one line per finished run, then the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from bench_stages import corpus_sources, prepare_corpus, print_table
from offline_env import RESULTS, ROOT
from PIL import Image

from genloop.core.config import Params, load_params
from genloop.core.dataset import load_split
from genloop.core.grids import make_grid
from genloop.core.storage import read_json
from genloop.core.workspace import Workspace
from genloop.models import load_generator
from genloop.stages import evaluate, score, train

log = logging.getLogger("quality_per_compute")
PEER = "peer-ddpm"
PEER_SCRIPT = ROOT / "bench" / "qpc_peer.py"
DEFAULT_PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
GRID_N = 80  # samples in each grid, as in evaluate's eval_samples.png


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="2,5,15", help="training wall-clock budgets in minutes, comma-separated")
    p.add_argument("--families", default="dcgan,vae,ddpm", help="genloop families, comma-separated")
    p.add_argument("--source", default="mnist", help="mnist (built-in digits), emoji, or a folder of images")
    p.add_argument("--resolution", type=int, default=32, help="data.resolution")
    p.add_argument("--mode", choices=("L", "RGB"), help="data.mode (default: L for mnist, RGB for a folder)")
    p.add_argument("--limit", type=int, default=0, help="collect at most this many images (0: all)")
    p.add_argument("--n-samples", type=int, default=1000, help="samples judged per run (evaluate.n_samples)")
    p.add_argument("--sampling-steps", type=int, help="DDIM steps of both diffusion models "
                   "(default: params.yaml's model.ddpm.sampling_steps)")
    p.add_argument("--peer-python", type=Path, help=f"interpreter with denoising-diffusion-pytorch "
                   f"(default: {DEFAULT_PEER_PYTHON.relative_to(ROOT)}, else this one)")
    p.add_argument("--peer-dim", type=int, default=32, help="the peer Unet's dim (its 128-px README example: 64)")
    p.add_argument("--peer-mults", default="1,2,4", help="the peer Unet's dim_mults (its default: 1,2,4,8)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="genloop param override (repeatable)")
    p.add_argument("--workdir", type=Path, help="workspace folder (default: a temp dir, removed afterwards)")
    p.add_argument("--quick", action="store_true", help="smoke run: budget 0.2 min, 200 samples, 1,000 images, "
                   "10 DDIM steps")
    args = p.parse_args(argv)
    if args.quick:
        args.budgets, args.n_samples, args.limit = "0.2", 200, args.limit or 1000
        args.sampling_steps = 10
    args.budget_list = [float(b) for b in args.budgets.split(",") if b.strip()]
    args.family_list = [f.strip() for f in args.families.split(",") if f.strip()]
    if not args.budget_list or min(args.budget_list) <= 0:
        p.error(f"--budgets {args.budgets!r}: give positive minutes, e.g. 2,5,15")
    return args


def find_peer_python(given: Path | None) -> Path:
    """The first interpreter that imports denoising_diffusion_pytorch; a clear exit when none does."""
    candidates = [given] if given else [DEFAULT_PEER_PYTHON, Path(sys.executable)]
    for python in candidates:
        if python.exists() and subprocess.run([str(python), "-c", "import denoising_diffusion_pytorch"],
                                              capture_output=True).returncode == 0:
            return python
    sys.exit(f"no interpreter imports denoising_diffusion_pytorch (tried {', '.join(map(str, candidates))}). "
             "Make the peer environment (bench/README.md): .venv/bin/uv venv --python .venv/bin/python .venv-peer "
             "&& .venv/bin/uv pip install --python .venv-peer/bin/python denoising-diffusion-pytorch")


def settings(args: argparse.Namespace, workdir: Path) -> list[str]:
    """The genloop overrides every run shares."""
    src = corpus_sources(args.source, workdir, limit=args.limit)
    return [*src, *([f"data.mode={args.mode}"] if args.mode else []), f"data.resolution={args.resolution}",
            "collect.dvc_add=false", f"evaluate.n_samples={args.n_samples}",
            *([f"model.ddpm.sampling_steps={args.sampling_steps}"] if args.sampling_steps else []),
            "train.resume=never", "train.epochs=10000", *args.sets]


@contextmanager
def sampling_clock() -> Iterator[dict[str, float]]:
    """Times the evaluate stage's calls of genloop.models.sample: its report times sampling,
    features and metrics together, and drawing the samples a second time to time them would
    double the cost of the slowest family."""
    real, spent = evaluate.sample, {"seconds": 0.0, "images": 0}

    def timed(*args: Any, **kwargs: Any) -> np.ndarray:
        started = time.perf_counter()
        out = real(*args, **kwargs)
        spent["seconds"] += time.perf_counter() - started
        spent["images"] += len(out)
        return out

    evaluate.sample = timed
    try:
        yield spent
    finally:
        evaluate.sample = real


def judged(report: dict[str, Any]) -> dict[str, Any]:
    """The judges every row reports, from an eval.json or a score.json."""
    fid_place = report.get("ladder_position", {}).get("fid", {}).get("blur", {}).get("text")
    return {"fid": report["fid"], "fid_on_blur_ladder": fid_place, "c2st_auc": report.get("c2st_auc"),
            "c2st_accuracy": report.get("c2st_accuracy"), "recall": report["recall"],
            "coverage": report.get("coverage"), "precision": report["precision"], "kid_mean": report["kid_mean"],
            "fid_real_floor": report["fid_real_floor"], "readable": report.get("readable", [])}


def genloop_row(params: Path, base: list[str], family: str, budget: float, ws: Workspace,
                grid: Path) -> dict[str, Any]:
    """Train one family for `budget` minutes, evaluate it, keep its grid; its row."""
    cfg = load_params(params, [*base, f"model.family={family}", f"train.max_minutes={budget}"])
    summary = train.run(cfg, ws)
    with sampling_clock() as sampled:
        evaluate.run(cfg, ws)
    report = read_json(ws.report("eval"))
    shutil.copyfile(ws.reports / "eval_samples.png", grid)
    consistency = report.get("class_consistency")
    generator, _ = load_generator(ws.generator)
    return {"family": family, "budget_min": budget, "steps": summary["steps"],
            "images_seen": summary["images_seen"], "epochs_done": summary["epochs_done"],
            "train_s": summary["seconds"], "ended_by": summary["ended_by"],
            "sampling_s_per_image": sampled["seconds"] / sampled["images"] if sampled["images"] else None,
            "n_judged": report["n_fake"], **judged(report),
            "class_consistency": round(consistency, 4) if consistency is not None else None,
            "class_consistency_note": None if consistency is not None else
            ("n/a: unconditional generator" if not summary["conditional"] else "n/a: the data has no labels"),
            "parameters": sum(p.numel() for p in generator.parameters()), "device": summary["device"],
            "grid": str(grid.relative_to(ROOT))}


def run_peer(python: Path, args: argparse.Namespace, cfg: Params, budget: float, data: Path, out: Path) -> dict:
    """The peer trained and sampled in its own interpreter; its peer.json."""
    steps = args.sampling_steps or cfg.model.ddpm.sampling_steps
    cmd = [str(python), str(PEER_SCRIPT), "--data", str(data), "--out", str(out), "--minutes", str(budget),
           "--n-samples", str(args.n_samples), "--sampling-steps", str(steps), "--seed", str(cfg.train.seed),
           "--dim", str(args.peer_dim), "--dim-mults", args.peer_mults]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        sys.exit(f"the peer failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
    return json.loads((out / "peer.json").read_text())


def peer_row(python: Path, args: argparse.Namespace, cfg: Params, ws: Workspace, budget: float, data: Path,
             grid: Path) -> dict[str, Any]:
    """Train and sample the peer, judge its PNGs with `genloop score` in the same workspace; its row."""
    out = ws.root / "peer" / f"{budget:g}m"
    shutil.rmtree(out, ignore_errors=True)
    peer = run_peer(python, args, cfg, budget, data, out)
    report = score.run(cfg, ws, out / "samples", out=out / "score.json")
    if report["n_images"] != args.n_samples:
        log.warning("peer %gm: %d of its %d samples judged (%d rejected by clean's checks: %s)", budget,
                    report["n_images"], args.n_samples, len(report["rejected"]), report["rejected"][:3])
    files = sorted((out / "samples").glob("*.png"))[:GRID_N]
    images = np.stack([np.asarray(Image.open(f).convert("L" if cfg.data.mode == "L" else "RGB")) for f in files])
    make_grid(images if images.ndim == 4 else images[..., None], scale=2).save(grid)
    return {"family": PEER, "budget_min": budget, "steps": peer["steps"], "images_seen": peer["images_seen"],
            "epochs_done": peer["epochs_done"], "train_s": peer["train_seconds"], "ended_by": "wall clock",
            "sampling_s_per_image": peer["sampling_s_per_image"], "n_judged": report["n_images"], **judged(report),
            "class_consistency": None, "class_consistency_note": "n/a: the peer is unconditional",
            "parameters": peer["parameters"], "device": peer["device"], "grid": str(grid.relative_to(ROOT)),
            "peer": {k: peer[k] for k in ("package", "torch", "recipe", "sampling_seconds")}}


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per budget: genloop's best FID and best C2ST AUC over the peer's (below 1: genloop is better)."""
    out = []
    for budget in dict.fromkeys(r["budget_min"] for r in rows):
        mine = [r for r in rows if r["budget_min"] == budget and r["family"] != PEER]
        peer = next((r for r in rows if r["budget_min"] == budget and r["family"] == PEER), None)
        if not mine or peer is None:
            continue
        best_fid = min(mine, key=lambda r: r["fid"])
        best_c2st = min(mine, key=lambda r: r["c2st_auc"])
        out.append({"budget_min": budget, "best_fid_family": best_fid["family"],
                    "fid_ratio": round(best_fid["fid"] / peer["fid"], 3),
                    "best_c2st_family": best_c2st["family"],
                    "c2st_auc_ratio": round(best_c2st["c2st_auc"] / peer["c2st_auc"], 3)})
    return out


def print_results(rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> None:
    table = [{**r, "budget": f"{r['budget_min']:g}m", "s/img": f"{r['sampling_s_per_image']:.4f}"
              if r["sampling_s_per_image"] is not None else None, "fid": f"{r['fid']:.2f}",
              "c2st_auc": f"{r['c2st_auc']:.3f}", "c2st_acc": f"{r['c2st_accuracy']:.3f}",
              "class_cons": r["class_consistency"] if r["class_consistency"] is not None else "n/a",
              "recall": f"{r['recall']:.3f}", "coverage": f"{r['coverage']:.3f}"} for r in rows]
    print()
    print_table(table, ["family", "budget", "steps", "images_seen", "train_s", "s/img", "fid", "fid_on_blur_ladder",
                        "c2st_auc", "c2st_acc", "class_cons", "recall", "coverage"])
    print()
    for s in summary:
        print(f"{s['budget_min']:g} min: genloop's best FID ({s['best_fid_family']}) / peer FID = {s['fid_ratio']}; "
              f"best C2ST AUC ({s['best_c2st_family']}) / peer C2ST AUC = {s['c2st_auc_ratio']} (below 1: genloop "
              "better)")


def run_all(args: argparse.Namespace, python: Path, workdir: Path) -> dict[str, Any]:
    """Prepare the corpus once, then every (budget, family) run and the peer per budget."""
    params, base = ROOT / "params.yaml", settings(args, workdir)
    ws, corpus = Workspace.at(workdir / "ws"), corpus_name(args.source)
    cfg = load_params(params, base)
    prepared = prepare_corpus(cfg, ws, ladder=True)
    data = workdir / "train.npy"
    np.save(data, load_split(ws, "train").images.numpy())  # the peer's copy of the clean train split
    print(f"data: {prepared['clean_images']} clean {corpus} images, {prepared['extractor']} extractor and ladder "
          f"in {prepared['seconds']} s; budgets {args.budgets} min; {args.n_samples} samples per run", flush=True)
    rows = []
    for budget in args.budget_list:
        for family in [*args.family_list, PEER]:
            grid = RESULTS / f"qpc_{corpus}_{family}_{budget:g}m.png"
            row = (peer_row(python, args, cfg, ws, budget, data, grid) if family == PEER
                   else genloop_row(params, base, family, budget, ws, grid))
            rows.append(row)
            print(f"  {family} {budget:g} min: {row['steps']} steps, FID {row['fid']:.2f}, "
                  f"C2ST AUC {row['c2st_auc']:.3f}", flush=True)
    return {"corpus": corpus, "source": args.source, "budgets_min": args.budget_list, "n_samples": args.n_samples,
            "settings": base, "data": prepared, "peer_python": str(python), "rows": rows, "ratios": ratios(rows)}


def corpus_name(source: str) -> str:
    return source if source in ("mnist", "mnist-unlabelled", "emoji") else Path(source).resolve().name


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    python = find_peer_python(args.peer_python)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="genloop-qpc-"))
    workdir.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = run_all(args, python, workdir)
    print_results(result["rows"], result["ratios"])
    # one results file per corpus (the digits keep the plain name), so runs on other corpora add to it
    suffix = ("_quick" if args.quick else "") + ("" if result["corpus"] == "mnist" else f"_{result['corpus']}")
    out = RESULTS / f"quality_per_compute{suffix}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwritten: {out.relative_to(ROOT)} and the grids bench/results/qpc_{result['corpus']}_*.png")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
