"""The embedding pass's batch size: throughput and the activations' memory, as ratios to 512 images.

    .venv/bin/python bench/embed_batch.py [--n 10000] [--batches 512,256,128,64] [--repeats 3]
        [--resolution 32] [--channels 3]

`embed()` runs the in-domain extractor (a freshly initialised `DomainExtractor`: the work per image,
not the weights, is timed) over `--n` random uint8 images at each batch size, in this process with
torch's default threads, in turn, `--repeats` times. The reference is 512, the batch embed() used
before `EMBED_BATCH`. Peak memory is the rise of this process's RSS over its level before the pass,
sampled every millisecond after the free heap is returned. The features must match the reference's.
Results: bench/results/embed_batch.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from genloop.core.heap import release_free_heap  # noqa: E402
from genloop.eval.extractors import DomainExtractor, embed  # noqa: E402

REFERENCE = 512


class PeakRss:
    """The highest RSS of this process since `reset()`, sampled on a thread."""

    def __init__(self) -> None:
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def reset(self) -> int:
        release_free_heap()
        time.sleep(0.05)
        self.peak = base = self.process.memory_info().rss
        return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--batches", default="512,256,128,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    args = parser.parse_args()
    batches = sorted({REFERENCE, *(int(b) for b in args.batches.split(","))}, reverse=True)
    torch.manual_seed(0)
    module = DomainExtractor(args.channels, args.resolution, 0).eval()
    images = torch.randint(0, 256, (args.n, args.channels, args.resolution, args.resolution), dtype=torch.uint8)
    reference = embed(module, images, batch=REFERENCE)  # also warms up the kernels
    rss = PeakRss()
    seconds: dict[int, list[float]] = {b: [] for b in batches}
    rise: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(args.repeats):
        for b in batches:
            base = rss.reset()
            started = time.perf_counter()
            feats = embed(module, images, batch=b)
            seconds[b].append(time.perf_counter() - started)
            time.sleep(0.01)
            rise[b].append((rss.peak - base) / 1e6)
            if not torch.allclose(feats, reference, atol=1e-4):
                raise SystemExit(f"batch {b}: features differ from batch {REFERENCE}'s")
    ref_s = statistics.median(seconds[REFERENCE])
    rows = [{"batch": b, "median_s": round(statistics.median(seconds[b]), 3),
             "images_per_s": round(args.n / statistics.median(seconds[b])),
             "ratio_to_512": round(ref_s / statistics.median(seconds[b]), 3),
             "peak_rise_mb": round(statistics.median(rise[b])), "runs_s": [round(s, 3) for s in seconds[b]]}
            for b in batches]
    out = ROOT / "bench" / "results" / "embed_batch.json"
    out.write_text(json.dumps({"n": args.n, "resolution": args.resolution, "channels": args.channels,
                               "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"{'batch':>6} {'median s':>9} {'img/s':>7} {'x 512':>6} {'peak rise MB':>13}")
    for r in rows:
        print(f"{r['batch']:>6} {r['median_s']:>9} {r['images_per_s']:>7} {r['ratio_to_512']:>6} "
              f"{r['peak_rise_mb']:>13}")


if __name__ == "__main__":
    main()
