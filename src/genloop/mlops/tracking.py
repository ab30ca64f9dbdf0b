"""The only module that talks to MLflow: where runs go, what they are tagged with, and the
model registry (versions, aliases, tags).

With no MLFLOW_TRACKING_URI set, runs go to `sqlite:///<workspace>/mlflow.db` with
artifacts in `<workspace>/mlartifacts` (MLflow 3 refuses a plain ./mlruns file store).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from genloop.core.config import Params
from genloop.core.errors import GenloopError, Unreachable
from genloop.core.logs import redact, redact_obj
from genloop.core.provenance import data_version, git_commit
from genloop.core.storage import sha256_file
from genloop.core.workspace import Workspace

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
    uri = redact(tracking_uri(ws))  # printed and published: never the credentials of a URI
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --default-artifact-root {ws.mlflow_artifacts.as_uri()}"


def served(ws: Workspace) -> bool:
    """Whether runs go to a tracking server (whose UI is up whenever it is), not a local store."""
    return tracking_uri(ws).startswith(("http://", "https://"))


def _ui_base(ws: Workspace) -> str:
    """The MLflow UI's address: the tracking server's, or `mlflow ui`'s default for a local store."""
    uri = redact(tracking_uri(ws))  # printed and published: never the credentials of a URI
    return uri.rstrip("/") if served(ws) else "http://127.0.0.1:5000"


def run_link(ws: Workspace, run: Any) -> str:
    """A URL of the run's page in the MLflow UI (the tracking server's, or `mlflow ui`'s default)."""
    return f"{_ui_base(ws)}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def artifact_link(ws: Workspace, run_id: str, path: str) -> str:
    """A URL that serves one artifact file of a run (the MLflow UI's own `get-artifact` route)."""
    return f"{_ui_base(ws)}/get-artifact?path={quote(path, safe='')}&run_uuid={run_id}"


# The MLflow 3 UI opens an experiment on the page for its kind: the GenAI traces overview, or the
# training runs of a model-development one. Without the tag it guesses (`..._inferred`).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _mark_model_training(exp: Any) -> None:
    """Tag the experiment as model training, unless someone chose a kind for it already."""
    from mlflow.tracking import MlflowClient

    kind = exp.tags.get(EXPERIMENT_KIND_TAG)
    if kind is None or kind.endswith("_inferred") or kind == "no_inferred_type":
        MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


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
            exp_id = mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location,
                                              tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        else:
            exp_id = exp.experiment_id
            _mark_model_training(exp)
    except Exception as exc:  # MlflowException, requests errors: all mean "tracking unusable"
        raise Unreachable(
            f"MLflow tracking at {redact(uri)} is not reachable ({exc.__class__.__name__}: {redact(str(exc))}). "
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


def server_failure(exc: BaseException) -> bool:
    """Whether `exc` says the tracking server did not answer, or failed (not: it refused a request)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, requests.exceptions.RequestException):
        return True
    return isinstance(exc, MlflowException) and str(exc.message).startswith("API request to")


@contextmanager
def server_errors(ws: Workspace, doing: str) -> Iterator[None]:
    """Turn a tracking server that stops answering mid-stage into Unreachable naming its URI."""
    try:
        yield
    except Unreachable:
        raise
    except Exception as exc:
        if not server_failure(exc):
            raise
        detail = redact(str(exc))
        detail = detail if len(detail) <= 400 else detail[:400] + "..."
        raise Unreachable(
            f"MLflow tracking at {redact(tracking_uri(ws))} stopped answering while {doing} "
            f"({exc.__class__.__name__}: {detail}). Start the server or fix MLFLOW_TRACKING_URI, then rerun."
        ) from exc


def safe_values(values: dict[str, Any]) -> dict[str, str]:
    """Params or tags as MLflow stores them (strings), with credentials masked: the userinfo of
    any URI (s3://key:secret@..., https://user:password@...) and the values of credential
    variables in the environment (genloop.core.logs.redact). Every param and tag goes through here."""
    return {k: redact(str(v)) for k, v in values.items()}


# The stages that read data/clean, and what for (MLflow's dataset "context"): their runs record
# the dataset as an input, which fills the Dataset column of the MLflow UI's run table.
DATASET_CONTEXTS = {"train": "training", "evaluate": "evaluation"}


def _local_source(path: Path) -> Any:
    """MLflow's dataset source for a local folder (the class MLflow registers for file paths)."""
    from mlflow.data.dataset_source_registry import get_registered_sources

    local = next(s for s in reversed(get_registered_sources()) if s._get_source_type() == "local")
    return local(uri=str(path))


def dataset_name(version: str) -> str:
    """`clean@<data version>`: data/clean as collected at that data.dvc md5 (12 hex digits)."""
    short = re.sub(r"\.dir$", "", version)[:12]
    return f"clean@{short}"


def _manifest_schema(path: Path) -> Any:
    """The clean manifest's columns as an MLflow schema, read from the parquet file's own schema
    (inferring it from the rows would warn that integer columns cannot hold missing values)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow.types import ColSpec, DataType, Schema

    def kind(t: pa.DataType) -> DataType:
        if pa.types.is_integer(t):
            return DataType.long
        if pa.types.is_floating(t):
            return DataType.double
        return DataType.boolean if pa.types.is_boolean(t) else DataType.string

    return Schema([ColSpec(kind(f.type), f.name, required=not f.nullable) for f in pq.read_schema(path)])


def clean_dataset(ws: Workspace, cfg: Params) -> tuple[Any, dict[str, str]] | None:
    """data/clean as an MLflow dataset, and the input tags that go with it; None before `clean`.

    A dataset of metadata (MLflow keeps no copy of the images): its source is the data/clean
    folder, its name the data version (data.dvc's md5), its digest the clean manifest's sha256
    (the first 16 hex digits: MLflow keeps at most 36; the whole one is tag
    `genloop.manifest_sha256`), its schema the manifest's columns (file, sha256, label, split...)."""
    import pyarrow.parquet as pq
    from mlflow.data.meta_dataset import MetaDataset

    if not ws.manifest.exists():
        return None
    version = data_version(ws)
    digest = sha256_file(ws.manifest)
    dataset = MetaDataset(_local_source(ws.clean), name=dataset_name(version), digest=digest[:16],
                          schema=_manifest_schema(ws.manifest))
    tags = {
        "genloop.data_version": version,
        "genloop.manifest_sha256": digest,
        "genloop.images": str(pq.ParquetFile(ws.manifest).metadata.num_rows),
        "genloop.sources": ", ".join(s.uri for s in cfg.collect.sources)[:500],
    }
    return dataset, safe_values(tags)


def log_dataset(ws: Workspace, cfg: Params, context: str) -> None:
    """Record data/clean as an input of the active run (`context`: training, evaluation)."""
    import mlflow

    found = clean_dataset(ws, cfg)
    if found is None:
        log.debug("no %s: no dataset recorded on the run", ws.manifest)
        return
    dataset, tags = found
    mlflow.log_input(dataset, context=context, tags=tags)


@contextmanager
def stage_run(ws: Workspace, cfg: Params, stage: str, log_params: bool = False) -> Iterator[Any]:
    """An MLflow run for one stage, nested under the loop's parent run when there is one.
    The stages that read data/clean record it as the run's input dataset.

    A tracking server that stops answering during the stage is an Unreachable error naming it."""
    import mlflow

    configure(ws, cfg)
    parent = os.environ.get(PARENT_RUN_ENV)
    with server_errors(ws, f"tracking the {stage} stage"), \
            mlflow.start_run(run_name=stage, parent_run_id=parent or None, nested=bool(parent)) as run:
        mlflow.set_tags(safe_values(provenance_tags(ws, cfg, stage)))
        if log_params:
            mlflow.log_params(safe_values(cfg.flat()))
        if stage in DATASET_CONTEXTS:
            log_dataset(ws, cfg, DATASET_CONTEXTS[stage])
        yield run


def child_runs(parent_run_id: str) -> list[Any]:
    """The stage runs nested under a loop's parent run, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    where = f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    return list(client.search_runs([parent.info.experiment_id], where, order_by=["attributes.start_time ASC"],
                                   max_results=1000))


def iteration_tags(ws: Workspace, run: Any, name: str = "loop") -> dict[str, str]:
    """Link a loop parent run to the one before it: `genloop.iteration` (1, 2, ...: one more than
    the previous loop run's, or than the number of earlier loop runs in the experiment), and the
    previous run's id, URL and data version (beside this run's `genloop.data_version`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment, me = run.info.experiment_id, run.info.run_id
    where = f"tags.`genloop.stage` = '{name}'"
    recent = client.search_runs([experiment], where, order_by=["attributes.start_time DESC"], max_results=5)
    previous = next((r for r in recent if r.info.run_id != me), None)
    if previous is None:
        return {"genloop.iteration": "1", "mlflow.note.content": f"Loop iteration 1 (data version {data_version(ws)})."}
    tagged = previous.data.tags.get("genloop.iteration", "")
    if tagged.isdigit():
        iteration = int(tagged) + 1
    else:  # earlier runs without the tag: count them
        count, token = 0, None
        while True:
            page = client.search_runs([experiment], where, max_results=1000, page_token=token)
            count += sum(1 for r in page if r.info.run_id != me)
            token = page.token
            if not token:
                break
        iteration = count + 1
    link = run_link(ws, previous)
    before = previous.data.tags.get("genloop.data_version", "unknown")
    return {
        "genloop.iteration": str(iteration),
        "genloop.previous_run_id": previous.info.run_id,
        "genloop.previous_run_url": link,
        "genloop.previous_data_version": before,
        "mlflow.note.content": f"Loop iteration {iteration}. Previous iteration: [{previous.info.run_id}]({link}) "
        f"(data version {before} -> {data_version(ws)}).",
    }


@contextmanager
def parent_run(ws: Workspace, cfg: Params, name: str = "loop") -> Iterator[Any]:
    """The parent run of one loop iteration; stage runs started inside nest under it."""
    import mlflow

    configure(ws, cfg)
    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tags(safe_values(provenance_tags(ws, cfg, name)))
        mlflow.set_tags(safe_values(iteration_tags(ws, run, name)))
        mlflow.log_params(safe_values(cfg.flat()))
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

    mlflow.log_dict(redact_obj(obj), artifact_file)


def log_table(frame: Any, artifact_file: str) -> None:
    """A pandas table, browsable in the MLflow UI's evaluation view."""
    import mlflow

    mlflow.log_table(frame, artifact_file)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path)


# --- registry -------------------------------------------------------------------------


# What the registry answers for a model, version or alias that does not exist. Anything else
# (the server down, a 5xx) is raised: "no champion" must never stand in for "no answer".
_ABSENT = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _absent(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) in _ABSENT and not server_failure(exc)


def get_alias_version(name: str, alias: str) -> Any | None:
    """The model version an alias points to, or None when the model or alias is absent."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _absent(exc):
            return None
        raise


def find_versions(name: str, tag: str, value: str) -> list[Any]:
    """Every version of model `name` whose tag `tag` equals `value`, oldest first."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        found = MlflowClient().search_model_versions(f"name = '{name}' and tags.`{tag}` = '{value}'")
    except MlflowException as exc:
        if _absent(exc):
            return []
        raise
    return sorted(found, key=lambda v: int(v.version))


def find_version(name: str, tag: str, value: str) -> Any | None:
    """The newest version of model `name` whose tag `tag` equals `value`, or None."""
    found = find_versions(name, tag, value)
    return found[-1] if found else None


def create_version(name: str, model_uri: str, tags: dict[str, Any]) -> str:
    """Register the logged model `model_uri` as a new version of `name` (created when absent),
    with `tags` set in the same call; returns the version number."""
    import mlflow

    values = {k: str(v) for k, v in tags.items() if v is not None}
    # register_model prints "Successfully registered model ..." and "Created version ..." on
    # stderr: genloop logs the version it made; their words are kept for --verbose
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return str(mlflow.register_model(model_uri, name, tags=values).version)
    finally:
        for line in said.getvalue().splitlines():
            log.debug("mlflow: %s", line)


def set_alias(name: str, alias: str, version: str | int) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().set_registered_model_alias(name, alias, str(version))


def tag_version(name: str, version: str | int, tags: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for k, v in tags.items():
        if v is not None:
            client.set_model_version_tag(name, str(version), k, redact(str(v)))


def version_tags(name: str, version: str | int) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient().get_model_version(name, str(version)).tags)


def tag_run(tags: dict[str, Any]) -> None:
    import mlflow

    mlflow.set_tags(safe_values(tags))


def log_params(values: dict[str, Any]) -> None:
    import mlflow

    if values:
        mlflow.log_params(safe_values(values))


def run_tags(run_id: str) -> dict[str, str]:
    """The tags of a run."""
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient().get_run(run_id).data.tags)


def run_params(run_id: str) -> dict[str, str]:
    """The params logged to a run."""
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient().get_run(run_id).data.params)


def log_metrics(values: dict[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)


def log_image_to_run(run_id: str, image: Any, artifact_file: str) -> None:
    """Add a picture to a run that has ended (e.g. a comparison grid to an evaluation run)."""
    from mlflow.tracking import MlflowClient

    MlflowClient().log_image(run_id, image, artifact_file)


class LocalGenerator:
    """A registered generator run by genloop's installed code: `predict(frame)` and
    `unwrap_python_model()` as on an MLflow pyfunc model."""

    def __init__(self, python_model: Any) -> None:
        self._model = python_model

    def predict(self, data: Any) -> Any:
        return self._model.predict(None, data)

    def unwrap_python_model(self) -> Any:
        return self._model


def load_model(name: str, ref: str | int) -> LocalGenerator:
    """Registered model `name` at version `ref` (or `@alias`), loaded from its `weights` artifact only.

    `mlflow.pyfunc.load_model` would run the Python file stored with the model: whoever can
    write the artifact store could run code here. genloop downloads the artifacts and builds
    the generator with its own installed code; the weights load with `weights_only=True`.
    """
    import tempfile

    import mlflow
    import yaml
    from mlflow.pyfunc import PythonModelContext

    from genloop.mlops.pyfunc import GeneratorModel

    uri = f"models:/{name}{ref if str(ref).startswith('@') else f'/{ref}'}"
    with tempfile.TemporaryDirectory(prefix="genloop-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        flavor = yaml.safe_load((local / "MLmodel").read_text()).get("flavors", {}).get("python_function", {})
        weights = (flavor.get("artifacts") or {}).get("weights", {}).get("path")
        if not weights or ".." in Path(weights).parts or Path(weights).is_absolute():
            raise GenloopError(f"{uri} is not a genloop generator: its MLmodel names no `weights` artifact")
        model = GeneratorModel()
        model.load_context(PythonModelContext(artifacts={"weights": str(local / weights)}, model_config={}))
    return LocalGenerator(model)


def get_version(name: str, version: str | int) -> Any | None:
    """A model version, or None when it does not exist."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_model_version(name, str(version))
    except MlflowException as exc:
        if _absent(exc):
            return None
        raise


def version_numbers(name: str) -> list[int]:
    """Every version number of model `name`, oldest first."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return sorted(int(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'"))
    except MlflowException as exc:
        if _absent(exc):
            return []
        raise


def delete_alias(name: str, alias: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().delete_registered_model_alias(name, alias)


def model_tags(name: str) -> dict[str, str]:
    """Tags of the registered model itself (not of a version)."""
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient().get_registered_model(name).tags)


def tag_model(name: str, key: str, value: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().set_registered_model_tag(name, key, redact(str(value)))
