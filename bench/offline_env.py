"""Shared set-up of the bench scripts: paths, no telemetry, an embedded MLflow store.

Imported first (the scripts run as `python bench/<name>.py`, so this folder is on sys.path).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

for _var, _value in (("DO_NOT_TRACK", "1"), ("DVC_NO_ANALYTICS", "1"), ("GX_ANALYTICS_ENABLED", "false")):
    os.environ.setdefault(_var, _value)
for _var in ("MLFLOW_TRACKING_URI", "GENLOOP_PARENT_RUN_ID"):  # an embedded store inside the workdir
    os.environ.pop(_var, None)
