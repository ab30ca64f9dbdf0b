"""A run trains what its params say: a checkpoint past the requested steps is never resumed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from genloop.core.config import load_params
from genloop.core.storage import read_json
from genloop.core.workspace import Workspace
from genloop.stages import clean, collect, train
from tests.helpers import TINY

SETTINGS = [*TINY, "collect.dvc_add=false", "train.checkpoint_every=1000", "train.deterministic=true",
            "train.threads=1"]


@pytest.fixture(autouse=True)
def _local_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Track into the workspace's own store: another test in this worker may have exported a server URI."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)


def _params(epochs: int):
    return load_params(None, [*SETTINGS, f"train.epochs={epochs}"])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    ws = Workspace.at(root)
    collect.run(_params(1), ws)
    clean.run(_params(1), ws)
    return root


def _weights(ws: Workspace) -> dict[str, torch.Tensor]:
    return torch.load(ws.generator, weights_only=True)


def test_fewer_epochs_after_a_longer_run_trains_the_shorter_run_from_step_0(prepared: Path, tmp_path: Path):
    fresh = Workspace.at(shutil.copytree(prepared, tmp_path / "fresh"))
    one = train.run(_params(1), fresh)  # the reference: one epoch, from nothing

    ws = Workspace.at(shutil.copytree(prepared, tmp_path / "ws"))
    three = train.run(_params(3), ws)
    assert three["steps"] == 3 * one["steps"] and three["resumed_from_step"] == 0
    again = train.run(_params(1), ws)  # same settings but epochs: the 3-epoch checkpoint is shared
    assert again["steps"] == one["steps"], "a 1-epoch run returned the 3-epoch model"
    assert again["resumed_from_step"] == 0
    a, b = _weights(fresh), _weights(ws)
    assert all(torch.equal(a[k], b[k]) for k in a), "the 1-epoch model differs from a 1-epoch run from scratch"


def test_more_epochs_resume_from_the_shorter_run(prepared: Path, tmp_path: Path):
    ws = Workspace.at(shutil.copytree(prepared, tmp_path / "ws"))
    one = train.run(_params(1), ws)
    two = train.run(_params(2), ws)
    assert two["resumed_from_step"] == one["steps"] and two["steps"] == 2 * one["steps"]
    same = train.run(_params(2), ws)  # nothing left to do: the finished 2-epoch run is returned
    assert same["resumed_from_step"] == same["steps"] == two["steps"]


BUDGET = "train.max_minutes=0.002"  # 0.12 s of training steps: a few of the 550 that 50 epochs would take


def test_a_wall_clock_budget_ends_training_early_with_the_outputs_of_a_full_run(prepared: Path, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    ws = Workspace.at(shutil.copytree(prepared, tmp_path / "ws"))
    summary = train.run(load_params(None, [*SETTINGS, "train.epochs=50", BUDGET]), ws)
    steps_per_epoch = summary["images"] // 32
    assert summary["ended_by"] == "train.max_minutes" and summary["max_minutes"] == 0.002
    assert 1 <= summary["steps"] < 50 * steps_per_epoch, summary
    assert summary["epochs_done"] == round(summary["steps"] / steps_per_epoch, 3) < 50
    assert summary["images_seen"] == summary["steps"] * 32
    for path in (ws.generator, ws.generator.with_suffix(".json"), ws.report("train"),
                 ws.reports / "train_samples.png", ws.reports / "train.csv"):
        assert path.stat().st_size > 0, f"{path} missing after a budget-ended run"
    assert read_json(ws.report("train")) == summary
    run = MlflowClient(f"sqlite:///{ws.mlflow_db}").get_run(summary["run_id"])
    assert run.data.metrics["train_steps"] == summary["steps"]
    assert run.data.metrics["train_epochs_done"] == summary["epochs_done"]
    assert run.data.tags["genloop.ended_by"] == "train.max_minutes"
    assert run.info.status == "FINISHED"


def test_a_budget_ended_checkpoint_is_never_taken_for_a_finished_run(prepared: Path, tmp_path: Path):
    ws = Workspace.at(shutil.copytree(prepared, tmp_path / "ws"))
    budgeted = load_params(None, [*SETTINGS, "train.epochs=50", BUDGET])
    first = train.run(budgeted, ws)
    again = train.run(budgeted, ws)  # the same budget, already spent: the same model, no new step
    assert again["resumed_from_step"] == again["steps"] == first["steps"]
    assert again["ended_by"] == "train.max_minutes"
    assert train.checkpoint_dir(budgeted, ws) != train.checkpoint_dir(_params(50), ws)
    full = train.run(_params(1), ws)  # no budget: trains its epoch from step 0, not from the budget's step
    assert full["resumed_from_step"] == 0 and full["ended_by"] == "train.epochs"
    assert full["steps"] == full["images"] // 32 and full["epochs_done"] == 1.0
