"""What scheduling costs: `genloop services up`, then the same loop two ways with the same params,
tracking to the same MLflow server:

  reference:  `genloop loop` in workspace A (Prefect's ephemeral API, in-process tasks)
  deployment: `prefect deployment run 'genloop-loop/nightly' --watch` in workspace B
              (Prefect server, process worker, a flow-run subprocess)

and a second, cached run of each (clean/validate/train/evaluate skipped). Prints seconds and the
deployment/reference ratio. Usage (from the repository root, after `make install`):

  .venv/bin/python bench/orchestration_overhead.py [--set train.epochs=2 ...] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port  # noqa: E402
from tests.helpers import BIN, TINY, cli_env, make_workspace, run_cli  # noqa: E402


def timed(cmd: list[str], ws: Path, env: dict[str, str]) -> float:
    started = time.monotonic()
    run_cli(cmd, ws, env, timeout=3600)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="param override (repeatable)")
    parser.add_argument("--tiny", action="store_true", help="the test suite's tiny settings (400 images, 1 epoch)")
    args = parser.parse_args()
    overrides = [*(TINY if args.tiny else []), *args.sets]
    base = Path(tempfile.mkdtemp(prefix="genloop-bench-"))
    for name in ("a", "b"):
        (base / name).mkdir()
    ws_a, ws_b = make_workspace(base / "a", overrides), make_workspace(base / "b", overrides)
    genloop = str(BIN / "genloop")
    up = [genloop, "services", "up", "--dir", str(base / "services"),
          "--mlflow-port", str(free_port()), "--prefect-port", str(free_port())]
    figures: dict[str, float] = {"services_up_s": timed(up, ws_b, cli_env(ws_b))}
    state = json.loads((base / "services" / "services.json").read_text())
    try:
        served = cli_env(ws_b, **state["env"])
        embedded = cli_env(ws_a, MLFLOW_TRACKING_URI=state["env"]["MLFLOW_TRACKING_URI"])
        run_cli([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", "flows/prefect.yaml"],
                ws_b, served)
        deployment = [str(BIN / "prefect"), "deployment", "run", "genloop-loop/nightly", "--watch",
                      "--watch-timeout", "3600", "--param", f"overrides={json.dumps([])}"]
        for label in ("first", "cached"):
            figures[f"loop_{label}_s"] = timed([genloop, "loop"], ws_a, embedded)
            figures[f"deployment_{label}_s"] = timed(deployment, ws_b, served)
    finally:
        subprocess.run([genloop, "services", "down", "--dir", str(base / "services")], cwd=ws_b,
                       env=cli_env(ws_b), capture_output=True, timeout=120)
    for label in ("first", "cached"):
        figures[f"ratio_{label}"] = figures[f"deployment_{label}_s"] / figures[f"loop_{label}_s"]
    print(f"params overrides: {overrides or 'none (params.yaml defaults)'}")
    print(f"services up (MLflow server + Prefect server + worker online): {figures['services_up_s']:.1f} s")
    print(f"{'':10s} {'genloop loop':>14s} {'deployment run':>16s} {'ratio':>7s}")
    for label in ("first", "cached"):
        print(f"{label:10s} {figures[f'loop_{label}_s']:13.1f}s {figures[f'deployment_{label}_s']:15.1f}s "
              f"{figures[f'ratio_{label}']:7.2f}")
    print(json.dumps({k: round(v, 2) for k, v in figures.items()}))
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
