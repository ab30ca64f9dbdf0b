"""One clean on the workspace in the current folder, the stage timed alone (not the process's
start). Shared by clean_in_flow.py (inside a flow run) and dask_floor.py (with and without
Prefect), so it imports no Prefect itself. The scripts run as `python bench/<name>.py`, which puts
this folder on sys.path."""

from __future__ import annotations

import time
from pathlib import Path

from genloop.core.config import load_params
from genloop.core.workspace import Workspace
from genloop.stages import clean


def timed_clean(overrides: list[str]) -> float:
    """clean with the workspace's params.yaml (if any) and `overrides`; the stage's seconds."""
    cfg = load_params("params.yaml" if Path("params.yaml").exists() else None, overrides)
    start = time.perf_counter()
    clean.run(cfg, Workspace.at("."))
    return time.perf_counter() - start
