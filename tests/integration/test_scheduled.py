"""Scheduled runs on real servers: `genloop services up` (MLflow server, Prefect server, a process
worker), `prefect deploy --name nightly --name hourly`, `prefect deployment run` to Completed, the
cache-skip rerun,
a rerun after one training param changed, and `genloop services down`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import mlflow
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import free_port
from tests.drills import secret_scan
from tests.helpers import BIN, CLI_OUTPUTS, TINY, cli_env, make_workspace, run_cli

pytestmark = pytest.mark.integration

LOOP = "genloop-loop/nightly"
CACHEABLE = ("clean", "validate", "train", "evaluate")
# the secrets drill: fake credentials in every process of the run, S3 sinks + a DVC S3 remote on moto
PLANTED = secret_scan.planted_secrets()
CANARY = secret_scan.canary()  # the sink bucket's name: NOT a secret, so it must be found


@pytest.fixture(scope="module")
def drill_env(moto_server: str) -> dict[str, str]:
    return secret_scan.drill_env(PLANTED, moto_server)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, drill_env: dict[str, str]) -> Path:
    ws = make_workspace(tmp_path_factory.mktemp("scheduled"), [*TINY, *secret_scan.sink_overrides(CANARY)])
    secret_scan.use_s3(ws, drill_env, CANARY)
    return ws


@pytest.fixture(scope="module")
def services(workspace: Path, drill_env: dict[str, str]) -> Any:
    """The services, started by the real `genloop services up` on free ports; stopped at the end."""
    home = workspace / ".genloop" / "services"
    cmd = [str(BIN / "genloop"), "services", "up", "--mlflow-port", str(free_port()),
           "--prefect-port", str(free_port())]
    started = time.monotonic()
    done = run_cli(cmd, workspace, cli_env(workspace, **drill_env), timeout=400)
    state = json.loads((home / "services.json").read_text())
    state["stdout"] = done.stdout
    state["wall_seconds"] = time.monotonic() - started
    state["drill_env"] = drill_env
    yield state
    subprocess.run([str(BIN / "genloop"), "services", "down"], cwd=workspace, env=cli_env(workspace),
                   capture_output=True, timeout=120)


def _env(workspace: Path, services: dict[str, Any]) -> dict[str, str]:
    return cli_env(workspace, **services["drill_env"], **services["env"])


def _api(services: dict[str, Any], path: str, body: dict[str, Any] | None = None) -> Any:
    reply = httpx.post(services["urls"]["prefect_api"] + path, json=body or {}, timeout=30, trust_env=False)
    reply.raise_for_status()
    return reply.json()


def _run_deployment(workspace: Path, services: dict[str, Any], overrides: list[str]) -> tuple[str, float]:
    """`prefect deployment run LOOP --watch` with these overrides; returns (flow run id, seconds)."""
    cmd = [str(BIN / "prefect"), "deployment", "run", LOOP, "--param", f"overrides={json.dumps(overrides)}",
           "--watch", "--watch-timeout", "900"]
    started = time.monotonic()
    done = run_cli(cmd, workspace, _env(workspace, services), timeout=960)
    seconds = time.monotonic() - started
    assert "Completed" in done.stdout, done.stdout[-3000:]
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", done.stdout).group(1)
    return flow_run_id, seconds


def _task_states(services: dict[str, Any], flow_run_id: str) -> dict[str, str]:
    runs = _api(services, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {r["name"].rsplit("-", 1)[0]: r["state"]["name"] for r in runs}


@pytest.fixture(scope="module")
def deployed(workspace: Path, services: dict[str, Any]) -> str:
    done = run_cli([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "nightly", "--name", "hourly",
                    "--prefect-file", "flows/prefect.yaml"],
                   workspace, _env(workspace, services), timeout=300)
    return done.stdout


@pytest.fixture(scope="module")
def first_run(workspace: Path, services: dict[str, Any], deployed: str) -> tuple[str, float]:
    return _run_deployment(workspace, services, TINY)


def test_services_up_prints_the_urls_and_writes_logs_to_a_folder(services):
    for url in services["urls"].values():
        assert url.startswith("http://127.0.0.1:")
        assert url in services["stdout"]
    for name in ("mlflow", "prefect", "worker"):
        entry = services["processes"][name]
        assert psutil.pid_exists(entry["pid"])
        assert Path(entry["log"]).exists() and Path(entry["log"]).parent.name == "logs"
    assert httpx.get(services["urls"]["mlflow"] + "/health", trust_env=False).status_code == 200
    pools = _api(services, "/work_pools/filter")
    assert any(p["name"] == "genloop-local" and p["type"] == "process" for p in pools)


def test_deploy_registers_both_deployments_with_cron_schedules(services, deployed):
    deployments = {d["name"]: d for d in _api(services, "/deployments/filter")}
    assert {"nightly", "hourly"} <= set(deployments)
    crons = {name: [s["schedule"]["cron"] for s in d["schedules"] if s["active"]] for name, d in deployments.items()}
    assert crons["nightly"] == ["0 2 * * *"]
    assert crons["hourly"] == ["0 * * * *"]
    assert deployments["nightly"]["work_pool_name"] == "genloop-local"


def test_deployment_run_completes_and_leaves_a_registered_champion(first_run, services, workspace):
    flow_run_id, _ = first_run
    states = _task_states(services, flow_run_id)
    assert states == {name: "Completed" for name in ("collect", *CACHEABLE, "register", "generate", "optimize")}
    mlflow.set_tracking_uri(services["urls"]["mlflow"])
    mlflow.set_registry_uri(services["urls"]["mlflow"])
    client = MlflowClient()
    champion = client.get_model_version_by_alias("genloop-generator", "champion")
    assert champion.version == "1"
    exp = client.get_experiment_by_name("genloop")
    runs = client.search_runs([exp.experiment_id], f"tags.`genloop.prefect_flow_run_id` = '{flow_run_id}'")
    by_stage = {r.data.tags["genloop.stage"]: r for r in runs}
    assert {"loop", "train", "evaluate", "register"} <= set(by_stage)
    parent = by_stage["loop"]
    assert by_stage["train"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.tags["genloop.data_version"] not in ("", "untracked")
    assert parent.data.tags["genloop.git_commit"]
    generated = [p for p in (workspace / "outputs" / "generated" / "1").glob("*.png") if p.name != "grid.png"]
    assert len(generated) == 24


def test_the_flow_publishes_a_summary_linking_the_mlflow_run_and_a_metrics_table(first_run, services):
    flow_run_id, _ = first_run
    artifacts = {a["key"]: a for a in _api(services, "/artifacts/filter",
                                            {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})}
    summary = artifacts["genloop-loop-summary"]["data"]
    assert services["urls"]["mlflow"] + "/#/experiments/" in summary
    assert "data version" in summary and "promoted" in summary
    table = artifacts["genloop-loop-metrics"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert {row["metric"] for row in table} >= {"fid", "kid_mean"}


def test_a_second_run_over_unchanged_data_and_params_skips_the_cached_stages(first_run, services, workspace):
    flow_run_id, seconds = _run_deployment(workspace, services, TINY)
    states = _task_states(services, flow_run_id)
    assert {name: states[name] for name in CACHEABLE} == {name: "Cached" for name in CACHEABLE}
    assert states["register"] == states["generate"] == "Completed"
    client = MlflowClient(services["urls"]["mlflow"])
    versions = client.search_model_versions("name = 'genloop-generator'")
    assert len(versions) == 1  # the same weights are not registered twice
    artifacts = _api(services, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    summary = next(a["data"] for a in artifacts if a["key"] == "genloop-loop-summary")
    assert "skipped (cached)" in summary
    # two scheduled runs are two linked iterations in MLflow
    exp = client.get_experiment_by_name("genloop")
    parents = {}
    for run_id in (first_run[0], flow_run_id):
        found = client.search_runs([exp.experiment_id], f"tags.`genloop.prefect_flow_run_id` = '{run_id}' "
                                   "and tags.`genloop.stage` = 'loop'")
        assert len(found) == 1
        parents[run_id] = found[0]
    first, second = parents[first_run[0]], parents[flow_run_id]
    assert first.data.tags["genloop.iteration"] == "1"
    assert second.data.tags["genloop.iteration"] == "2"
    assert second.data.tags["genloop.previous_run_id"] == first.info.run_id
    assert second.data.tags["genloop.previous_data_version"] == first.data.tags["genloop.data_version"]
    print(f"cached rerun: {seconds:.1f} s; first run: {first_run[1]:.1f} s")


def test_changing_one_training_param_reruns_train_and_what_follows_only(first_run, services, workspace):
    flow_run_id, _ = _run_deployment(workspace, services, [*TINY, "train.lr=0.0003"])
    states = _task_states(services, flow_run_id)
    assert states["clean"] == states["validate"] == "Cached"
    assert states["train"] == states["evaluate"] == states["register"] == "Completed"
    client = MlflowClient(services["urls"]["mlflow"])
    assert len(client.search_model_versions("name = 'genloop-generator'")) == 2


def test_no_planted_secret_reaches_any_output(first_run, services, workspace, tmp_path, tmp_path_factory):
    """The secrets drill. Every process of the scheduled runs (servers, worker, flow runs, CLI)
    had fake credentials in its environment, and S3 was in play (sinks, a DVC S3 remote on
    moto). No secret, nor its URL-encoded/JSON-escaped/base64/line-wrapped form, may be in
    any output; planted non-secret values (the sink bucket's name, a param, the flow's name)
    must be found in each one, or the search did not really search it."""
    started = time.monotonic()
    worker_env = psutil.Process(services["processes"]["worker"]["pid"]).environ()  # flow runs inherit it
    assert {k: worker_env.get(k) for k in PLANTED} == PLANTED  # the secrets really were in play
    scan = secret_scan.SecretScan(PLANTED, (CANARY, "train.epochs=1", "genloop-loop"))
    scan.add_tree("workspace", workspace, skip=(".genloop/services/logs/",))
    scan.add_tree("service-logs", workspace / ".genloop" / "services" / "logs")
    for log in tmp_path_factory.getbasetemp().glob("moto*/server.log"):  # the S3 server's request log
        scan.add("s3-server-log", str(log), log.read_bytes())
    for cmd, out, err in CLI_OUTPUTS:
        scan.add("cli", " ".join(cmd), f"{out}\n{err}")
    secret_scan.dump_mlflow(scan, services["urls"]["mlflow"], tmp_path / "mlflow")
    read = secret_scan.dump_prefect(scan, services["urls"]["prefect_api"])
    print(scan.summary(), f"\nprefect: {read}; scan took {time.monotonic() - started:.1f} s")
    assert scan.hits == [], "\n".join(scan.hits[:20])
    # the scan really searched: enough of each source, and a planted non-secret value in each
    assert read["flow_runs"] >= 1 and read["logs"] >= 20 and read["artifacts"] >= 2
    assert scan.files["workspace"] >= 500 and scan.bytes["workspace"] >= 5_000_000
    assert scan.files["cli"] >= 3 and scan.files["service-logs"] >= 3 and scan.files["mlflow"] >= 20
    controls = {"workspace": CANARY, "mlflow": CANARY, "prefect-artifacts": CANARY, "s3-server-log": CANARY,
                "prefect-runs": "train.epochs=1", "prefect-logs": "genloop-loop", "service-logs": "genloop-loop",
                "cli": "genloop-loop"}
    for source, control in controls.items():
        assert scan.seen[source, control] > 0, f"{control!r} not found in {source}: was it really searched?"
    assert f"s3://{CANARY}/dvc" in (workspace / ".dvc" / "config").read_text()  # S3 was in play: the DVC remote,
    assert yaml.safe_load((workspace / "reports" / "generate.json").read_text())["sink_objects"] > 0  # the sink


def test_services_down_stops_exactly_what_up_started(services, workspace):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        pids = [e["pid"] for e in services["processes"].values()]
        done = run_cli([str(BIN / "genloop"), "services", "down"], workspace, cli_env(workspace), timeout=120)
        assert "mlflow" in done.stdout and "worker" in done.stdout and "prefect" in done.stdout
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                       for pid in pids)
        assert bystander.poll() is None  # an unrelated process is left alone
        again = run_cli([str(BIN / "genloop"), "services", "down"], workspace, cli_env(workspace))
        assert "nothing was running" in again.stdout
    finally:
        bystander.kill()
        bystander.wait()
