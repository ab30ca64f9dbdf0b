"""Shared fixtures (a quiet environment, a real moto S3 server, `genloop loop`) and the one place
that marks tests `integration`: every test under tests/integration/, every test that uses a
fixture starting a server (SERVER_FIXTURES, directly or through the fixtures it uses), and the
slow fault drills (INTEGRATION_MODULES). `pytest -m "not integration"` then starts no server
(tests/unit/test_markers.py checks it)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# Fixtures that start a server. A fixture built on one (s3_env, proxy, s3_bucket, first_run...)
# is in a test's fixture closure with it, so it need not be listed.
SERVER_FIXTURES = frozenset({
    "moto_server",  # moto's S3 server (tests/conftest.py)
    "genloop_loop",  # `genloop loop`: a Prefect flow, on Prefect's temporary API server (tests/conftest.py)
    "mlflow_server",  # `mlflow server` (tests/integration/test_e2e.py, reused by test_feedback_loop.py)
    "mlflow_servers",  # `mlflow server`s a test starts and kills (tests/drills/test_injected_faults.py)
    "review_server",  # the review app under uvicorn (tests/unit/test_review_app.py), and with headless
                      # Chromium (tests/integration/test_review_browser.py)
    "services",  # `genloop services up`: MLflow server, Prefect server and worker (test_scheduled.py)
    "spare_services",  # another `genloop services up`, for the `services down` test (test_scheduled.py)
    "local_services",  # `genloop services up` (tests/integration/test_infra.py)
})
# Fault drills that run whole CLI stages many times (SIGKILL, ENOSPC at every write point, S3 and
# MLflow faults): slow, so they run with the integration tests (`make test-integration`).
INTEGRATION_MODULES = frozenset({"drills/test_sigkill.py", "drills/test_injected_faults.py"})


def integration_reason(item: pytest.Item) -> str | None:
    """Why `item` is an integration test (None when it is not)."""
    rel = Path(item.path).resolve().relative_to(TESTS).as_posix()
    if rel.startswith("integration/"):
        return "under tests/integration/"
    if rel in INTEGRATION_MODULES:
        return "a slow fault drill"
    servers = sorted(SERVER_FIXTURES & set(getattr(item, "fixturenames", ())))
    return f"starts a server ({', '.join(servers)})" if servers else None


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if integration_reason(item):
            item.add_marker(pytest.mark.integration)

S3_ENV_VARS = (
    "GENLOOP_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
)


@pytest.fixture(scope="session", autouse=True)
def _shared_judges(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One judge cache for the session ($GENLOOP_JUDGE_CACHE, inherited by every CLI subprocess):
    workspaces built from the same tiny corpus reuse the extractor, the real-image classifier,
    the reference statistics and the calibration the first of them trained, as checkouts of a
    project do (entries are keyed by content, never by path). Session-scoped, so it is set
    before any module-scoped workspace fixture runs a stage."""
    path = tmp_path_factory.mktemp("judges")
    before = os.environ.get("GENLOOP_JUDGE_CACHE")
    os.environ["GENLOOP_JUDGE_CACHE"] = str(path)
    yield path
    if before is None:
        os.environ.pop("GENLOOP_JUDGE_CACHE", None)
    else:
        os.environ["GENLOOP_JUDGE_CACHE"] = before


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No telemetry from DVC, no S3 endpoint or credentials leaking in from the host."""
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    for var in S3_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _serving(cmd: list[str], url: str, probe: str, log: Path, env: dict[str, str],
             timeout: float) -> Iterator[str]:
    """A server process on 127.0.0.1, up once `url + probe` answers over HTTP (any status); stopped after."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with opener.open(url + probe, timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # an HTTP answer of any status: the server is up
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd} did not answer on {url}:\n{log.read_text()}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's standalone S3 server as a real process on 127.0.0.1; yields its endpoint URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with _serving([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                  f"http://127.0.0.1:{port}", "/", log, env, timeout=30) as url:
        yield url


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`prefect server start` as a real process on 127.0.0.1 (per xdist worker); yields its API URL.

    For tests that run several loops: each `genloop loop` without PREFECT_API_URL starts (and
    migrates) Prefect's temporary server, 15-25 s a loop. tests/integration/test_e2e.py and
    test_loop_console.py keep that path, the one a newcomer takes."""
    from tests.helpers import BIN

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               NO_PROXY="127.0.0.1,localhost")
    with _serving([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                  f"http://127.0.0.1:{port}", "/api/health", home / "server.log", env, timeout=180) as url:
        yield url + "/api"


@pytest.fixture
def s3_env(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point genloop (GENLOOP_S3_ENDPOINT_URL) and boto3 at the moto server."""
    monkeypatch.setenv("GENLOOP_S3_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return moto_server


@pytest.fixture
def genloop_loop() -> Callable[..., subprocess.CompletedProcess]:
    """`genloop loop` in a workspace: run(ws, env, *args, timeout=600, ok=True) (see helpers.run_cli).
    The loop is a Prefect flow, so it starts Prefect's temporary API server: a test that runs it
    takes this fixture and is an integration test."""
    from tests.helpers import BIN, run_cli

    def run(ws: Path, env: dict[str, str], *args: str, timeout: int = 600,
            ok: bool = True) -> subprocess.CompletedProcess:
        return run_cli([str(BIN / "genloop"), "loop", *args], ws, env, timeout=timeout, ok=ok)

    return run
