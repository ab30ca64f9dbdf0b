"""The only module that talks to MLflow: where runs go, what they are tagged with, and the
model registry (versions, aliases, tags).

With no MLFLOW_TRACKING_URI set, runs go to `sqlite:///<workspace>/mlflow.db` with
artifacts in `<workspace>/mlartifacts` (MLflow 3 refuses a plain ./mlruns file store).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from genloop.config import Params
from genloop.errors import Unreachable
from genloop.provenance import data_version, git_commit
from genloop.workspace import Workspace

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "GENLOOP_PARENT_RUN_ID"
_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


# sqlite stores genloop chose itself. mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, so
# without this a second workspace in the same process would log into the first one's store.
_CHOSEN_DEFAULTS: set[str] = set()


def tracking_uri(ws: Workspace) -> str:
    """MLFLOW_TRACKING_URI when the user set it, else the workspace's sqlite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and env not in _CHOSEN_DEFAULTS:
        return env
    return f"sqlite:///{ws.mlflow_db}"


def ui_command(ws: Workspace) -> str:
    """The command that opens the MLflow UI on this workspace's runs."""
    uri = tracking_uri(ws)
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --default-artifact-root {ws.mlflow_artifacts.as_uri()}"


def run_link(ws: Workspace, run: Any) -> str:
    """A URL of the run's page in the MLflow UI (the tracking server's, or `mlflow ui`'s default)."""
    uri = tracking_uri(ws)
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def configure(ws: Workspace, cfg: Params) -> str:
    """Point MLflow at this workspace's store, check it answers, select the experiment.

    Returns the experiment id. Raises GenloopError naming the URI when the server is down.
    """
    import mlflow

    for var, value in _RETRY_DEFAULTS.items():
        os.environ.setdefault(var, value)
    uri = tracking_uri(ws)
    if uri == f"sqlite:///{ws.mlflow_db}":
        _CHOSEN_DEFAULTS.add(uri)
    mlflow.set_tracking_uri(uri)
    # the registry lives where the runs do; set it explicitly, because set_registry_uri also
    # exports MLFLOW_REGISTRY_URI, and a stale one (another workspace's sqlite) would win
    mlflow.set_registry_uri(uri)
    try:
        exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            location = ws.mlflow_artifacts.as_uri() if uri.startswith("sqlite:") else None
            exp_id = mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
    except Exception as exc:  # MlflowException, requests errors: all mean "tracking unusable"
        raise Unreachable(
            f"MLflow tracking at {uri} is not reachable ({exc.__class__.__name__}: {exc}). "
            "Start the server or fix MLFLOW_TRACKING_URI."
        ) from exc
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _prefect_flow_run_id() -> str | None:
    import sys

    if "prefect" not in sys.modules:
        return os.environ.get("PREFECT__FLOW_RUN_ID")
    try:
        from prefect.runtime import flow_run

        return flow_run.id or os.environ.get("PREFECT__FLOW_RUN_ID")
    except Exception:  # outside a flow run the runtime may raise
        return os.environ.get("PREFECT__FLOW_RUN_ID")


def provenance_tags(ws: Workspace, cfg: Params, stage: str) -> dict[str, str]:
    tags = {
        "genloop.stage": stage,
        "genloop.data_version": data_version(ws),
        "genloop.git_commit": git_commit(ws.root),
        "genloop.params_hash": cfg.section_hash(*cfg.model_dump(by_alias=True).keys()),
    }
    flow_run = _prefect_flow_run_id()
    if flow_run:
        tags["genloop.prefect_flow_run_id"] = str(flow_run)
    return tags


@contextmanager
def stage_run(ws: Workspace, cfg: Params, stage: str, log_params: bool = False) -> Iterator[Any]:
    """An MLflow run for one stage, nested under the loop's parent run when there is one."""
    import mlflow

    configure(ws, cfg)
    parent = os.environ.get(PARENT_RUN_ENV)
    with mlflow.start_run(run_name=stage, parent_run_id=parent or None, nested=bool(parent)) as run:
        mlflow.set_tags(provenance_tags(ws, cfg, stage))
        if log_params:
            mlflow.log_params(cfg.flat())
        yield run


@contextmanager
def parent_run(ws: Workspace, cfg: Params, name: str = "loop") -> Iterator[Any]:
    """The parent run of one loop iteration; stage runs started inside nest under it."""
    import mlflow

    configure(ws, cfg)
    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tags(provenance_tags(ws, cfg, name))
        mlflow.log_params(cfg.flat())
        previous = os.environ.get(PARENT_RUN_ENV)
        os.environ[PARENT_RUN_ENV] = run.info.run_id
        try:
            yield run
        finally:
            if previous is None:
                os.environ.pop(PARENT_RUN_ENV, None)
            else:
                os.environ[PARENT_RUN_ENV] = previous


class MetricBuffer:
    """Step metrics and sample grids of one run, sent from a background thread so the training
    loop never waits for the tracking store: metrics are buffered and sent with one log_batch
    call every `every` steps; grids are sent as they come. `flush()` waits until all is sent
    and raises the first error of the background thread."""

    def __init__(self, run_id: str, every: int = 25) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        self.run_id = run_id
        self.every = every
        self.pending: list[Any] = []
        self._steps = 0
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genloop-mlflow")
        self._sent: list[Any] = []

    def add(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), ts, step) for k, v in values.items())
        self._steps += 1
        if self._steps % self.every == 0:
            self._send_metrics()

    def image(self, image: Any, artifact_file: str) -> None:
        """Log a PIL image (a sample grid) to the run without blocking."""
        self._sent.append(self._sender.submit(self.client.log_image, self.run_id, image, artifact_file))

    def _send_metrics(self) -> None:
        batch, self.pending = self.pending, []
        for i in range(0, len(batch), 1000):
            self._sent.append(self._sender.submit(self.client.log_batch, self.run_id, metrics=batch[i : i + 1000]))

    def flush(self) -> None:
        self._send_metrics()
        sent, self._sent = self._sent, []
        for future in sent:
            future.result()


def log_image(image: Any, artifact_file: str) -> None:
    import mlflow

    mlflow.log_image(image, artifact_file)


def log_json(obj: dict[str, Any], artifact_file: str) -> None:
    import mlflow

    mlflow.log_dict(obj, artifact_file)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path)


# --- registry -------------------------------------------------------------------------


def get_alias_version(name: str, alias: str) -> Any | None:
    """The model version an alias points to, or None when the model or alias is absent."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def find_version(name: str, tag: str, value: str) -> Any | None:
    """The newest version of model `name` whose tag `tag` equals `value`, or None."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        found = MlflowClient().search_model_versions(f"name = '{name}' and tags.`{tag}` = '{value}'")
    except MlflowException:
        return None
    return max(found, key=lambda v: int(v.version), default=None)


def set_alias(name: str, alias: str, version: str | int) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().set_registered_model_alias(name, alias, str(version))


def tag_version(name: str, version: str | int, tags: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for k, v in tags.items():
        if v is not None:
            client.set_model_version_tag(name, str(version), k, str(v))


def version_tags(name: str, version: str | int) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient().get_model_version(name, str(version)).tags)


def tag_run(tags: dict[str, Any]) -> None:
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_metrics(values: dict[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)


def log_image_to_run(run_id: str, image: Any, artifact_file: str) -> None:
    """Add a picture to a run that has ended (e.g. a comparison grid to an evaluation run)."""
    from mlflow.tracking import MlflowClient

    MlflowClient().log_image(run_id, image, artifact_file)


def load_model(name: str, version: str | int) -> Any:
    """A registered model version as a pyfunc model."""
    import mlflow

    return mlflow.pyfunc.load_model(f"models:/{name}/{version}")


def get_version(name: str, version: str | int) -> Any | None:
    """A model version, or None when it does not exist."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_model_version(name, str(version))
    except MlflowException:
        return None


def version_numbers(name: str) -> list[int]:
    """Every version number of model `name`, oldest first."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return sorted(int(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'"))
    except MlflowException:
        return []


def delete_alias(name: str, alias: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().delete_registered_model_alias(name, alias)


def model_tags(name: str) -> dict[str, str]:
    """Tags of the registered model itself (not of a version)."""
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient().get_registered_model(name).tags)


def tag_model(name: str, key: str, value: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().set_registered_model_tag(name, key, value)
