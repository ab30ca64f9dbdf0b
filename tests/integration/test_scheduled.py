"""Scheduled runs on real servers: `genloop services up` (MLflow server, Prefect server, a process
worker), `prefect deploy --all`, `prefect deployment run` to Completed, the
cache-skip rerun, a rerun after one training param changed, and `genloop services down`.

Each test passes alone and in any order: the shared setup is in module fixtures (the services,
the deployments, and the three deployment runs, which always happen in the same order), each run
recording what it left right after it ended; `services down` is tried on services of its own."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import free_port
from tests.drills import secret_scan
from tests.helpers import BIN, CLI_OUTPUTS, TINY, cli_env, make_workspace, run_cli

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


def _services_up(workspace: Path, env: dict[str, str]) -> dict[str, Any]:
    """The real `genloop services up` on free ports; returns its state (services.json) and output."""
    cmd = [str(BIN / "genloop"), "services", "up", "--mlflow-port", str(free_port()),
           "--prefect-port", str(free_port())]
    started = time.monotonic()
    done = run_cli(cmd, workspace, env, timeout=400)
    state = json.loads((workspace / ".genloop" / "services" / "services.json").read_text())
    state["stdout"] = done.stdout
    state["wall_seconds"] = time.monotonic() - started
    return state


def _services_down(workspace: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "genloop"), "services", "down"], cwd=workspace, env=cli_env(workspace),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def services(workspace: Path, drill_env: dict[str, str]) -> Any:
    """The services of the scheduled runs, with the planted secrets in their environment; stopped at the end."""
    state = _services_up(workspace, cli_env(workspace, **drill_env))
    state["drill_env"] = drill_env
    try:
        yield state
    finally:
        _services_down(workspace)


@pytest.fixture
def spare_services(tmp_path: Path) -> Any:
    """Services of their own for the test that stops them (so no other test depends on running first)."""
    ws = make_workspace(tmp_path)
    try:
        yield ws, _services_up(ws, cli_env(ws))
    finally:
        _services_down(ws)


def _env(workspace: Path, services: dict[str, Any]) -> dict[str, str]:
    return cli_env(workspace, **services["drill_env"], **services["env"])


def _api(services: dict[str, Any], path: str, body: dict[str, Any] | None = None) -> Any:
    reply = httpx.post(services["urls"]["prefect_api"] + path, json=body or {}, timeout=30, trust_env=False)
    reply.raise_for_status()
    return reply.json()


def _task_states(services: dict[str, Any], flow_run_id: str) -> dict[str, str]:
    runs = _api(services, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {r["name"].rsplit("-", 1)[0]: r["state"]["name"] for r in runs}


def _run_deployment(workspace: Path, services: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`prefect deployment run LOOP --watch` with these overrides, and what it left right after it
    ended (later runs move the aliases and add versions): its flow run id, seconds, task states,
    the registered versions and the champion."""
    cmd = [str(BIN / "prefect"), "deployment", "run", LOOP, "--param", f"overrides={json.dumps(overrides)}",
           "--watch", "--watch-timeout", "900"]
    started = time.monotonic()
    done = run_cli(cmd, workspace, _env(workspace, services), timeout=960)
    seconds = time.monotonic() - started
    assert "Completed" in done.stdout, done.stdout[-3000:]
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", done.stdout).group(1)
    client = MlflowClient(services["urls"]["mlflow"], registry_uri=services["urls"]["mlflow"])
    return {"flow_run_id": flow_run_id, "seconds": seconds, "states": _task_states(services, flow_run_id),
            "versions": sorted(v.version for v in client.search_model_versions("name = 'genloop-generator'")),
            "champion": client.get_model_version_by_alias("genloop-generator", "champion").version}


@pytest.fixture(scope="module")
def deployed(workspace: Path, services: dict[str, Any]) -> str:
    done = run_cli([str(BIN / "prefect"), "--no-prompt", "deploy", "--all",
                    "--prefect-file", "flows/prefect.yaml"],
                   workspace, _env(workspace, services), timeout=300)
    return done.stdout


# The three deployment runs happen in this order whichever test asks first (each fixture asks
# for the one before): the first run, a rerun with nothing changed, a rerun with one param changed.
@pytest.fixture(scope="module")
def first_run(workspace: Path, services: dict[str, Any], deployed: str) -> dict[str, Any]:
    return _run_deployment(workspace, services, TINY)


@pytest.fixture(scope="module")
def unchanged_rerun(workspace: Path, services: dict[str, Any], first_run: dict[str, Any]) -> dict[str, Any]:
    return _run_deployment(workspace, services, TINY)


@pytest.fixture(scope="module")
def changed_rerun(workspace: Path, services: dict[str, Any], unchanged_rerun: dict[str, Any]) -> dict[str, Any]:
    return _run_deployment(workspace, services, [*TINY, "train.lr=0.0003"])


def _loop_run(services: dict[str, Any], flow_run_id: str) -> Any:
    """The MLflow parent run of one deployment run."""
    client = MlflowClient(services["urls"]["mlflow"])
    exp = client.get_experiment_by_name("genloop")
    found = client.search_runs([exp.experiment_id], f"tags.`genloop.prefect_flow_run_id` = '{flow_run_id}' "
                               "and tags.`genloop.stage` = 'loop'")
    assert len(found) == 1
    return found[0]


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
    assert [(p["name"], p["type"]) for p in pools] == [("genloop-local", "process")]


def test_deploy_registers_both_deployments_with_cron_schedules(services, deployed):
    deployments = {d["name"]: d for d in _api(services, "/deployments/filter")}
    assert set(deployments) == {"nightly", "hourly"}
    crons = {name: [s["schedule"]["cron"] for s in d["schedules"] if s["active"]] for name, d in deployments.items()}
    assert crons["nightly"] == ["0 2 * * *"]
    assert crons["hourly"] == ["0 * * * *"]
    assert deployments["nightly"]["work_pool_name"] == "genloop-local"


def test_deployment_run_completes_and_leaves_a_registered_champion(first_run, services, workspace):
    assert first_run["states"] == {name: "Completed" for name in ("collect", *CACHEABLE, "register", "generate",
                                                                   "optimize")}
    assert first_run["versions"] == ["1"] and first_run["champion"] == "1"
    client = MlflowClient(services["urls"]["mlflow"])
    exp = client.get_experiment_by_name("genloop")
    runs = client.search_runs([exp.experiment_id],
                              f"tags.`genloop.prefect_flow_run_id` = '{first_run['flow_run_id']}'")
    by_stage = {r.data.tags["genloop.stage"]: r for r in runs}
    assert set(by_stage) == {"loop", "train", "evaluate", "register", "optimize"}
    parent = by_stage["loop"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for s, r in by_stage.items() if s != "loop")
    assert parent.data.tags["genloop.data_version"] not in ("", "untracked")
    assert parent.data.tags["genloop.git_commit"]
    generated = [p for p in (workspace / "outputs" / "generated" / "1").glob("*.png") if p.name != "grid.png"]
    assert len(generated) == 24


def test_the_flow_publishes_a_summary_linking_the_mlflow_run_and_a_metrics_table(first_run, services):
    artifacts = {a["key"]: a for a in _api(services, "/artifacts/filter",
                                            {"artifacts": {"flow_run_id": {"any_": [first_run["flow_run_id"]]}}})}
    summary = artifacts["genloop-loop-summary"]["data"]
    assert services["urls"]["mlflow"] + "/#/experiments/" in summary
    assert "data version" in summary and "promoted: **True**" in summary
    table = artifacts["genloop-loop-metrics"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert [row["metric"] for row in table] == ["fid", "kid_mean", "kid_std", "inception_score", "precision",
                                                "recall", "memorised_share", "fid_real_floor"]


def test_a_second_run_over_unchanged_data_and_params_skips_the_cached_stages(first_run, unchanged_rerun, services):
    states = unchanged_rerun["states"]
    assert {name: states[name] for name in CACHEABLE} == {name: "Cached" for name in CACHEABLE}
    assert {name: states[name] for name in ("collect", "register", "generate", "optimize")} == {
        name: "Completed" for name in ("collect", "register", "generate", "optimize")}
    assert unchanged_rerun["versions"] == ["1"]  # the same weights are not registered twice
    artifacts = _api(services, "/artifacts/filter",
                     {"artifacts": {"flow_run_id": {"any_": [unchanged_rerun["flow_run_id"]]}}})
    summary = next(a["data"] for a in artifacts if a["key"] == "genloop-loop-summary")
    assert all(f"| {name} | skipped (cached) |" in summary for name in CACHEABLE)
    # two scheduled runs are two linked iterations in MLflow
    first, second = (_loop_run(services, run["flow_run_id"]) for run in (first_run, unchanged_rerun))
    assert first.data.tags["genloop.iteration"] == "1"
    assert second.data.tags["genloop.iteration"] == "2"
    assert second.data.tags["genloop.previous_run_id"] == first.info.run_id
    assert second.data.tags["genloop.previous_data_version"] == first.data.tags["genloop.data_version"]
    print(f"cached rerun: {unchanged_rerun['seconds']:.1f} s; first run: {first_run['seconds']:.1f} s")


def test_changing_one_training_param_reruns_train_and_what_follows_only(unchanged_rerun, changed_rerun, services):
    states = changed_rerun["states"]
    assert states["clean"] == states["validate"] == "Cached"
    assert states["train"] == states["evaluate"] == states["register"] == "Completed"
    assert changed_rerun["versions"] == ["1", "2"]
    assert _loop_run(services, changed_rerun["flow_run_id"]).data.tags["genloop.iteration"] == "3"


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
    # the sink: the batch (24 images), its grid and its manifest
    assert yaml.safe_load((workspace / "reports" / "generate.json").read_text())["sink_objects"] == 24 + 2


def test_services_down_stops_exactly_what_up_started(spare_services):
    workspace, services = spare_services
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        pids = [e["pid"] for e in services["processes"].values()]
        assert all(psutil.pid_exists(pid) for pid in pids)
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
