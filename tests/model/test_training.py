"""Training as a user runs it: killed with SIGKILL and resumed exactly; data-parallel under torchrun."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from genloop.core.config import load_params
from genloop.core.workspace import Workspace
from genloop.stages import clean, collect
from tests.helpers import BIN, TINY, cli_env, expected_steps, run_cli

SETTINGS = [*TINY, "collect.dvc_add=false", "train.epochs=8", "train.checkpoint_every=10", "train.grid_size=10",
            "train.deterministic=true", "train.threads=1"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with clean data and params.yaml; tests copy it."""
    root = tmp_path_factory.mktemp("prepared")
    cfg = load_params(None, SETTINGS)
    ws = Workspace.at(root)
    collect.run(cfg, ws)
    clean.run(cfg, ws)
    (root / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
    return root


def _copy(prepared: Path, dest: Path) -> Path:
    shutil.copytree(prepared, dest)
    return dest


def _weights(ws: Path) -> dict[str, torch.Tensor]:
    return torch.load(ws / "models" / "generator.pt", weights_only=True)


def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(prepared: Path, tmp_path: Path):
    train = [str(BIN / "genloop"), "train"]
    straight = _copy(prepared, tmp_path / "straight")
    run_cli(train, straight, cli_env(straight))

    killed = _copy(prepared, tmp_path / "killed")
    proc = subprocess.Popen(train, cwd=killed, env=cli_env(killed), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((killed / ".genloop" / "cache" / "checkpoints").glob("*/last.pt")):
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "models" / "generator.pt").exists()  # it really died mid-run

    run_cli(train, killed, cli_env(killed))
    report = json.loads((killed / "reports" / "train.json").read_text())
    cfg = load_params(None, SETTINGS)
    assert report["steps"] == expected_steps(cfg, Workspace.at(killed))
    # it resumed from a checkpoint it had written before the kill
    assert 0 < report["resumed_from_step"] < report["steps"]
    assert report["resumed_from_step"] % cfg.train.checkpoint_every == 0
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_two_gloo_processes_train_with_ddp_and_only_rank_0_writes(prepared: Path, tmp_path: Path):
    ws = _copy(prepared, tmp_path / "ddp")
    done = run_cli([str(BIN / "genloop"), "train", "--gpus", "2", "--set", "train.epochs=2"], ws, cli_env(ws),
                   timeout=600)
    report = json.loads((ws / "reports" / "train.json").read_text())
    assert report["world_size"] == 2
    assert report["steps"] == expected_steps(load_params(ws / "params.yaml", ["train.epochs=2"]), Workspace.at(ws), 2)
    assert json.loads(done.stdout[done.stdout.index("{"):])["world_size"] == 2
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("genloop")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # rank 1 made no MLflow run
    assert runs[0].data.tags["genloop.world_size"] == "2"
    assert len(list((ws / ".genloop" / "cache" / "checkpoints").glob("*/last.pt"))) == 1
    weights = _weights(ws)
    assert weights and all(torch.isfinite(v.float()).all() for v in weights.values())


def test_a_train_split_over_the_memory_budget_streams_from_the_shards_to_the_same_weights(prepared: Path,
                                                                                          tmp_path: Path):
    """train.memory_budget_gb=0: every batch is read from data/clean's shards (one batch ahead, in a
    thread) instead of a resident tensor; the batches, and so the model, are the same."""
    train = [str(BIN / "genloop"), "train", "--set", "train.epochs=2"]
    resident = _copy(prepared, tmp_path / "resident")
    run_cli(train, resident, cli_env(resident))
    assert json.loads((resident / "reports" / "train.json").read_text())["streamed"] is False
    streamed = _copy(prepared, tmp_path / "streamed")
    done = run_cli([*train, "--set", "train.memory_budget_gb=0"], streamed, cli_env(streamed))
    assert "streaming it from data/clean's shards" in " ".join(done.stderr.split())
    assert json.loads((streamed / "reports" / "train.json").read_text())["streamed"] is True
    a, b = _weights(resident), _weights(streamed)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), "streamed training gave other weights than resident training"
    # the VAE's prior was fitted on the streamed images too (the same encodings, the same prior)
    assert torch.equal(a["prior_mean"], b["prior_mean"])
