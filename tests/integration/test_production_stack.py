"""infra/'s production backends, for real, started as plain processes (container images cannot be
pulled on these machines): PostgreSQL from Debian's package as the backend store of the MLflow
server and of the Prefect server, configured with the variables docker-compose.yml gives them;
moto standing in for MinIO (MLflow's artefact store, the DVC remote); a Dask scheduler and two
workers; a Prefect process worker. A deployment run of the whole loop, with clean's chunks on the
Dask workers, completes on that stack."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from genloop.core.chunk_map import DASK_WORKERS_CONFIG
from tests.conftest import free_port
from tests.helpers import BIN, TINY, cli_env, make_workspace, run_cli

ROOT = Path(__file__).resolve().parents[2]
PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
POOL = "genloop-production"
USER, PASSWORD = "genloop", "pg-test-password-5b1e"  # a throwaway cluster in the test's temp folder

pytestmark = pytest.mark.skipif(not PG_BINS, reason="PostgreSQL is not installed: apt-get install postgresql")


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the package's `postgres` user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    for p in reversed(procs):
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{proc.args[0]} exited {proc.returncode}:\n{log.read_text()[-4000:]}"
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} never answered:\n{log.read_text()[-4000:]}"
        time.sleep(1)


@pytest.fixture
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster on 127.0.0.1 with password auth and the databases `mlflow` and
    `prefect`, as infra/postgres creates them; yields host:port. Its folder is a fresh one in the
    system temp folder: pytest's own are private to this user, which `postgres` is not."""
    bindir = PG_BINS[-1].parent
    home = Path(tempfile.mkdtemp(prefix="genloop-pg-"))
    (home / "pw").write_text(PASSWORD)
    (home / "postgres.log").touch()
    if os.geteuid() == 0:
        for p in (home, home / "pw", home / "postgres.log"):
            shutil.chown(p, "postgres", "postgres")
    log = home / "postgres.log"
    proc = None
    try:
        subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(home / "data"), "-U", USER, "--pwfile",
                                     str(home / "pw"), "--auth", "scram-sha-256", "--no-sync"]),
                       check=True, capture_output=True)
        port = free_port()
        proc = _start(_as_postgres([str(bindir / "postgres"), "-D", str(home / "data"), "-p", str(port), "-k",
                                    str(home), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]),
                      log, dict(os.environ), home)
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        deadline = time.monotonic() + 60
        while subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        for db in ("mlflow", "prefect"):
            subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, db], env=env,
                           check=True, capture_output=True)
        yield f"127.0.0.1:{port}"
    finally:
        if proc is not None:
            _stop([proc])
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def stack(tmp_path: Path, postgres: str, moto_server: str) -> Iterator[dict[str, Any]]:
    """MLflow and Prefect servers on PostgreSQL, moto as S3, a Dask scheduler and workers and a
    Prefect worker, all on 127.0.0.1; the variables are those of infra/docker-compose.yml."""
    import boto3

    (tmp_path / "ws").mkdir()
    ws = make_workspace(tmp_path / "ws", TINY)
    s3 = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    for bucket in ("genloop-mlflow", "genloop-data"):
        client.create_bucket(Bucket=bucket)
    ports = {name: free_port() for name in ("mlflow", "prefect", "dask", "dask_http")}
    prefect_api = f"http://127.0.0.1:{ports['prefect']}/api"
    mlflow_url = f"http://127.0.0.1:{ports['mlflow']}"
    base = cli_env(ws, **s3)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        mlflow_env = {**base, "MLFLOW_BACKEND_STORE_URI": f"postgresql://{USER}:{PASSWORD}@{postgres}/mlflow",
                      "MLFLOW_ARTIFACTS_DESTINATION": "s3://genloop-mlflow", "MLFLOW_S3_ENDPOINT_URL": moto_server}
        procs.append(_start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(ports["mlflow"]),
                             "--serve-artifacts", "--workers", "1"], logs / "mlflow.log", mlflow_env, ws))
        prefect_env = {**base, "PREFECT_API_DATABASE_CONNECTION_URL":
                       f"postgresql+asyncpg://{USER}:{PASSWORD}@{postgres}/prefect"}
        procs.append(_start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                             str(ports["prefect"])], logs / "prefect.log", prefect_env, ws))
        dask_env = {**base, "DASK_CONFIG": str(DASK_WORKERS_CONFIG)}  # as the image's /etc/dask/genloop.yaml
        procs.append(_start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(ports["dask"]),
                             "--dashboard-address", f"127.0.0.1:{ports['dask_http']}"], logs / "dask-scheduler.log",
                            dask_env, ws))
        _wait_http(f"{mlflow_url}/health", procs[0], logs / "mlflow.log")
        _wait_http(f"{prefect_api}/health", procs[1], logs / "prefect.log")
        _wait_http(f"http://127.0.0.1:{ports['dask_http']}/health", procs[2], logs / "dask-scheduler.log")
        dask_address = f"tcp://127.0.0.1:{ports['dask']}"
        procs.append(_start([str(BIN / "dask"), "worker", dask_address, "--nworkers", "2", "--nthreads", "1",
                             "--dashboard-address", "127.0.0.1:0", "--host", "127.0.0.1"], logs / "dask-worker.log",
                            dask_env, ws))  # as infra/ runs them: no Prefect settings, the chunks are plain Dask tasks
        worker_env = {**base, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": mlflow_url,
                      "MLFLOW_REGISTRY_URI": mlflow_url, "GENLOOP_S3_ENDPOINT_URL": moto_server,
                      "GENLOOP_DVC_REMOTE": "s3://genloop-data/dvc"}
        run_cli([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"], ws,
                {**base, "PREFECT_API_URL": prefect_api}, timeout=120)
        procs.append(_start([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"],
                            logs / "worker.log", worker_env, ws))
        yield {"ws": ws, "env": {**base, "PREFECT_API_URL": prefect_api}, "mlflow": mlflow_url, "dask": dask_address,
               "logs": logs, "prefect_api": prefect_api}
    finally:
        _stop(procs)


def test_a_loop_deployment_completes_on_postgres_backed_servers_with_clean_on_dask_workers(stack, postgres) -> None:
    ws, env = stack["ws"], stack["env"]
    spec = yaml.safe_load((ROOT / "flows" / "prefect.yaml").read_text())
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    spec["deployments"] = [{**nightly, "name": "production", "work_pool": {**nightly["work_pool"], "name": POOL},
                            "schedules": []}]
    (ws / "production-prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    run_cli([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", "production-prefect.yaml"],
            ws, env, timeout=300)
    overrides = ["parallel.engine=dask", f"parallel.address={stack['dask']}", "parallel.chunk_size=50"]
    done = run_cli([str(BIN / "prefect"), "deployment", "run", "genloop-loop/production", "--param",
                    f"overrides={json.dumps(overrides)}", "--watch", "--watch-timeout", "900"], ws, env, timeout=960)
    assert "Completed" in done.stdout, done.stdout[-3000:] + (stack["logs"] / "worker.log").read_text()[-4000:]
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", done.stdout).group(1)
    api = httpx.Client(base_url=stack["prefect_api"], trust_env=False, timeout=30)
    assert api.get(f"/flow_runs/{flow_run_id}").json()["state"]["type"] == "COMPLETED"
    # clean's chunks ran on the Dask workers in a genloop-chunks flow run, which logged its progress
    # (400 digits in chunks of 50: a line per chunk, as there are fewer than FLOW_LOG_LINES)
    runs = api.post("/flow_runs/filter", json={"flows": {"name": {"any_": ["genloop-chunks"]}}}).json()
    assert runs and all(r["state"]["type"] == "COMPLETED" for r in runs)
    logs = api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [r["id"] for r in runs]}}}).json()
    pattern = re.compile(r"(\d+) of \d+ chunks done on the Dask cluster at " + re.escape(stack["dask"]))
    logged = {m.group(1) for m in (pattern.search(log["message"]) for log in logs) if m}
    assert len(logged) >= 8
    assert (ws / "data" / "manifest.parquet").exists()
    # the registry lives in PostgreSQL: the model version is read back through the MLflow server
    mlflow = httpx.Client(base_url=stack["mlflow"], trust_env=False, timeout=30)
    versions = mlflow.get("/api/2.0/mlflow/registered-models/get-latest-versions",
                          params={"name": "genloop-generator"}).json()["model_versions"]
    assert versions and versions[0]["status"] == "READY"
    host, port = postgres.split(":")
    rows = subprocess.run([str(PG_BINS[-1].parent / "psql"), "-h", host, "-p", port, "-U", USER, "-d", "mlflow", "-tAc",
                           "select count(*) from model_versions"], env={**os.environ, "PGPASSWORD": PASSWORD},
                          capture_output=True, text=True, check=True).stdout.strip()
    assert int(rows) >= 1
