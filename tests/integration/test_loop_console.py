"""`genloop loop` as a newcomer sees it, and what it leaves in Prefect and MLflow: a quiet console
(no warning, no library set-up chatter, each task's state line naming the task), a readable
flow run name, Prefect artifacts linking the MLflow runs, and the dataset on the MLflow runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from genloop.stages.table import ORDER
from tests.helpers import cli_env, make_workspace

RUN_NAME = re.compile(r"loop-(untracked|[0-9a-f]{8})-\d{8}-\d{6}")

# what Prefect holds about the flow runs of a workspace (run with its PREFECT_HOME: Prefect's
# temporary server starts on that database again)
READ_PREFECT = """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter
with get_client(sync_client=True) as client:
    out = []
    for run in client.read_flow_runs():
        tasks = {t.id: t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))}
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        out.append({"name": run.name, "flow": run.flow_id and str(run.flow_id), "state": run.state_name,
                    "tasks": sorted(tasks.values()),
                    "artifacts": [{"key": a.key, "type": a.type, "task": tasks.get(a.task_run_id),
                                   "data": a.data} for a in artifacts]})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """A tiny `genloop loop`, tracking to the workspace's own sqlite store: (workspace, its output)."""
    from tests.helpers import BIN, run_cli

    ws = make_workspace(tmp_path_factory.mktemp("console"))
    env = cli_env(ws, COLUMNS="200")  # rich wraps at the console's width: one log line per line
    done = run_cli([str(BIN / "genloop"), "loop"], ws, env, timeout=900)
    return ws, done


@pytest.fixture(scope="module")
def prefect_state(loop):
    ws, _ = loop
    env = cli_env(ws, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")
    done = subprocess.run([sys.executable, "-c", READ_PREFECT], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_console_shows_no_warning_and_no_library_chatter(loop):
    _, done = loop
    out = done.stdout + done.stderr
    for noise in ("Warning", "warnings.warn", "WARNING", "Creating initial MLflow database tables",
                  "Updating database tables", "Successfully registered model", "Created version",
                  "A new study created", "Stopping temporary server", "Validating input example"):
        assert noise not in out, f"{noise!r} in the loop's output:\n{out}"
    assert done.stdout.startswith("genloop loop finished.")  # the summary, as before


def test_every_state_line_names_its_task_and_the_flow_run_has_a_readable_name(loop):
    _, done = loop
    assert "Finished in state" not in done.stderr
    for stage in ORDER:
        assert re.search(rf"\b{stage} finished: Completed\b", done.stderr), f"no state line of {stage}:\n{done.stderr}"
    begun = re.search(r"Beginning flow run '([^']+)' for flow 'genloop-loop'", done.stderr)
    assert begun and RUN_NAME.fullmatch(begun[1]), done.stderr
    assert f"{begun[1]} finished: Completed" in done.stderr


def test_the_flow_run_links_each_stage_to_its_mlflow_run(loop, prefect_state):
    ws, _ = loop
    [run] = prefect_state
    assert RUN_NAME.fullmatch(run["name"]) and run["state"] == "Completed"
    assert run["tasks"] == sorted(ORDER)  # task runs named after their stage, no random suffix
    artifacts = {a["key"]: a for a in run["artifacts"]}
    for stage, report in (("train", "train"), ("evaluate", "eval"), ("register", "register")):
        run_id = json.loads((ws / "reports" / f"{report}.json").read_text())["run_id"]
        link = artifacts[f"mlflow-{stage}-run"]
        assert link["task"] == stage and f"/runs/{run_id})" in link["data"], link
    summary = artifacts["genloop-loop-summary"]["data"]
    for stage in ("train", "evaluate", "register", "optimize"):
        assert f"| {stage} | [" in summary, summary
    samples = artifacts["genloop-samples"]["data"]
    assert "](data:image/png;base64,iVBOR" in samples and "get-artifact?path=eval%2Fsamples.png" in samples


def test_training_reports_its_progress_to_the_flow_run(prefect_state):
    [run] = prefect_state
    progress = {a["key"]: a for a in run["artifacts"] if a["type"] == "progress"}
    assert progress["train-progress"]["task"] == "train"
    assert float(progress["train-progress"]["data"]) == 100.0


def test_train_and_evaluate_runs_name_their_dataset(loop):
    import mlflow
    from mlflow.tracking import MlflowClient

    from genloop.core.storage import sha256_file

    ws, _ = loop
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.get_experiment_by_name("genloop")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    digest = sha256_file(ws / "data" / "manifest.parquet")
    for report in ("train", "eval"):
        run = client.get_run(json.loads((ws / "reports" / f"{report}.json").read_text())["run_id"])
        [found] = run.inputs.dataset_inputs
        assert found.dataset.digest == digest[:16] and found.dataset.name.startswith("clean@")
