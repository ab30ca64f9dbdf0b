"""The secrets drill: plant distinctive fake credentials, run the loop, search every output.

`planted_secrets()` makes the values (AWS ones still work with moto, which takes any);
`SecretScan` searches bytes for each value and its encoded forms (URL-encoded, JSON-escaped,
base64 at any alignment, and with line wrapping removed) and counts what it searched, so a
test can assert zero hits, a floor of files/bytes searched, and that planted NON-secret
values (controls, e.g. a sink bucket's name) are found in every source, which proves each
source really was searched.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "GENLOOP_REVIEW_TOKEN")
WRAPPED_LIMIT = 8 << 20  # files up to this size are also searched with all whitespace removed
_WS = re.compile(rb"\s+")


def canary() -> str:
    """A distinctive NON-secret value (e.g. a bucket name) that must show up in the outputs."""
    return f"genloop-drill-{secrets.token_hex(5)}"


def planted_secrets() -> dict[str, str]:
    """A distinctive fake value per credential variable, new in every process. They hold '/',
    '+' and '=' (as real AWS secrets do), so their encoded forms differ from the raw ones."""
    t = secrets.token_hex(8)
    return {
        "AWS_ACCESS_KEY_ID": f"AKIAGLDRILL{t[:9].upper()}",
        "AWS_SECRET_ACCESS_KEY": f"glDrill/{t}+SecretAccessKey/{t[::-1]}",
        "AWS_SESSION_TOKEN": f"IQoJglDrillSession+{t}/Token/{t[:6]}==",
        "MLFLOW_TRACKING_PASSWORD": f"glDrill-mlflow-pw-{t}/+",
        "MLFLOW_TRACKING_TOKEN": f"glDrill.mlflow.token.{t}",
        "GENLOOP_REVIEW_TOKEN": f"glDrill-review-token-{t}",
    }


def _base64_cores(raw: bytes) -> set[bytes]:
    """The part of base64(x + raw + y) that depends on `raw` alone, for each alignment."""
    cores = set()
    for pad in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            enc = encode(b"\0" * pad + raw)
            cores.add(enc[(4 if pad else 0) : -4])
    return {c for c in cores if len(c) >= 12}


def encoded_forms(value: str) -> dict[str, bytes]:
    """The ways a value may be written out: raw, URL-encoded, JSON-escaped, base64."""
    raw = value.encode()
    forms = {
        "raw": raw,
        "urlencoded": quote(value, safe="").encode(),
        "urlencoded+": quote_plus(value).encode(),
        "json-escaped": json.dumps(value)[1:-1].encode(),
        "slash-escaped": value.replace("/", "\\/").encode(),
    }
    for i, core in enumerate(sorted(_base64_cores(raw))):
        forms[f"base64#{i}"] = core
    return forms


@dataclass
class SecretScan:
    """Search outputs for planted secrets; count what was searched and where a canary was seen."""

    planted: dict[str, str]
    controls: tuple[str, ...]  # non-secret values expected in the outputs
    needles: list[tuple[str, str, bytes]] = field(default_factory=list)  # (variable, form, bytes)
    files: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # per source
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seen: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))  # (source, control)
    hits: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen: set[bytes] = set()
        for var, value in self.planted.items():
            for form, needle in encoded_forms(value).items():
                if needle not in seen:
                    seen.add(needle)
                    self.needles.append((var, form, needle))

    def add(self, source: str, name: str, data: bytes | str) -> None:
        """Search one output (a file's bytes, a dump, a captured stream)."""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        self.files[source] += 1
        self.bytes[source] += len(data)
        for control in self.controls:
            if control.encode() in data:
                self.seen[source, control] += 1
        unwrapped = _WS.sub(b"", data) if len(data) <= WRAPPED_LIMIT else b""
        for var, form, needle in self.needles:
            where = "" if needle in data else " (line-wrapped)" if needle in unwrapped else None
            if where is not None:
                at = data.find(needle)
                context = data[max(0, at - 120) : at + len(needle) + 60] if at >= 0 else b""
                self.hits.append(f"{var} ({form}){where} in {source}: {name}: {context!r}")

    def add_tree(self, source: str, root: Path, skip: tuple[str, ...] = ()) -> None:
        """Every file under `root` (hidden ones included), except paths starting with `skip`."""
        for path in sorted(Path(root).rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and not path.is_symlink() and not rel.startswith(skip):
                self.add(source, str(path), path.read_bytes())

    def summary(self) -> str:
        rows = [f"  {s}: {self.files[s]} items, {self.bytes[s]} bytes; controls seen: "
                + ", ".join(f"{c} {self.seen[s, c]}x" for c in self.controls) for s in sorted(self.files)]
        return (f"{len(self.planted)} secrets x {len(self.needles)} forms; searched {sum(self.files.values())} "
                f"items, {sum(self.bytes.values())} bytes:\n" + "\n".join(rows))


# ---------------------------------------------------------------- what the servers hold


def _json(obj: Any) -> str:
    return json.dumps(obj, default=str, sort_keys=True, indent=1)


def dump_mlflow(scan: SecretScan, tracking_uri: str, dst: Path) -> None:
    """Everything the MLflow server holds, read through the client: experiments, runs (info,
    params, tags, metric names), every run artifact, registered models, versions and their
    artifacts, logged models."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    dst.mkdir(parents=True, exist_ok=True)
    experiments = client.search_experiments(view_type=3)  # ViewType.ALL
    scan.add("mlflow", "experiments", _json([dict(e) if hasattr(e, "__iter__") else vars(e) for e in experiments]))
    for exp in experiments:
        runs = client.search_runs([exp.experiment_id], run_view_type=3, max_results=1000)
        for run in runs:
            scan.add("mlflow", f"run {run.info.run_id}", _json({
                "info": dict(run.info), "params": run.data.params, "tags": run.data.tags,
                "metrics": run.data.metrics, "inputs": str(run.inputs), "outputs": str(getattr(run, "outputs", "")),
            }))
            folder = dst / "runs" / run.info.run_id
            if client.list_artifacts(run.info.run_id):
                mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(folder),
                                                    tracking_uri=tracking_uri)
                scan.add_tree("mlflow", folder)
        try:
            logged = client.search_logged_models([exp.experiment_id])
        except Exception:  # an MLflow without logged models
            logged = []
        for model in logged:
            scan.add("mlflow", f"logged model {model.model_id}", _json(model.to_dictionary()))
    for model in client.search_registered_models():
        scan.add("mlflow", f"registered model {model.name}", _json({
            "name": model.name, "description": model.description, "tags": model.tags,
            "aliases": model.aliases}))
        for version in client.search_model_versions(f"name = '{model.name}'"):
            scan.add("mlflow", f"{model.name} v{version.version}", _json(dict(version)))
            folder = dst / "models" / model.name / str(version.version)
            # the version's own artifact location: a models:/ URI would be resolved against the
            # process-wide registry URI, whatever another test set it to
            source = client.get_model_version_download_uri(model.name, version.version)
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(folder), tracking_uri=tracking_uri)
            scan.add_tree("mlflow", folder)


def dump_prefect(scan: SecretScan, api_url: str) -> dict[str, int]:
    """Flow-run logs and artifacts (and flow runs, task runs, deployments, variables), read
    through Prefect's client API. Returns how many of each were read."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    counts: dict[str, int] = {}
    with SyncPrefectClient(api_url) as client:
        flow_runs = client.read_flow_runs(limit=200)
        counts["flow_runs"] = len(flow_runs)
        scan.add("prefect-runs", "flow runs", _json([r.model_dump(mode="json") for r in flow_runs]))
        task_runs = client.read_task_runs(limit=200)
        counts["task_runs"] = len(task_runs)
        scan.add("prefect-runs", "task runs", _json([r.model_dump(mode="json") for r in task_runs]))
        deployments = client.read_deployments()
        scan.add("prefect-runs", "deployments", _json([d.model_dump(mode="json") for d in deployments]))
        scan.add("prefect-runs", "variables", _json([v.model_dump(mode="json") for v in client.read_variables()]))
        logs: list[Any] = []
        flow_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in flow_runs]))
        while page := client.read_logs(log_filter=flow_filter, limit=200, offset=len(logs)):
            logs.extend(page)
        counts["logs"] = len(logs)
        scan.add("prefect-logs", "flow-run logs", "\n".join(f"{log.level} {log.name}: {log.message}" for log in logs))
        artifacts = client.read_artifacts(limit=200)
        counts["artifacts"] = len(artifacts)
        for artifact in artifacts:
            scan.add("prefect-artifacts", f"artifact {artifact.key}", _json(artifact.model_dump(mode="json")))
    return counts


# ---------------------------------------------------------------- S3 in play


def drill_env(planted: dict[str, str], endpoint: str) -> dict[str, str]:
    """The environment of a drilled run: the planted credentials and the moto endpoint."""
    return {**planted, "GENLOOP_S3_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}


def sink_overrides(bucket: str) -> list[str]:
    return [f"generate.sink=s3://{bucket}/generated", f"optimize.sink=s3://{bucket}/curated"]


def use_s3(ws: Path, env: dict[str, str], bucket: str) -> None:
    """Create `bucket` on the endpoint of `env` and make s3://bucket/dvc the workspace's
    default DVC remote (collect pushes each data version there)."""
    import os
    import subprocess
    import sys

    import boto3

    boto3.client("s3", endpoint_url=env["GENLOOP_S3_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                 aws_session_token=env["AWS_SESSION_TOKEN"]).create_bucket(Bucket=bucket)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "store", f"s3://{bucket}/dvc"], cwd=ws,
                   check=True, capture_output=True, env={**os.environ, **env, "DVC_NO_ANALYTICS": "1"})
