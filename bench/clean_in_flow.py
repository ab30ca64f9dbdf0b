"""One clean inside a Prefect flow run, the way a deployment's flow process runs a stage: Prefect
imported and a flow run open before the stage starts. Times the stage alone (a deployment pays
Prefect's start whatever the engine) and writes {"seconds": ...} to `--out`. Run in the workspace:

    .venv/bin/python bench/clean_in_flow.py --out seconds.json --set parallel.engine=dask ...

`bench/scale.py --rounds K --in-flow` runs it for each round.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefect import flow
from timed_clean import timed_clean


@flow(name="bench-clean-in-flow", persist_result=False)
def clean_in_flow(overrides: list[str]) -> float:
    """clean on the workspace in the current folder; its seconds."""
    return timed_clean(overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="where to write the stage's seconds (JSON)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params override")
    args = ap.parse_args()
    args.out.write_text(json.dumps({"seconds": round(clean_in_flow(args.set), 2)}))


if __name__ == "__main__":
    main()
