"""generate's chunk map on each engine, against its bare loop in the same process.

    .venv/bin/python bench/generate_engines.py [--weights models/generator.pt] [--n 16384]
        [--batch-size 256] [--engines serial,processes,dask] [--repeats 2]

The reference is the bare loop generate cannot beat on one process: `sample()` then a PNG encode
per image, in this process with torch's default threads, into a scratch folder. Each engine then
writes the same images through `generate_chunk` and `chunk_map` (processes: spawned workers, each
loading the champion once; dask: a LocalCluster started for the run, through Prefect's
DaskTaskRunner). Every engine's files are checked byte for byte against the bare loop's.
Without `--weights`, a freshly initialised VAE at 32 px RGB with 10 classes stands in for a
champion (the work per image, not the pictures, is what is timed).
Results: bench/results/generate_engines.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from genloop.core.chunk_map import chunk_map, chunked  # noqa: E402
from genloop.core.config import load_params  # noqa: E402
from genloop.models import family, load_generator, sample, save_generator  # noqa: E402
from genloop.models.spec import GeneratorSpec  # noqa: E402
from genloop.stages.generate import plan_chunks  # noqa: E402
from genloop.stages.generate_chunk import GenerateJob, batch_starts, generate_chunk  # noqa: E402


def bare_loop(weights: Path, folder: Path, n: int, batch_size: int) -> float:
    gen, spec = load_generator(weights)
    start = time.perf_counter()
    for first in batch_starts(n, batch_size):
        for i, img in enumerate(sample(gen, spec, min(batch_size, n - first), 11 + first)):
            Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(folder / f"{first + i:06d}.png")
    return time.perf_counter() - start


def engine_run(weights: Path, folder: Path, n: int, batch_size: int, engine: str) -> float:
    """The stage's own plan (engine, chunks, threads per chunk) and chunk map, timed."""
    cfg = load_params(None, [f"parallel.engine={engine}", f"generate.n={n}", f"generate.batch_size={batch_size}"])
    starts = batch_starts(n, batch_size)
    settings, device, per_chunk, threads = plan_chunks(cfg, len(starts))
    job = GenerateJob(weights=weights, folder=folder, n=n, batch_size=batch_size, seed=11, label=None,
                      device=device, threads=threads)
    start = time.perf_counter()
    chunk_map(partial(generate_chunk, job), chunked(starts, per_chunk), settings)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="a generator.pt (spec beside it); default: a fresh VAE")
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--engines", default="serial,processes,dask")
    parser.add_argument("--repeats", type=int, default=2, help="alternated rounds; the best of each is kept")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="genloop-generate-bench-"))
    try:
        weights = args.weights
        if weights is None:
            spec = GeneratorSpec("vae", 32, 3, [str(i) for i in range(10)], {})
            torch.manual_seed(0)
            weights = scratch / "generator.pt"
            save_generator(family("vae").build_generator(spec), spec, weights)
        engines = args.engines.split(",")
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name in ["bare", *engines]:
                folder = scratch / name
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                seconds = (bare_loop(weights, folder, args.n, args.batch_size) if name == "bare"
                           else engine_run(weights.resolve(), folder, args.n, args.batch_size, name))
                best[name] = min(best.get(name, seconds), seconds)
        bare = {p.name: p.read_bytes() for p in (scratch / "bare").iterdir()}
        same = {e: {p.name: p.read_bytes() for p in (scratch / e).iterdir()} == bare for e in engines}
        result = {"n": args.n, "batch_size": args.batch_size, "weights": str(args.weights or "fresh vae 32px RGB"),
                  "torch_threads": torch.get_num_threads(),
                  "seconds": {k: round(v, 2) for k, v in best.items()},
                  "img_per_s": {k: round(args.n / v) for k, v in best.items()},
                  "speed_vs_bare": {k: round(best["bare"] / v, 2) for k, v in best.items()},
                  "same_files_as_bare": same}
        out = ROOT / "bench" / "results" / "generate_engines.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        for k in best:
            print(f"{k:<10} {best[k]:>7.2f} s {args.n / best[k]:>8.0f} img/s  {best['bare'] / best[k]:.2f} x bare"
                  + ("" if k == "bare" else f"  same files: {same[k]}"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
