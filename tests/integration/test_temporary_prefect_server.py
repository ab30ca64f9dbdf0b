"""The Dask engine without PREFECT_API_URL: the chunks' flow run reports to Prefect's temporary
server, which the process stops as it exits, without a line (under pytest that line met a closed
console stream at exit and printed a logging error after the suite's summary)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from genloop.core.logs import OFFLINE_DEFAULTS

pytest.importorskip("distributed")

MAP = """
import math
from genloop.core.chunk_map import chunk_map
from genloop.core.config import ParallelParams
print(chunk_map(math.sqrt, [4.0, 9.0], ParallelParams(engine="dask", workers=1)))
from prefect.server.api.server import SubprocessASGIServer
print(SubprocessASGIServer().api_url, flush=True)
"""


def test_the_temporary_prefect_server_stops_quietly_at_exit(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    # a fresh Prefect home: the server's first start migrates its database (the CLI allows it 180 s)
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=OFFLINE_DEFAULTS[
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
    done = subprocess.run([sys.executable, "-c", MAP], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    *_, results, api_url = done.stdout.splitlines()
    assert results == "[2.0, 3.0]"
    assert "Starting temporary server" in done.stderr  # the temporary server did serve the flow run
    assert "Stopping temporary server" not in done.stderr and "Logging error" not in done.stderr
    with pytest.raises(httpx.ConnectError):  # and it is gone with the process
        httpx.get(f"{api_url}/health", timeout=5)
