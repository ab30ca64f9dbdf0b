"""Where runs go: the user's MLFLOW_TRACKING_URI, else each workspace's own sqlite store."""

from __future__ import annotations

import os

import pytest

from genloop.core.config import load_params
from genloop.core.workspace import Workspace
from genloop.mlops import tracking


@pytest.fixture
def clean_env():
    saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


def test_each_workspace_keeps_its_own_store_in_one_process(tmp_path, clean_env):
    a, b = Workspace.at(tmp_path / "a"), Workspace.at(tmp_path / "b")
    a.root.mkdir()
    tracking.configure(a, load_params(None, []))  # mlflow exports MLFLOW_TRACKING_URI=a's store
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{a.mlflow_db}"
    assert tracking.tracking_uri(b) == f"sqlite:///{b.mlflow_db}"
    os.environ["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:5000"  # the user's server wins
    assert tracking.tracking_uri(b) == "http://127.0.0.1:5000"


def test_the_registry_follows_the_tracking_store(tmp_path, clean_env):
    import mlflow

    os.environ["MLFLOW_REGISTRY_URI"] = "sqlite:////somewhere/else.db"  # stale, e.g. from another workspace
    ws = Workspace.at(tmp_path)
    tracking.configure(ws, load_params(None, []))
    assert mlflow.get_registry_uri() == f"sqlite:///{ws.mlflow_db}"
