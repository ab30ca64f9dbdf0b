"""The whole loop from the command line, against a real MLflow server on 127.0.0.1, Prefect's
ephemeral API and a real DVC repository; then `dvc repro` twice (the second does nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import free_port
from tests.helpers import BIN, cli_env, make_workspace, run_cli


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` as a real process with a sqlite backend and served artifacts."""
    base = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(base / "server.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
         "--artifacts-destination", str(base / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError((base / "server.log").read_text()) from None
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, mlflow_server):
    """A git + DVC repository holding genloop's dvc.yaml, its sources and tiny params."""
    return make_workspace(tmp_path_factory.mktemp("e2e"))


def _run(cmd: list[str], ws: Path, tracking: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_cli(cmd, ws, cli_env(ws, MLFLOW_TRACKING_URI=tracking), timeout=timeout)


@pytest.fixture(scope="module")
def loop_output(workspace, mlflow_server):
    return _run([str(BIN / "genloop"), "loop"], workspace, mlflow_server).stdout


def test_loop_prints_where_the_results_are(loop_output, workspace):
    assert "models:/genloop-generator/1" in loop_output
    assert str(workspace / "outputs" / "generated" / "1") in loop_output
    assert "MLflow UI" in loop_output


def test_data_dvc_names_the_collected_corpus(loop_output, workspace, mlflow_server):
    doc = yaml.safe_load((workspace / "data.dvc").read_text())
    assert doc["outs"][0]["path"] == "data/raw"
    status = _run([sys.executable, "-m", "dvc", "status", "data.dvc", "--json"], workspace, mlflow_server)
    assert json.loads(status.stdout) == {}  # data/raw matches the md5 data.dvc records
    ledger = pd.read_parquet(workspace / "data" / "ledger.parquet")
    assert len(ledger) == 400


def test_manifest_matches_clean_files_and_validation_passed(loop_output, workspace):
    manifest = pd.read_parquet(workspace / "data" / "manifest.parquet")
    files = sorted(p.name for p in (workspace / "data" / "clean").iterdir())
    assert sorted(set(manifest["shard"])) == files  # the shards the manifest names, and nothing else
    assert 0 < len(files) < len(manifest)
    validation = json.loads((workspace / "reports" / "validation.json").read_text())
    assert validation["success"] is True


def test_mlflow_server_has_the_runs_metrics_grid_and_champion(loop_output, workspace, mlflow_server):
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    client = MlflowClient()
    exp = client.get_experiment_by_name("genloop")
    runs = client.search_runs([exp.experiment_id])
    by_stage = {r.data.tags.get("genloop.stage"): r for r in runs}
    assert {"loop", "train", "evaluate", "register"} <= set(by_stage)
    train_run = by_stage["train"]
    assert train_run.data.tags["mlflow.parentRunId"] == by_stage["loop"].info.run_id
    assert {"loss", "img_per_s"} <= set(train_run.data.metrics)
    assert "fid" in by_stage["evaluate"].data.metrics
    grids = {a.path for a in client.list_artifacts(train_run.info.run_id, "samples")}
    assert "samples/final.png" in grids
    model = mlflow.pyfunc.load_model("models:/genloop-generator@champion")
    images = model.predict(pd.DataFrame({"n": [4], "seed": [1]}))
    assert images.shape == (4, 32, 32, 1)


def test_generated_and_curated_hold_the_configured_counts(loop_output, workspace):
    generated = [p for p in (workspace / "outputs" / "generated" / "1").glob("*.png") if p.name != "grid.png"]
    curated = [p for p in (workspace / "outputs" / "curated" / "1").glob("*.png") if p.name != "grid.png"]
    assert len(generated) == 24
    assert len(curated) == 10


def test_dvc_repro_runs_the_stages_and_a_second_repro_does_nothing(loop_output, workspace, mlflow_server):
    dvc = [sys.executable, "-m", "dvc", "repro"]
    first = _run(dvc, workspace, mlflow_server)
    for stage in ("clean", "validate", "train", "evaluate", "register", "generate", "optimize"):
        assert f"Running stage '{stage}'" in first.stdout, first.stdout
    second = _run(dvc, workspace, mlflow_server)
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout
    # clean reads the ledger, tracked on its own: a no-op repro checks it and never walks data/raw
    assert "'data/ledger.parquet.dvc' didn't change" in second.stdout and "data.dvc'" not in second.stdout
    plots = _run([sys.executable, "-m", "dvc", "plots", "show", "--json"], workspace, mlflow_server)
    assert "Training loss" in plots.stdout and "img_per_s" in plots.stdout
