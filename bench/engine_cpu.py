"""Where the CPU of a clean goes, per engine: each process of `genloop clean`'s tree and each of its
threads, beside the Prefect server's, for pairs of first cleans (processes, then dask).

    .venv/bin/python bench/engine_cpu.py --workdir /tmp/gs100d --n 100000 [--pairs 4]

It reuses the workspaces `bench/scale.py --data-only --engines processes,dask` leaves in the same
--workdir (run that first). Threads are read from /proc every 0.25 s, and a thread that exits keeps
its last figure, so the Dask workers' chunk thread and event-loop thread show apart. Children are
found through every thread of a process, since the local cluster's workers are started by a thread
of the stage. Linux only. Hand-written: psutil's process tree reads each process once per call and
loses the threads that have exited by the last sample.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

TICK = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 0.25


def _threads_cpu(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def _descendants(pid: int) -> list[int]:
    found: list[str] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                found += Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
            except OSError:
                pass
    except OSError:
        return []
    return [int(c) for c in found] + [g for c in found for g in _descendants(int(c))]


def _prefect_server() -> psutil.Process | None:
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "prefect" in cmd and " server start" in cmd:
            return proc
    return None


def one_clean(engine: str, workspace: Path, env: dict[str, str]) -> dict[str, object]:
    """One first clean (the clean cache removed) with every process and thread of its tree sampled."""
    subprocess.run(["rm", "-rf", str(workspace / ".genloop" / "cache" / "clean")], check=True)
    cmd = [sys.executable, "-m", "genloop.cli.main", "clean", "--set", "collect.dvc_add=false",
           "--set", "data.resolution=32", "--set", "data.mode=RGB", "--set", f"parallel.engine={engine}"]
    server = _prefect_server()
    server_cpu0 = sum(server.cpu_times()[:2]) if server else 0.0
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=workspace, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    names: dict[int, str] = {}
    threads: dict[int, dict[str, float]] = {}
    while proc.poll() is None:
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                names.setdefault(pid, Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " "))
                threads[pid] = threads.get(pid, {}) | _threads_cpu(pid)  # exited threads keep their figure
            except OSError:
                continue
        time.sleep(SAMPLE_S)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"genloop clean ({engine}) failed with exit status {proc.returncode} in {workspace}")
    processes = []
    for pid, by_thread in threads.items():
        if "resource_tracker" in names[pid] or not any(by_thread.values()):  # the tracker; a short-lived helper
            continue
        top = sorted(by_thread.values(), reverse=True)
        role = "stage" if pid == proc.pid else "worker"
        processes.append({"role": role, "cpu": round(sum(top), 2), "threads": [round(t, 2) for t in top[:3]]})
    return {"engine": engine, "wall": round(wall, 2), "tree_cpu": round(sum(p["cpu"] for p in processes), 2),
            "prefect_server_cpu": round(sum(server.cpu_times()[:2]) - server_cpu0, 2) if server else None,
            "processes": processes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="the --workdir of an earlier bench/scale.py run")
    parser.add_argument("--n", type=int, default=100000, help="the --n of that run")
    parser.add_argument("--pairs", type=int, default=4, help="processes-then-dask pairs of first cleans")
    args = parser.parse_args()
    workspaces = {e: args.workdir / f"ws_{args.n}_{e}" for e in ("processes", "dask")}
    missing = [str(w) for w in workspaces.values() if not (w / "data" / "ledger.parquet").exists()]
    if missing:
        raise SystemExit(f"no collected workspace at {', '.join(missing)}: run bench/scale.py --n {args.n} "
                         f"--data-only --engines processes,dask --workdir {args.workdir} first")
    env = dict(os.environ, DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1",
               GX_ANALYTICS_ENABLED="false", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    home = None
    if not env.get("PREFECT_API_URL"):  # the Dask engine reports to a Prefect server, as in bench/scale.py
        from genloop.orchestrate import local_services

        home = args.workdir / "services"
        env |= local_services.up(home, args.workdir)["env"]
    try:
        for pair in range(1, args.pairs + 1):
            for engine in ("processes", "dask"):
                r = one_clean(engine, workspaces[engine], env)
                print(f"pair {pair} {engine:<9} wall {r['wall']:6.2f} s  tree CPU {r['tree_cpu']:6.2f} s  "
                      f"Prefect server {r['prefect_server_cpu']} s")
                for p in r["processes"]:
                    print(f"    {p['role']:<6} CPU {p['cpu']:6.2f} s, busiest threads {p['threads']}")
    finally:
        if home is not None:
            local_services.down(home)


if __name__ == "__main__":
    main()
