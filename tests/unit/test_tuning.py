"""autotune: one Optuna trial per loop iteration, told the gate's metric and the reviewers'
acceptance; the study persists across processes (journal file, sqlite, S3); the proposal
is a complete params file that `genloop loop` can apply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from genloop.cli.main import app
from genloop.core.config import Params, load_params
from genloop.core.storage import write_json_atomic
from genloop.core.workspace import Workspace
from genloop.feedback import tuning
from genloop.feedback.store import FeedbackRecord, FeedbackStore
from genloop.mlops import tracking
from tests.helpers import ROOT
from tests.unit.test_agreement import curated, review

SMALL = ["optimize.tune.epochs=[1, 3]", "optimize.tune.lr=[0.0005, 0.003]", "optimize.tune.latent_dim=[4, 16]",
         "optimize.tune.beta=[0.5, 2.0]", "model.vae.latent_dim=8", "train.epochs=1"]


@pytest.fixture(autouse=True)
def _own_tracking_store(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", tracking.PARENT_RUN_ENV):
        monkeypatch.delenv(var, raising=False)


def iteration(ws: Workspace, version: str, fid: float, generator: str) -> None:
    """What evaluate and register leave behind for autotune: eval.json and register.json."""
    write_json_atomic(ws.report("eval"), {"fid": fid, "kid_mean": fid / 1000, "generator_sha256": generator,
                                          "extractor": {"name": "domain-classifier"}, "train_run_id": None,
                                          "data_version": f"data-{version}"})
    write_json_atomic(ws.report("register"), {"version": version, "metric": "fid"})  # the gate's metric


def step(cfg: Params, ws: Workspace) -> dict:
    with tracking.stage_run(ws, cfg, "optimize"):
        return tuning.step(cfg, ws)


def feedback(ws: Workspace, version: str, decisions: list[str]) -> None:
    store = FeedbackStore.open("feedback", ws)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for i, decision in enumerate(decisions):
        store.append(FeedbackRecord(image_id=f"v{version}-{i:06d}", sha256=f"{i:064x}", model_name="m",
                                    model_version=version, seed=1, decision=decision, reviewer="ann",
                                    time=t0 + timedelta(seconds=i)))


def study_of(cfg: Params, ws: Workspace) -> optuna.Study:
    with tuning.open_storage(cfg, ws) as storage:
        return tuning.load_study(cfg, storage)


def test_objective_is_the_metric_and_moves_with_acceptance() -> None:
    assert tuning.objective(12.0, 10.0, None, 0.5) == pytest.approx(1.2)  # no feedback: the metric alone
    assert tuning.objective(12.0, 10.0, 0.5, 0.5) == pytest.approx(1.2)  # half accepted: neutral
    assert tuning.objective(12.0, 10.0, 1.0, 0.5) == pytest.approx(0.7)
    assert tuning.objective(12.0, 10.0, 0.0, 0.5) == pytest.approx(1.7)
    assert tuning.objective(12.0, 10.0, 0.0, 0.0) == pytest.approx(1.2)
    assert tuning.objective(-0.002, 0.001, 1.0, 0.5) < tuning.objective(-0.002, 0.001, 0.0, 0.5)  # KID < 0
    # the curation score's agreement with reviewers: AUC 1/2 is neutral, 1 earns v, 0 costs v
    assert tuning.objective(12.0, 10.0, 0.5, 0.5, 0.5, 0.25) == pytest.approx(1.2)
    assert tuning.objective(12.0, 10.0, 0.5, 0.5, 1.0, 0.25) == pytest.approx(0.95)
    assert tuning.objective(12.0, 10.0, 0.5, 0.5, 0.0, 0.25) == pytest.approx(1.45)
    assert tuning.objective(12.0, 10.0, 0.5, 0.5, 0.0, 0.0) == pytest.approx(1.2)
    assert tuning.objective(12.0, 10.0, None, 0.5, None, 0.25) == pytest.approx(1.2)


def test_the_search_space_follows_the_family() -> None:
    keys = lambda *sets: [d.key for d in tuning.space(load_params(None, list(sets)))]  # noqa: E731
    assert keys() == ["train.epochs", "model.vae.lr", "model.vae.latent_dim", "model.vae.beta"]
    assert keys("model.family=dcgan") == ["train.epochs", "train.lr", "model.dcgan.latent_dim"]
    assert keys("model.family=ddpm") == ["train.epochs", "model.ddpm.lr"]
    assert keys("model.vae.lr=null", "optimize.tune.beta=null") == ["train.epochs", "train.lr",
                                                                      "model.vae.latent_dim"]


def test_two_iterations_feedback_reaches_the_study_and_the_proposal_is_applied(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    cfg = load_params(None, SMALL)
    iteration(ws, "1", 20.0, "a" * 64)
    first = step(cfg, ws)
    assert first["trial"] == 0 and first["awaiting_feedback"] is True
    assert "metric only: no feedback on version 1 yet" in first["objective_basis"]
    assert first["objective"] == pytest.approx(1.0)  # the first trial is the reference
    assert first["proposal_trial"] == 1
    text = (ws.reports / "next_params.yaml").read_text()
    assert "Proposed by trial 1 of Optuna study 'genloop'" in text and "random exploration" in text
    proposal = tuning.read_proposal(ws.reports / "next_params.yaml")
    assert proposal == first["proposal"] and set(proposal) == {d.key for d in tuning.space(cfg)}
    whole = load_params(ws.reports / "next_params.yaml")  # a complete, valid params file
    shown = CliRunner().invoke(app, ["params", "--params", str(ws.reports / "next_params.yaml")])
    assert shown.exit_code == 0 and yaml.safe_load(shown.stdout) == whole.model_dump(mode="json", by_alias=True)
    assert all(tuning.get_param(whole, k) == v for k, v in proposal.items())
    assert whole.model_copy(update={"train": cfg.train, "model": cfg.model}) == cfg  # nothing else changed
    assert step(cfg, ws)["proposal_trial"] == 1  # optimize again, same generator: no new trial, same proposal

    # reviewers judge version 1's images; the next loop applies the proposal
    feedback(ws, "1", ["accept", "accept", "accept", "reject"])
    applied = tuning.apply_proposal(cfg, ws, ["train.batch_size=16"])
    assert applied is not None and applied.overrides[-1] == "train.batch_size=16"
    cfg2 = load_params(None, [*SMALL, *applied.overrides])
    assert all(tuning.get_param(cfg2, k) == v for k, v in proposal.items())
    iteration(ws, "2", 15.0, "b" * 64)
    second = step(cfg2, ws)
    assert second["trial"] == 1  # the proposal it applied is this iteration's trial
    settled = {s["trial"]: s for s in second["settled"]}
    assert settled[0]["acceptance"] == 0.75
    assert settled[0]["objective"] == pytest.approx(1.0 + 0.5 * (1 - 2 * 0.75))
    study = study_of(cfg, ws)
    t0, t1, t2 = study.trials
    assert t0.state == TrialState.COMPLETE and "human acceptance 75.0% of version 1" in t0.user_attrs[
        "objective_basis"]
    assert t1.state == TrialState.RUNNING and t1.user_attrs["applied_proposal"] is True
    assert t1.user_attrs["model_version"] == "2" and t1.user_attrs["metric"] == 15.0
    assert t2.user_attrs[tuning.ROLE] == tuning.PROPOSAL and second["proposal_trial"] == 2

    # the third loop ignores the proposal: it is marked failed, and the params used are a new trial
    iteration(ws, "3", 18.0, "c" * 64)
    third = step(load_params(None, SMALL), ws)
    study = study_of(cfg, ws)
    states = [t.state for t in study.trials]
    assert states[:4] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING]
    assert study.trials[1].user_attrs["objective_basis"].startswith("metric only: no feedback on version 2")
    assert study.trials[1].value == pytest.approx(15.0 / 20.0)
    assert third["trial"] == 3 and study.trials[3].params["train.epochs"] == 1


def test_a_curation_score_that_disagrees_with_reviewers_costs(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    cfg = load_params(None, [*SMALL, "optimize.tune.acceptance_weight=0.5", "optimize.tune.agreement_weight=0.25"])
    iteration(ws, "1", 20.0, "a" * 64)
    ids = curated(ws, "1", [0.1, 0.2, 0.3, 0.4])
    review(ws, "1", ids, ["accept", "accept", "reject", "reject"])  # people keep what the score ranks last
    out = step(cfg, ws)
    assert out["acceptance"] == 0.5 and out["agreement"] == 0.0 and out["awaiting_feedback"] is False
    assert out["objective"] == pytest.approx(1.0 + 0.5 * 0 + 0.25 * (1 - 2 * 0.0))
    assert "agreement with reviewers, AUC 0.000 (weight 0.25)" in out["objective_basis"]
    assert study_of(cfg, ws).trials[0].user_attrs["agreement"] == 0.0


def test_a_used_value_outside_the_range_is_recorded_as_it_was(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    cfg = load_params(None, [*SMALL, "train.epochs=7", "optimize.tune.acceptance_weight=0",
                             "optimize.tune.agreement_weight=0"])
    iteration(ws, "1", 20.0, "a" * 64)
    out = step(cfg, ws)
    assert out["awaiting_feedback"] is False  # both feedback weights 0: nothing to wait for
    trial = study_of(cfg, ws).trials[0]
    assert trial.params["train.epochs"] == 7 and trial.state == TrialState.COMPLETE
    assert 1 <= out["proposal"]["train.epochs"] <= 3  # proposals stay inside the configured range


def test_disabled_tuning_writes_the_params_unchanged(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    cfg = load_params(None, ["optimize.tune.enabled=false"])
    assert step(cfg, ws) == {"enabled": False, "file": str(ws.reports / "next_params.yaml")}
    assert load_params(ws.reports / "next_params.yaml") == cfg
    assert tuning.read_proposal(ws.reports / "next_params.yaml") is None
    assert tuning.apply_proposal(cfg, ws, []) is None


def _in_another_process(ws: Workspace, storage: str, value: float) -> int:
    code = textwrap.dedent(f"""
        from genloop.feedback import tuning
        from genloop.core.config import load_params
        from genloop.core.workspace import Workspace
        cfg = load_params(None, ["optimize.tune.storage={storage}"])
        with tuning.open_storage(cfg, Workspace.at({str(ws.root)!r})) as storage:
            study = tuning.load_study(cfg, storage)
            study.enqueue_trial({{"train.epochs": {int(value)}}})
            trial = study.ask()
            trial.suggest_int("train.epochs", 1, 20)
            study.tell(trial, {value})
            print(len(study.trials))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.parametrize("storage", ["null", "tuning/study.log", "sqlite:///tuning.db"])
def test_the_study_persists_across_processes(tmp_path: Path, storage: str) -> None:
    ws = Workspace.at(tmp_path)
    assert _in_another_process(ws, storage, 3.0) == 1
    assert _in_another_process(ws, storage, 2.0) == 2  # the second process sees the first one's trial
    cfg = load_params(None, [f"optimize.tune.storage={storage}"])
    study = study_of(cfg, ws)
    assert [t.value for t in study.trials] == [3.0, 2.0] and study.best_trial.params == {"train.epochs": 2}
    where = {"null": ".genloop/optuna/study.log", "tuning/study.log": "tuning/study.log",
             "sqlite:///tuning.db": "tuning.db"}[storage]
    assert (tmp_path / where).is_file()


def test_an_s3_study_is_downloaded_used_and_written_back_unless_changed_meanwhile(s3_env: str,
                                                                                   tmp_path: Path) -> None:
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket="tune")
    uri = "s3://tune/studies/genloop.log"
    ws = Workspace.at(tmp_path)
    assert _in_another_process(ws, uri, 4.0) == 1
    other = Workspace.at(tmp_path / "elsewhere")  # another machine: its own local copy
    assert _in_another_process(other, uri, 5.0) == 2
    cfg = load_params(None, [f"optimize.tune.storage={uri}"])
    assert [t.value for t in study_of(cfg, ws).trials] == [4.0, 5.0]
    with pytest.raises(tuning.TuneError, match="changed while this optimize used it"):
        with tuning.open_storage(cfg, ws) as storage:
            study = tuning.load_study(cfg, storage)
            _in_another_process(other, uri, 6.0)  # someone else saves a trial meanwhile
            study.enqueue_trial({"train.epochs": 7})
            study.tell(study.ask(), 7.0)
    assert [t.value for t in study_of(cfg, ws).trials] == [4.0, 5.0, 6.0]  # theirs kept, not overwritten


def test_params_and_dvc_yaml_declare_the_proposal() -> None:
    outs = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["optimize"]["outs"]
    assert {"reports/next_params.yaml": {"cache": False}} in outs
    assert load_params(ROOT / "params.yaml").optimize.tune == Params().optimize.tune
    assert json.loads(json.dumps(Params().optimize.tune.model_dump(mode="json")))["epochs"] == [2, 20]
