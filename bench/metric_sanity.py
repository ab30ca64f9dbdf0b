"""Do genloop's judges tell good images from bad? The calibration ladder, printed per corpus.

For each corpus: collect and clean it in a fresh workspace, pick the extractor genloop picks
for it (or --extractor), and score real training images under every rung of every ladder
(blur, pixel noise, JPEG, grey shift, mode dropping) against the holdout with every judge
(FID, KID, C2ST AUC, precision/recall/coverage, the curation score), with each judge's
bootstrap noise and the checks that decide which metric may gate. This is
`genloop.eval.calibration.compute`, the very code `genloop evaluate` runs, timed.

Corpora: `mnist` (the built-in 5,000 digits, with labels; add `mnist-unlabelled` for the same
digits without them), `emoji` (Noto Color Emoji rendered by bench/build_emoji_corpus.py; needs
Debian's fonts-noto-color-emoji), or any folder of images.

  .venv/bin/python bench/metric_sanity.py [--corpus mnist emoji DIR ...] [--size 32] [--workdir DIR]

Prints one table per corpus and writes bench/results/metric_sanity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_stages import corpus_sources  # noqa: E402
from offline_env import RESULTS  # first: no telemetry, an embedded MLflow store

from genloop.core.config import load_params  # noqa: E402
from genloop.core.workspace import Workspace  # noqa: E402
from genloop.eval import calibration  # noqa: E402
from genloop.eval.extractors import get_extractor  # noqa: E402
from genloop.eval.reference import load_reference  # noqa: E402
from genloop.stages import clean, collect  # noqa: E402

JUDGES = ("fid", "kid_mean", "c2st_auc", "precision", "recall", "coverage", "curation_score")


def run_corpus(corpus: str, workdir: Path, size: int, extra: list[str]) -> dict:
    ws = Workspace.at(workdir / f"ws-{Path(corpus).name}")
    cfg = load_params(None, [*corpus_sources(corpus, workdir), f"data.resolution={size}",
                             "collect.dvc_add=false", *extra])
    collect.run(cfg, ws)
    clean.run(cfg, ws)
    started = time.perf_counter()
    extractor = get_extractor(cfg, ws)
    extractor_s = time.perf_counter() - started
    ref, train_set = load_reference(cfg, ws, extractor)
    cal = calibration.compute(cfg, extractor, ref, train_set, calibration.calibration_key(cfg, ref))
    gate = calibration.choose_gate_metric(cfg, cal)
    return {"corpus": corpus, "images": len(train_set) + len(ref.holdout), "holdout": len(ref.holdout),
            "extractor": extractor.kind, "extractor_seconds": round(extractor_s, 1), "gate_metric": gate,
            "calibration": cal.as_dict()}


def print_table(result: dict) -> None:
    cal = result["calibration"]
    print(f"\n## {result['corpus']}: {result['images']} images ({result['holdout']} holdout), "
          f"{result['extractor']} features ({result['extractor_seconds']} s to train), {cal['n']} real images per "
          f"rung, calibration {cal['seconds']} s")
    print("| set scored against the holdout | " + " | ".join(JUDGES) + " |")
    print("|---" * (len(JUDGES) + 1) + "|")
    print("| real train images (floor) | " + " | ".join(f"{cal['floor'][j]:.4g}" for j in JUDGES) + " |")
    print("| noise (95 % half-width) | " + " | ".join(f"±{cal['noise'][j]:.3g}" for j in JUDGES) + " |")
    for ladder, rungs in cal["ladders"].items():
        for rung in rungs:
            cells = " | ".join(f"{rung['values'][j]:.4g}" for j in JUDGES)
            print(f"| {ladder} {rung['level']:g} | {cells} |")
    flagged = {j: f for j, f in cal["flags"].items() if f}
    print(f"gate metric: {result['gate_metric'][0]} ({result['gate_metric'][1]})")
    for judge, ladders in flagged.items():
        print(f"flagged {judge}: " + "; ".join(f"{k}: {v}" for k, v in ladders.items()))
    print(f"memorisation check: {cal['memorisation']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", nargs="+", default=["mnist", "emoji"],
                        help="mnist, mnist-unlabelled, emoji, or a folder of images")
    parser.add_argument("--size", type=int, default=32, help="data.resolution")
    parser.add_argument("--set", dest="extra", nargs="*", default=[], help="more param overrides")
    parser.add_argument("--workdir", type=Path, help="keep the workspaces here (default: a temporary folder)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="metric-sanity-"))
    results = [run_corpus(c, workdir, args.size, args.extra) for c in args.corpus]
    for result in results:
        print_table(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "metric_sanity.json").write_text(json.dumps(results, indent=1))
    print(f"\nwritten: {RESULTS / 'metric_sanity.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
