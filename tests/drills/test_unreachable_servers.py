"""Failure is clear: a wrong S3 endpoint or a stopped MLflow server ends `genloop loop` after
bounded retries with one readable error naming the endpoint and the variable to fix, and
leaves no partial dataset version behind."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import free_port
from tests.helpers import TINY, cli_env, make_workspace


def _failed_loop(genloop_loop: Callable, ws: Path, env: dict[str, str]) -> tuple[str, str, float]:
    """Run `genloop loop`, expecting it to fail with exactly one readable error line and no
    traceback; returns (stderr, the error line, seconds until it gave up)."""
    started = time.monotonic()
    done = genloop_loop(ws, env, timeout=300, ok=False)
    seconds = time.monotonic() - started
    assert done.returncode == 75, done.stderr[-3000:]  # EX_TEMPFAIL: a scheduler may retry
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done.stderr, errors[0], seconds


def test_a_wrong_s3_endpoint_fails_collect_clearly_and_leaves_no_dataset_version(
        tmp_path: Path, genloop_loop: Callable, prefect_api: str):
    ws = make_workspace(tmp_path, [*TINY, "collect.sources=[{uri: 's3://images/icons'}]"])
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = cli_env(ws, GENLOOP_S3_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                  AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", PREFECT_API_URL=prefect_api)
    stderr, error, seconds = _failed_loop(genloop_loop, ws, env)
    assert endpoint in error and "GENLOOP_S3_ENDPOINT_URL" in error and "s3://images/icons" in error
    assert "Retries are exhausted" in stderr  # Prefect retried the collect task, then gave up
    assert not (ws / "data.dvc").exists()
    assert not (ws / "data" / "raw").exists()
    print(f"wrong S3 endpoint: failed after {seconds:.1f} s")


def test_a_stopped_mlflow_server_fails_the_loop_clearly(tmp_path: Path, genloop_loop: Callable, prefect_api: str):
    ws = make_workspace(tmp_path)
    tracking = f"http://127.0.0.1:{free_port()}"  # a server that is not running
    env = cli_env(ws, MLFLOW_TRACKING_URI=tracking, MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", PREFECT_API_URL=prefect_api)
    _, error, seconds = _failed_loop(genloop_loop, ws, env)
    assert tracking in error and "MLFLOW_TRACKING_URI" in error
    assert not (ws / "models" / "generator.pt").exists()
    print(f"stopped MLflow server: failed after {seconds:.1f} s")
