"""Credentials never reach log records, MLflow params/tags/artifacts or printed URLs.

The end-to-end drill (fake secrets planted in a real scheduled loop with S3 sinks and a DVC S3
remote, then every output scanned) is test_scheduled.py::test_no_planted_secret_reaches_any_output;
these are the unit tests of the redaction it relies on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from urllib.parse import quote

import pytest

from genloop.core import logs
from genloop.core.config import load_params
from genloop.core.errors import Unreachable
from genloop.core.workspace import Workspace
from genloop.mlops import tracking
from tests.drills.secret_scan import planted_secrets

SECRETS = planted_secrets()


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for var, value in SECRETS.items():
        monkeypatch.setenv(var, value)
    return SECRETS


def _leaks(text: str) -> list[str]:
    return [var for var, value in SECRETS.items() if value in text or quote(value, safe="") in text]


def test_redact_masks_uri_credentials_and_secret_variables(planted: dict[str, str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_SERVICE_API_KEY", "k3y-canary-value-1234")  # masked by its name
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1-not-a-secret")  # not a credential
    text = (f"s3://{planted['AWS_ACCESS_KEY_ID']}:{planted['AWS_SECRET_ACCESS_KEY']}@bucket/x "
            f"https://user:hunter2hunter2@mlflow.example.com:5000/#/runs "
            f"token={quote(planted['MLFLOW_TRACKING_TOKEN'], safe='')} "
            f"review {planted['GENLOOP_REVIEW_TOKEN']} session {planted['AWS_SESSION_TOKEN']} "
            f"password {planted['MLFLOW_TRACKING_PASSWORD']} key k3y-canary-value-1234 region us-east-1-not-a-secret")
    assert len(_leaks(text)) == len(SECRETS)  # the positive control: every secret is in the input
    clean = logs.redact(text)
    assert _leaks(clean) == []
    assert "hunter2" not in clean and "k3y-canary" not in clean
    assert "s3://***@bucket/x" in clean and "https://***@mlflow.example.com:5000/#/runs" in clean
    assert "<GENLOOP_REVIEW_TOKEN>" in clean and "<MLFLOW_TRACKING_TOKEN>" in clean
    assert "us-east-1-not-a-secret" in clean  # other values are left alone
    assert logs.redact("s3://bucket/prefix and http://127.0.0.1:5000/x") == "s3://bucket/prefix and http://127.0.0.1:5000/x"


def test_short_values_are_not_masked_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")  # moto's conventional value in the tests
    assert logs.redact("integration testing") == "integration testing"


class _VanishingEnviron(MutableMapping):
    """An environment in which one variable is unset by another thread between being listed and
    being read, as MLflow's telemetry thread unsets _MLFLOW_TELEMETRY_SESSION_ID."""

    def __init__(self, values: dict[str, str], vanishing: str) -> None:
        self._values, self._vanishing = values, vanishing

    def __getitem__(self, key: str) -> str:
        if key == self._vanishing:
            raise KeyError(key)
        return self._values[key]

    def __setitem__(self, key: str, value: str) -> None:
        self._values[key] = value

    def __delitem__(self, key: str) -> None:
        del self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._values))

    def __len__(self) -> int:
        return len(self._values)


def test_a_variable_unset_while_the_secrets_are_read_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    env = _VanishingEnviron({"_MLFLOW_TELEMETRY_SESSION_ID": "abc", "MY_SERVICE_TOKEN": "t0ken-value-5678"},
                            vanishing="_MLFLOW_TELEMETRY_SESSION_ID")
    monkeypatch.setattr(logs.os, "environ", env)
    assert logs.secret_values() == {"t0ken-value-5678": "MY_SERVICE_TOKEN"}
    assert logs.redact("token t0ken-value-5678") == "token <MY_SERVICE_TOKEN>"


def test_log_records_are_masked_whatever_handler_sends_them(planted: dict[str, str],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    logs.install_redaction()
    logs.install_redaction()  # idempotent
    logger = logging.getLogger("genloop.test_secrets")
    with caplog.at_level(logging.INFO, logger="genloop.test_secrets"):
        logger.info("pushing with key %s to %s", planted["AWS_SECRET_ACCESS_KEY"],
                    f"https://u:{planted['MLFLOW_TRACKING_PASSWORD']}@host/dvc")
        logger.warning(f"token {planted['GENLOOP_REVIEW_TOKEN']} in an f-string")
        try:
            raise RuntimeError(f"request failed with session {planted['AWS_SESSION_TOKEN']}")
        except RuntimeError:
            logger.exception("upload failed")
    assert len(caplog.records) == 3
    formatter = logging.Formatter("%(message)s")
    text = "\n".join(formatter.format(r) for r in caplog.records)
    assert "RuntimeError: request failed with session <AWS_SESSION_TOKEN>" in text  # the traceback was kept
    assert "pushing with key <AWS_SECRET_ACCESS_KEY> to https://***@host/dvc" in text
    assert _leaks(text) == [] and _leaks(caplog.text) == []


def test_params_tags_and_json_artifacts_reaching_mlflow_are_masked(
    planted: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Params.flat() is logged as MLflow params: a source URI with credentials in it must not be
    (sinks and the feedback store refuse credentials outright: tests/unit/test_config.py)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "GENLOOP_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    ws = Workspace.at(tmp_path)
    sink = f"s3://{planted['AWS_ACCESS_KEY_ID']}:{planted['AWS_SECRET_ACCESS_KEY']}@canary-bucket/generated"
    cfg = load_params(None, [f"collect.sources=[{{uri: '{sink}'}}]", "tracking.experiment=secret-drill"])
    assert sink in json.dumps(cfg.flat())  # the positive control: the config does hold the credentials
    with tracking.parent_run(ws, cfg) as parent:
        with tracking.stage_run(ws, cfg, "train", log_params=True) as run:
            tracking.tag_run({"genloop.note": f"endpoint https://user:{planted['MLFLOW_TRACKING_PASSWORD']}@x"})
            tracking.log_params({"extra": planted["GENLOOP_REVIEW_TOKEN"]})
            tracking.log_json({"sink": sink, "nested": [planted["AWS_SESSION_TOKEN"]]}, "report/report.json")
    client = MlflowClient()
    dumped = []
    for run_id in (parent.info.run_id, run.info.run_id):
        data = client.get_run(run_id).data
        dumped.append(json.dumps({"params": data.params, "tags": data.tags}))
        assert "s3://***@canary-bucket/generated" in data.params["collect.sources"]
    artifact = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="report/report.json",
                                                        dst_path=str(tmp_path / "dl")))
    dumped.append(artifact.read_text())
    text = "\n".join(dumped)
    assert "canary-bucket" in text and "<GENLOOP_REVIEW_TOKEN>" in text  # what was logged is there, masked
    assert _leaks(text) == []


def test_printed_and_published_tracking_urls_never_carry_credentials(
    planted: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    ws = Workspace.at(tmp_path)
    password = planted["MLFLOW_TRACKING_PASSWORD"]
    port = __import__("tests.conftest", fromlist=["free_port"]).free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://drill-user:{password}@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    run = SimpleNamespace(info=SimpleNamespace(experiment_id="1", run_id="abc"))
    shown = [tracking.ui_command(ws), tracking.run_link(ws, run)]
    assert shown == [f"open http://***@127.0.0.1:{port}", f"http://***@127.0.0.1:{port}/#/experiments/1/runs/abc"]
    with pytest.raises(Unreachable) as info:
        tracking.configure(ws, load_params(None, []))
    assert f"127.0.0.1:{port}" in str(info.value)
    assert _leaks(str(info.value) + "\n".join(shown)) == []


def test_the_drill_scan_finds_a_secret_in_any_written_form(tmp_path: Path) -> None:
    """The scan of the end-to-end drill must not pass silently: each secret, written raw,
    URL-encoded, JSON-escaped, base64-encoded at any alignment or wrapped across lines, is a hit."""
    import base64

    from tests.drills.secret_scan import SecretScan

    value = SECRETS["AWS_SECRET_ACCESS_KEY"]
    leaks = {
        "raw": f"key={value}",
        "urlencoded": f"https://x/?k={quote(value, safe='')}",
        "json": json.dumps({"k": value}).replace("/", "\\/"),
        **{f"base64+{pad}": base64.b64encode(b"x" * pad + value.encode() + b"tail").decode() for pad in range(3)},
        "wrapped": f"INFO pushing with {value[:11]}\n           {value[11:]} done",
    }
    for name, text in leaks.items():
        scan = SecretScan(SECRETS, ("canary-value",))
        scan.add("test", name, text)
        assert scan.hits and "AWS_SECRET_ACCESS_KEY" in scan.hits[0], name
    clean = SecretScan(SECRETS, ("canary-value",))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "report.json").write_text('{"sink": "s3://canary-value/x"}')
    clean.add_tree("files", tmp_path)
    assert clean.hits == [] and clean.files["files"] == 1 and clean.seen["files", "canary-value"] == 1
