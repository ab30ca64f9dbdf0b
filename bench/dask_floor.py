"""The Dask engine's own cost, apart from Prefect's: clean's first run with the process pool, with
the chunks on a local Dask cluster through a plain Dask client (`dask-plain`: no Prefect imported,
no flow run), and with the dask engine as it ships (`dask`: the chunks through a Prefect flow run's
DaskTaskRunner, Prefect imported by the stage as under the CLI). Each clean runs in a fresh process
that times the stage alone, the variants taking turns each round.

    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/python bench/dask_floor.py --workdir /tmp/gs100d --n 100000

It reuses the workspaces `bench/scale.py --data-only --engines processes,dask` leaves in --workdir
(the dask one for both Dask variants). `dask-plain` replaces the engine's Prefect part in this
process only; the chunks, the cluster and its settings are genloop's own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = ("processes", "dask-plain", "dask")
SETTINGS = ["collect.dvc_add=false", "data.resolution=32", "data.mode=RGB"]


def _plain_dask(fn: Callable[[Any], Any], chunks: Sequence[Any], scheduler: Callable[[], str],
                report: Callable[[Any], None], until: Callable[[Any], bool]) -> list[Any]:
    """`chunk_map._dask` without Prefect: the same boxed chunks in the same graphs, through a client
    of this process's own."""
    from distributed import Client, as_completed

    from genloop.core import chunk_map

    results: dict[int, Any] = {}
    with Client(scheduler(), set_as_default=False) as client:
        futures = client.map(partial(chunk_map._run_chunk, fn), [chunk_map._Boxed(c) for c in chunks], pure=False,
                             batch_size=chunk_map.GRAPH_BATCH)
        order = {f.key: i for i, f in enumerate(futures)}
        with client.as_current():
            for future, result in as_completed(futures, with_results=True):
                results[order[future.key]] = result
                report(result)
    return [results[i] for i in sorted(results)]


def one_clean(variant: str) -> float:
    """clean on the workspace in the current folder with `variant`; the stage's seconds."""
    from timed_clean import timed_clean

    from genloop.core import chunk_map

    if variant == "dask-plain":
        chunk_map._dask = _plain_dask  # type: ignore[assignment]
    engine = "processes" if variant == "processes" else "dask"
    return timed_clean([*SETTINGS, f"parallel.engine={engine}"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True, help="the folder of scale.py's workspaces")
    ap.add_argument("--n", type=int, default=100_000, help="the corpus size of those workspaces")
    ap.add_argument("--rounds", type=int, default=5, help="first cleans per variant")
    ap.add_argument("--out", type=Path, help="the JSON to write (default bench/results/dask_floor_N.json)")
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # a single timed clean (the children)
    args = ap.parse_args()
    if args.one:
        print(json.dumps({"seconds": round(one_clean(args.one), 2)}))
        return
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS:
            ws = args.workdir / f"ws_{args.n}_{'processes' if variant == 'processes' else 'dask'}"
            subprocess.run(["rm", "-rf", str(ws / ".genloop" / "cache" / "clean")], check=True)
            done = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--one", variant],
                                  cwd=ws, capture_output=True, text=True, check=True)
            seconds[variant].append(json.loads(done.stdout.splitlines()[-1])["seconds"])
            print(f"round {r + 1} {variant}: {seconds[variant][-1]} s", file=sys.stderr)
    ratios = {v: [round(t / p, 3) for t, p in zip(seconds[v], seconds["processes"], strict=True)]
              for v in VARIANTS[1:]}
    result = {"n": args.n, "seconds": seconds, "ratios_to_processes": ratios,
              "median_ratio": {v: float(np.median(r)) for v, r in ratios.items()}}
    out = args.out or Path(__file__).parent / "results" / f"dask_floor_{args.n}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median_ratio"]))


if __name__ == "__main__":
    main()
