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


# --- MLflow conventions: experiment kind, input datasets, the logged pyfunc model -----------


def test_the_experiment_is_marked_as_model_training_and_a_chosen_kind_is_kept(tmp_path, clean_env):
    from mlflow.tracking import MlflowClient

    cfg = load_params(None, [])
    ws = Workspace.at(tmp_path)
    exp_id = tracking.configure(ws, cfg)  # a new experiment
    client = MlflowClient()
    assert client.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.delete_experiment_tag(exp_id, tracking.EXPERIMENT_KIND_TAG)  # one made before genloop tagged it
    tracking.configure(ws, cfg)
    assert client.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.set_experiment_tag(exp_id, tracking.EXPERIMENT_KIND_TAG, "genai_development")  # a user's choice
    tracking.configure(ws, cfg)
    assert client.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def _clean_workspace(root):
    """A workspace with a clean manifest of three images and a data.dvc naming its version."""
    import pandas as pd

    from genloop.core.manifest import MANIFEST_COLUMNS, write_table

    ws = Workspace.at(root)
    ws.manifest.parent.mkdir(parents=True)
    ws.clean.mkdir()
    rows = [{"id": f"{i:016x}", "shard": "a.npy", "offset": i, "sha256": "ab" * 32, "raw_sha256": "cd" * 32,
             "pixel_hash": "ef" * 32, "phash": "0" * 16, "width": 32, "height": 32, "mode": "L",
             "source": "builtin:mnist", "label": str(i) if i else None, "split": "train" if i else "holdout"}
            for i in range(3)]
    write_table(pd.DataFrame(rows), ws.manifest, MANIFEST_COLUMNS)
    ws.data_dvc.write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data/raw\n")
    return ws


def test_train_and_evaluate_runs_record_the_clean_dataset_as_their_input(tmp_path, clean_env, recwarn):
    import mlflow

    from genloop.core.storage import sha256_file

    ws = _clean_workspace(tmp_path)
    cfg = load_params(None, [])
    runs = {}
    for stage in ("train", "evaluate", "generate"):
        with tracking.stage_run(ws, cfg, stage) as run:
            runs[stage] = run.info.run_id
    digest = sha256_file(ws.manifest)
    for stage, context in (("train", "training"), ("evaluate", "evaluation")):
        inputs = mlflow.get_run(runs[stage]).inputs.dataset_inputs
        assert len(inputs) == 1, stage
        dataset, tags = inputs[0].dataset, {t.key: t.value for t in inputs[0].tags}
        assert (dataset.name, dataset.digest, dataset.source_type) == ("clean@0123456789ab", digest[:16], "local")
        assert str(ws.clean) in dataset.source
        assert '"name": "split"' in dataset.schema
        assert tags == {"mlflow.data.context": context, "genloop.data_version": "0123456789abcdef0123456789abcdef.dir",
                        "genloop.manifest_sha256": digest, "genloop.images": "3",
                        "genloop.sources": "builtin:mnist"}
    assert mlflow.get_run(runs["generate"]).inputs.dataset_inputs == []  # it reads no data/clean
    assert not [w for w in recwarn if "mlflow" in w.filename], [str(w.message) for w in recwarn]


def test_a_stage_run_before_clean_records_no_dataset(tmp_path, clean_env):
    import mlflow

    with tracking.stage_run(Workspace.at(tmp_path), load_params(None, []), "train") as run:
        pass
    assert mlflow.get_run(run.info.run_id).inputs.dataset_inputs == []


def test_the_logged_generator_installs_from_pypi_carries_genloop_and_registers_quietly(tmp_path, clean_env,
                                                                                      capfd):
    import re
    import warnings

    import mlflow
    import pandas as pd
    import torch

    from genloop.models import GeneratorSpec, family, save_generator
    from genloop.stages import register

    ws = Workspace.at(tmp_path)
    spec = GeneratorSpec("vae", 8, 1, [], {"latent_dim": 4, "width": 8})
    save_generator(family("vae").build_generator(spec), spec, ws.generator)
    cfg = load_params(None, [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracking.stage_run(ws, cfg, "register"):
            info = register.log_generator(ws, spec)
    hints = [str(w.message) for w in caught if "type hint" in str(w.message).lower()]
    assert not hints  # MLflow's "Add type hints to the predict method" and kin
    local = tmp_path / "model"
    mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(local))
    requirements = (local / "requirements.txt").read_text().split()
    assert [r.split("==")[0] for r in requirements] == ["mlflow", "torch", "numpy", "pandas"]
    assert all(re.fullmatch(r"[a-z]+==\d+(\.\d+)*", r) for r in requirements), requirements  # no path, -e, +local
    assert requirements[:2] == [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}"]
    assert (local / "code" / "genloop" / "mlops" / "pyfunc.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))
    capfd.readouterr()
    mlflow.set_registry_uri(tracking.tracking_uri(ws))
    assert tracking.create_version("g", info.model_uri, {"k": "v"}) == "1"
    said = capfd.readouterr()
    assert "registered model" not in said.err and "Created version" not in said.err, said.err
    images = mlflow.pyfunc.load_model("models:/g/1").predict(pd.DataFrame({"n": [2], "seed": [0]}))
    assert images.shape == (2, 8, 8, 1)
