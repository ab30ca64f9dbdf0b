"""Which file format data/clean's shards use: load speed and size of the same clean images as
one PNG per image, PNG bytes in Parquet shards, and uint8 `.npy` shards (the choice).

    .venv/bin/python bench/shard_format.py [--n 10000] [--resolution 32] [--shard 512]

The images: bench/scale.py's synthetic corpus (tinted, shifted MNIST digits in RGB), resized to
`--resolution` as clean does. Each format is written once, then read back into one N x H x W x C
array (the training set's load) from a cold start of the reader, three times; the median is
kept. The reference is the format clean wrote before shards: one PNG per image.
Results: bench/results/shard_format.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.scale import RESULTS, synthetic_corpus  # noqa: E402


def clean_images(corpus: Path, resolution: int) -> np.ndarray:
    files = sorted(corpus.iterdir())
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((resolution, resolution), Image.LANCZOS))
                     for p in files])


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_formats(images: np.ndarray, folder: Path, shard: int) -> dict[str, Path]:
    out = {f: folder / f for f in ("png_files", "parquet_png", "npy")}
    for p in out.values():
        p.mkdir()
    for i, img in enumerate(images):
        (out["png_files"] / f"{i:07d}.png").write_bytes(png_bytes(img))
    for s in range(0, len(images), shard):
        block = images[s : s + shard]
        pq.write_table(pa.table({"png": [png_bytes(x) for x in block]}), out["parquet_png"] / f"{s:07d}.parquet")
        np.save(out["npy"] / f"{s:07d}.npy", block)
    return out


READERS: dict[str, Callable[[Path], np.ndarray]] = {
    "png_files": lambda d: np.stack([np.asarray(Image.open(p)) for p in sorted(d.iterdir())]),
    "parquet_png": lambda d: np.stack([np.asarray(Image.open(io.BytesIO(b))) for p in sorted(d.iterdir())
                                       for b in pq.read_table(p)["png"].to_pylist()]),
    "npy": lambda d: np.concatenate([np.load(p, mmap_mode="r") for p in sorted(d.iterdir())]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="images")
    ap.add_argument("--resolution", type=int, default=32, help="side of the clean images")
    ap.add_argument("--shard", type=int, default=512, help="images per shard (clean: parallel.chunk_size)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/genloop-scale"))
    args = ap.parse_args()
    corpus = args.workdir / f"corpus_{args.n}_64"
    if not corpus.exists() or sum(1 for _ in corpus.iterdir()) != args.n:
        synthetic_corpus(corpus, args.n, 64)
    images = clean_images(corpus, args.resolution)
    results: dict[str, object] = {"n": args.n, "resolution": args.resolution, "shard": args.shard}
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_formats(images, Path(tmp), args.shard)
        for name, folder in folders.items():
            times = []
            for _ in range(3):
                start = time.perf_counter()
                got = READERS[name](folder)
                times.append(time.perf_counter() - start)
                assert np.array_equal(got, images), name
            files = list(folder.iterdir())
            results[name] = {"files": len(files), "mb": round(sum(p.stat().st_size for p in files) / 1e6, 1),
                             "seconds": round(statistics.median(times), 3),
                             "img_per_s": round(args.n / statistics.median(times))}
    ref = results["png_files"]["seconds"]
    for name in READERS:
        results[name]["speed_vs_png_files"] = round(ref / results[name]["seconds"], 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shard_format.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{args.n:,} RGB {args.resolution}-px images, {args.shard} per shard")
    print(f"{'format':<12} {'files':>7} {'MB':>7} {'load s':>8} {'img/s':>10}  vs PNG files")
    for name in READERS:
        r = results[name]
        print(f"{name:<12} {r['files']:>7} {r['mb']:>7} {r['seconds']:>8} {r['img_per_s']:>10,}  "
              f"{r['speed_vs_png_files']}x")


if __name__ == "__main__":
    main()
