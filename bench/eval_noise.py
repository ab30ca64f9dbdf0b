"""What evaluation costs, and how noisy its numbers are: the figures the promotion gate is
tuned with.

1. Cost: the evaluation of one generator (sampling, features, FID/KID/IS/precision/recall,
   memorisation) at each `--n` (default 1,000 and 10,000 samples), plus the one-off
   reference statistics, timed on this machine's device.
2. Noise across training seeds: the default model trained `--seeds` times (train.seed = 0,
   1, 2 by default) and each scored with the same extractor, reference and sample seed.
3. Noise within one model: its FID over 5 sampling seeds, and the gate's bootstrap interval.

collect, clean and validate run once (the built-in corpus); everything else goes through
genloop's own modules. Prints the figures and writes bench/results/eval_noise.json.

  .venv/bin/python bench/eval_noise.py [--n 1000 10000] [--seeds 0 1 2] [--epochs 10] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from offline_env import RESULTS, ROOT  # first: no telemetry, an embedded MLflow store

from genloop.core.config import load_params  # noqa: E402
from genloop.core.storage import sha256_file  # noqa: E402
from genloop.core.workspace import Workspace  # noqa: E402
from genloop.eval.extractors import get_extractor  # noqa: E402
from genloop.eval.gate import paired_bootstrap  # noqa: E402
from genloop.eval.generator_eval import evaluate_generator  # noqa: E402
from genloop.eval.reference import load_reference  # noqa: E402
from genloop.models import load_generator, sample  # noqa: E402
from genloop.stages import clean, collect, train, validate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000], help="sample counts to time")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--epochs", type=int, default=10, help="train.epochs of each model")
    parser.add_argument("--workdir", type=Path, default=None, help="workspace (default: a temp dir)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="param override (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    ws = Workspace.at(args.workdir or Path(tempfile.mkdtemp(prefix="genloop-evalnoise-")))
    base = ["collect.dvc_add=false", f"train.epochs={args.epochs}", *args.sets]
    cfg = load_params(ROOT / "params.yaml", base)
    if not ws.manifest.exists():
        for stage in (collect, clean, validate):
            stage.run(cfg, ws)
    out: dict[str, object] = {"workspace": str(ws.root), "epochs": args.epochs}

    models = []
    for seed in args.seeds:
        scfg = load_params(ROOT / "params.yaml", [*base, f"train.seed={seed}"])
        started = time.perf_counter()
        train.run(scfg, ws)
        gen, spec = load_generator(ws.generator)
        models.append((seed, gen, spec, sha256_file(ws.generator), time.perf_counter() - started))

    extractor = get_extractor(cfg, ws)
    cost = []
    for n in args.n:
        ncfg = load_params(ROOT / "params.yaml", [*base, f"evaluate.n_samples={n}"])
        t0 = time.perf_counter()
        ref, _ = load_reference(ncfg, ws, extractor)
        t1 = time.perf_counter()
        _, gen, spec, sha, _ = models[0]
        result = evaluate_generator(ncfg, ws, lambda k, s, g=gen, sp=spec: sample(g, sp, k, s),
                                    f"{sha}-cost-{time.time()}",
                                    extractor, ref)
        t2 = time.perf_counter()
        cost.append({"n": n, "reference_s": round(t1 - t0, 2), "evaluate_s": round(t2 - t1, 2),
                     "fid": round(result.metrics["fid"], 3)})
        print(f"cost: {n:>6} samples: evaluation {t2 - t1:6.1f} s (reference statistics, once per data version: "
              f"{t1 - t0:.1f} s); FID {result.metrics['fid']:.2f}", flush=True)
    out["cost"] = cost

    ref, _ = load_reference(cfg, ws, extractor)
    per_seed = []
    evals = []
    for seed, gen, spec, sha, train_s in models:
        r = evaluate_generator(cfg, ws, lambda k, s, g=gen, sp=spec: sample(g, sp, k, s), sha, extractor, ref)
        evals.append(r)
        per_seed.append({"train_seed": seed, "train_s": round(train_s, 1), **{
            k: round(r.metrics[k], 4) for k in ("fid", "kid_mean", "precision", "recall") if r.metrics[k] is not None},
            "memorised_share": r.memorisation.share})
        print(f"train seed {seed}: FID {r.metrics['fid']:.2f}  KID {r.metrics['kid_mean']:.1f}  "
              f"precision {r.metrics['precision']:.3f}  recall {r.metrics['recall']:.3f}  "
              f"memorised {r.memorisation.share:.1%}", flush=True)
    fids = [p["fid"] for p in per_seed]
    out["training_seeds"] = {"per_seed": per_seed, "fid_mean": statistics.mean(fids),
                             "fid_std": statistics.stdev(fids) if len(fids) > 1 else 0.0,
                             "fid_range": max(fids) - min(fids)}
    print(f"FID across training seeds: mean {statistics.mean(fids):.2f}, "
          f"std {out['training_seeds']['fid_std']:.2f}, range {max(fids) - min(fids):.2f}", flush=True)

    _, gen, spec, sha, _ = models[0]
    sampling = []
    for s in range(5):
        scfg = load_params(ROOT / "params.yaml", [*base, f"evaluate.seed={1000 + s}"])
        sampling.append(evaluate_generator(scfg, ws, lambda k, sd: sample(gen, spec, k, sd), sha, extractor,
                                           ref).metrics["fid"])
    out["sampling_seeds"] = {"fids": sampling, "std": statistics.stdev(sampling)}
    print(f"FID of one model over 5 sampling seeds: {', '.join(f'{f:.2f}' for f in sampling)} "
          f"(std {statistics.stdev(sampling):.2f})", flush=True)

    g = cfg.registry.gate
    if len(evals) > 1:
        t0 = time.perf_counter()
        comp = paired_bootstrap(cfg.registry.metric, ref.holdout, evals[1].features, evals[0].features,
                                resamples=g.bootstrap, confidence=g.confidence, seed=g.seed)
        seconds = time.perf_counter() - t0
        out["gate_example"] = {"challenger_seed": models[1][0], "champion_seed": models[0][0],
                               "delta": comp.delta, "interval": [comp.delta_low, comp.delta_high],
                               "seconds": round(seconds, 2)}
        print(f"gate, seed {models[1][0]} vs seed {models[0][0]}: improvement {comp.delta:.2f}, "
              f"{comp.confidence:.0%} interval [{comp.delta_low:.2f}, {comp.delta_high:.2f}] "
              f"({g.bootstrap} resamples, {seconds:.1f} s)", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval_noise.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
