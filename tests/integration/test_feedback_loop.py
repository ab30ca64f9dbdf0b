"""Closing the data loop: reviewers' decisions become data (`feedback:` source, capped, with
negatives), steer the next training (autotune) and link the iterations in MLflow.

The unit tests build curated batches and feedback by hand; the end-to-end test runs
`genloop loop` twice from the command line against a real MLflow server, with scripted
feedback written through FeedbackStore in between."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from genloop.core.config import load_params
from genloop.core.manifest import FEEDBACK_SOURCE, ROLE_NEGATIVE, ROLE_TRAIN, read_ledger, read_manifest
from genloop.core.provenance import data_version
from genloop.core.storage import sha256_bytes
from genloop.core.workspace import Workspace
from genloop.eval.gate import Comparison, decide
from genloop.feedback import intake
from genloop.feedback.store import FeedbackRecord, FeedbackStore, acceptance_rate, curated_image_id
from genloop.stages import clean, collect
from tests.data.test_collect import tiny_png
from tests.helpers import BIN, TINY, cli_env, make_workspace, run_cli
from tests.integration.test_e2e import mlflow_server  # noqa: F401  (the real MLflow server fixture of the e2e tests)

T0 = datetime(2026, 3, 1, tzinfo=UTC)


png = tiny_png  # a distinct tiny PNG per seed


def real_folder(root: Path, n: int) -> Path:
    folder = root / "real"
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:03d}.png").write_bytes(png(i))
    return folder


def curated_batch(ws: Workspace, version: str, scores: list[float]) -> dict[str, bytes]:
    """outputs/curated/<version>/ as optimize leaves it: PNGs and scores.parquet."""
    folder = ws.curated / version
    folder.mkdir(parents=True)
    files = {f"{i:06d}.png": png(1000 * int(version) + i) for i in range(len(scores))}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    pd.DataFrame({"file": list(files), "seed": 2024, "label": [str(i % 3) for i in range(len(files))],
                  "score": scores, "kept": True}).to_parquet(folder / "scores.parquet", index=False)
    return files


class Reviewer:
    """Scripted feedback, written through the store as the review page would."""

    def __init__(self, ws: Workspace, name: str = "ann") -> None:
        self.store = FeedbackStore.open("feedback", ws)
        self.name, self.tick = name, 0

    def judge(self, version: str, file: str, data: bytes, decision: str, rating: int | None = None,
              sha256: str | None = None) -> str:
        self.tick += 1
        record = FeedbackRecord(image_id=curated_image_id(version, file), sha256=sha256 or sha256_bytes(data),
                                model_name="genloop-generator", model_version=version, seed=2024,
                                decision=decision, rating=rating, reviewer=self.name,
                                time=T0 + timedelta(seconds=self.tick))
        self.store.append(record)
        return record.image_id


def params(folder: Path, *extra: str):
    return load_params(None, ["collect.dvc_add=false",
                              f"collect.sources=[{{uri: '{folder}'}}, {{uri: 'feedback:'}}]", *extra])


def test_synthetic_budget_keeps_the_share_at_most_the_fraction() -> None:
    budget = intake.synthetic_budget
    assert budget(400, 0, 0.2) == 100  # 100 / 500 = 0.2 exactly: allowed
    assert budget(400, 60, 0.2) == 40 and budget(400, 100, 0.2) == 0 and budget(400, 130, 0.2) == 0
    assert budget(70, 0, 0.3) == 30  # 0.3 * 70 / 0.7 is 29.999... in floats: exact decimals say 30
    assert budget(400, 0, 0.02) == 8  # 8 / 408 < 0.02 < 9 / 409
    assert budget(3, 0, 0.25) == 1 and budget(10, 0, 0.0) == 0 and budget(0, 0, 0.5) == 0
    assert budget(10, 5, 1.0) > 10**9
    for real in range(0, 60):
        for f in (0.05, 0.1, 0.2, 0.25, 0.5, 0.9):
            b = budget(real, 0, f)
            assert Fraction(b, max(real + b, 1)) <= Fraction(str(f))
            assert Fraction(b + 1, real + b + 1) > Fraction(str(f))  # one more would break the cap


def test_feedback_collects_accepted_images_under_the_cap_records_negatives_and_skips_mismatches(
        tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    folder = real_folder(tmp_path, 20)
    scores = [0.1 * i for i in range(12)]
    files = curated_batch(ws, "1", scores)
    names = list(files)
    ann = Reviewer(ws)
    ratings = [5, 3, 5, 4, None, 2, 4, 3]  # images 0-7 accepted
    accepted = [ann.judge("1", names[i], files[names[i]], "accept", r) for i, r in enumerate(ratings)]
    rejected = [ann.judge("1", names[i], files[names[i]], "reject", 1) for i in (8, 9, 10)]
    bad = ann.judge("1", names[11], files[names[11]], "accept", 5, sha256=sha256_bytes(b"another image"))

    summary = collect.run(params(folder, "collect.max_synthetic_fraction=0.2"), ws)
    fb = summary["feedback"]
    # 20 real images, 0.2: at most 5 generated ones (5 / 25); highest rating, then score, then id
    order = sorted(range(8), key=lambda i: (-(ratings[i] or 0), -scores[i], accepted[i]))
    chosen = [accepted[i] for i in order[:5]]
    assert chosen == ["v1-000002", "v1-000000", "v1-000006", "v1-000003", "v1-000007"]
    assert fb["accepted_added"] == 5 and fb["capped"] == 3
    assert fb["capped_images"] == [accepted[i] for i in order[5:]]
    assert fb["negatives_recorded"] == 3 and fb["negatives_total"] == 3
    assert fb["synthetic_share"] == pytest.approx(5 / 25) and fb["corpus"] == 25
    assert fb["reviewed"] == 12 and fb["rejected_share_of_reviewed"] == pytest.approx(3 / 12)
    assert [s["image_id"] for s in fb["skipped"]] == [bad] and "sha256 mismatch" in fb["skipped"][0]["reason"]
    assert summary["sources"][FEEDBACK_SOURCE] == {"offered": 8, "added": 5}

    ledger = read_ledger(ws.ledger)
    synthetic = ledger[(ledger["source"] == FEEDBACK_SOURCE) & (ledger["role"] == ROLE_TRAIN)]
    negatives = ledger[ledger["role"] == ROLE_NEGATIVE]
    assert len(ledger) == 20 + 5 + 3 and set(ledger["role"]) == {ROLE_TRAIN, ROLE_NEGATIVE}
    prov = {p["image_id"]: p for p in map(json.loads, synthetic["provenance"])}
    assert sorted(prov) == sorted(chosen)
    top = prov["v1-000002"]
    assert (top["model_version"], top["seed"], top["rating"], top["reviewer"]) == ("1", 2024, 5, "ann")
    assert top["model_name"] == "genloop-generator" and len(top["record_id"]) == 32
    assert top["score"] == pytest.approx(0.2)
    assert synthetic.set_index("original").loc["outputs/curated/1/000002.png", "label"] == "2"
    for sha, rel in zip(synthetic["sha256"], synthetic["file"], strict=True):
        assert sha256_bytes((ws.raw / rel).read_bytes()) == sha  # the bytes the reviewer saw
    assert sorted(json.loads(p)["image_id"] for p in negatives["provenance"]) == rejected
    assert negatives["file"].isna().all()  # recorded, never copied into the training data
    assert not any(sha in p.name for p in ws.raw.rglob("*.png") for sha in negatives["sha256"])

    report = clean.run(params(folder), ws)
    manifest = read_manifest(ws.manifest)
    assert report["negatives_skipped"] == 3 and not manifest["raw_sha256"].isin(negatives["sha256"]).any()
    assert set(synthetic["sha256"]) <= set(manifest["raw_sha256"])
    generated = manifest[manifest["source"] == FEEDBACK_SOURCE]
    assert (generated["split"] == "train").all()  # the holdout stays real: evaluation's reference
    assert not any("missing" in d["reason"] for d in json.loads(ws.report("clean").read_text())["dropped_files"])

    # nothing new: the cap holds, nothing is recorded twice
    again = collect.run(params(folder, "collect.max_synthetic_fraction=0.2"), ws)["feedback"]
    assert (again["accepted_added"], again["already_collected"], again["capped"]) == (0, 5, 3)
    assert again["negatives_recorded"] == 0 and len(read_ledger(ws.ledger)) == 28


def test_changed_decisions_move_images_between_corpus_and_negatives(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    folder = real_folder(tmp_path, 8)
    files = curated_batch(ws, "3", [0.5, 0.4, 0.3, 0.2])
    n = list(files)
    ann = Reviewer(ws)
    ann.judge("3", n[0], files[n[0]], "accept", 5)
    ann.judge("3", n[1], files[n[1]], "accept", 4)
    ann.judge("3", n[2], files[n[2]], "reject")
    cfg = params(folder, "collect.max_synthetic_fraction=0.2")  # 8 real: 2 generated at most
    first = collect.run(cfg, ws)["feedback"]
    assert (first["accepted_added"], first["negatives_recorded"]) == (2, 1)
    # a second reviewer changes her mind: image 0 is out, image 2 is in, image 3 is new
    bob = Reviewer(ws, "bob")
    bob.tick = 100
    bob.judge("3", n[0], files[n[0]], "reject")
    bob.judge("3", n[2], files[n[2]], "accept", 3)
    bob.judge("3", n[3], files[n[3]], "accept", 1)
    second = collect.run(cfg, ws)["feedback"]
    assert second["retracted_images"] == ["v3-000000"] and second["reinstated"] == 1
    assert second["accepted_added"] == 1 and second["capped_images"] == ["v3-000003"]
    ledger = read_ledger(ws.ledger).set_index("original")
    role = ledger["role"].to_dict()
    assert role["outputs/curated/3/000000.png"] == ROLE_NEGATIVE  # its file stays in data/raw, unused
    assert role["outputs/curated/3/000002.png"] == ROLE_TRAIN and pd.notna(ledger.at["outputs/curated/3/000002.png",
                                                                                     "file"])
    assert ledger.index.is_unique and ledger["sha256"].is_unique
    assert acceptance_rate(FeedbackStore.open("feedback", ws).records(), "3") == pytest.approx(3 / 4)
    clean.run(cfg, ws)
    kept = set(read_manifest(ws.manifest)["raw_sha256"])
    assert sha256_bytes(files[n[0]]) not in kept and sha256_bytes(files[n[2]]) in kept


def test_a_ledger_from_before_roles_reads_as_training_rows(tmp_path: Path) -> None:
    path = tmp_path / "ledger.parquet"
    pd.DataFrame({"sha256": ["a" * 64], "file": ["aa/a.png"], "source": ["builtin:mnist"], "original": ["x"],
                  "label": ["1"], "collected_at": ["2026-01-01T00:00:00+00:00"], "provenance": ["{}"]}
                 ).to_parquet(path, index=False)
    assert read_ledger(path)["role"].tolist() == [ROLE_TRAIN]


# ------------------------------------------------------------------------------ end to end

# the shared tiny settings, with a feedback: source, a cap that bites and narrow tuning ranges
_REPLACED = ("collect.sources=", "generate.", "optimize.keep=")
LOOP = [o for o in TINY if not o.startswith(_REPLACED)] + [
    "collect.sources=[{uri: 'builtin:mnist', limit: 400}, {uri: 'feedback:'}]",
    "collect.max_synthetic_fraction=0.02",  # 400 real images: 8 generated ones at most
    "data.resolution=16",
    "register.gate.bootstrap=40",
    "generate.n=64",
    "generate.batch_size=32",
    "optimize.keep=32",
    "optimize.tune.epochs=[1, 2]",
    "optimize.tune.lr=[0.0005, 0.003]",
    "optimize.tune.latent_dim=[4, 12]",
    "optimize.tune.beta=[0.5, 2.0]",
    "loop.autotune=true",
]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.e2e
def test_the_loop_twice_with_feedback_in_between(tmp_path: Path, mlflow_server: str,  # noqa: F811
                                                 prefect_api: str) -> None:
    ws_root = make_workspace(tmp_path, LOOP)
    ws = Workspace.at(ws_root)
    env = cli_env(ws_root, MLFLOW_TRACKING_URI=mlflow_server, PREFECT_API_URL=prefect_api)
    started = time.monotonic()
    run_cli([str(BIN / "genloop"), "loop"], ws_root, env)
    first_loop = time.monotonic() - started
    version1 = _json(ws.report("optimize"))["model_version"]
    data1 = data_version(ws)  # data.dvc's md5 of data/raw joined with the ledger's
    proposal_file = (ws.reports / "next_params.yaml").read_text()
    assert "# Proposed by trial 1 of Optuna study 'genloop'" in proposal_file
    proposal = _json(ws.report("optimize"))["autotune"]["proposal"]

    # scripted review of iteration 1's curated batch
    scores = pd.read_parquet(ws.curated / version1 / "scores.parquet")
    kept = scores[scores["kept"]].sort_values("file").reset_index(drop=True)
    assert len(kept) == min(32, int((~scores["near_copy"]).sum())) >= 24  # optimize.keep=32; the review needs 23
    ann = Reviewer(ws)
    accepted: dict[str, tuple[int, float]] = {}
    for i, row in kept.head(16).iterrows():
        data = (ws.curated / version1 / row["file"]).read_bytes()
        rating = 5 - i % 5
        accepted[ann.judge(version1, row["file"], data, "accept", rating)] = (rating, float(row["score"]))
    rejected = {}
    for _, row in kept.iloc[16:22].iterrows():
        data = (ws.curated / version1 / row["file"]).read_bytes()
        rejected[ann.judge(version1, row["file"], data, "reject", 1)] = sha256_bytes(data)
    mismatch = kept.iloc[22]["file"]
    ann.judge(version1, mismatch, b"", "accept", 5, sha256="0" * 64)  # not the image on disk: skipped

    started = time.monotonic()
    second = run_cli([str(BIN / "genloop"), "loop"], ws_root, env)
    second_loop = time.monotonic() - started
    print(f"\nloop 1: {first_loop:.0f} s, loop 2: {second_loop:.0f} s")
    assert "autotune:   applied" in second.stdout and "iteration:  2" in second.stdout

    # 1. feedback became data: a new data version, accepted images with provenance, negatives, the cap
    data2 = data_version(ws)
    assert data2.split("+")[0] != data1.split("+")[0] and data2.split("+")[0] == yaml.safe_load(
        (ws_root / "data.dvc").read_text())["outs"][0]["md5"]  # new raw files: a new data.dvc
    report = _json(ws.report("collect"))["feedback"]
    best = sorted(accepted, key=lambda k: (-accepted[k][0], -accepted[k][1], k))
    assert report["accepted_added"] == 8 and report["capped"] == 8 and report["capped_images"] == best[8:]
    assert report["negatives_recorded"] == 6 and report["synthetic_share"] == pytest.approx(8 / 408, abs=1e-6)
    assert report["rejected_share_of_reviewed"] == pytest.approx(6 / 23, abs=1e-6)
    assert [s["image_id"] for s in report["skipped"]] == [curated_image_id(version1, mismatch)]
    ledger = read_ledger(ws.ledger)
    synthetic = ledger[(ledger["source"] == FEEDBACK_SOURCE) & (ledger["role"] == ROLE_TRAIN)]
    prov = {p["image_id"]: p for p in map(json.loads, synthetic["provenance"])}
    assert sorted(prov) == sorted(best[:8])
    assert all((ws.raw / rel).is_file() for rel in synthetic["file"])  # in data/raw, under data.dvc's new md5
    for image_id, p in prov.items():
        assert (p["model_version"], p["seed"], p["rating"]) == (version1, 2024, accepted[image_id][0])
    negatives = ledger[ledger["role"] == ROLE_NEGATIVE]
    assert sorted(json.loads(p)["image_id"] for p in negatives["provenance"]) == sorted(rejected)
    assert set(negatives["sha256"]) == set(rejected.values())
    assert len(synthetic) / (ledger["role"] == ROLE_TRAIN).sum() <= 0.02  # the cap holds

    # clean trains on no negative; the generated images are training images only
    manifest = read_manifest(ws.manifest)
    assert not manifest["raw_sha256"].isin(negatives["sha256"]).any()
    dropped = {d["raw_sha256"] for d in _json(ws.report("clean"))["dropped_files"]}
    assert set(manifest.loc[manifest["source"] == FEEDBACK_SOURCE, "raw_sha256"]) == set(synthetic["sha256"]) - dropped
    assert (manifest.loc[manifest["source"] == FEEDBACK_SOURCE, "split"] == "train").all()

    # 2. the second training used iteration 1's proposal: the whole file, key by key
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    client = MlflowClient()
    train_run = client.get_run(_json(ws.report("train"))["run_id"])
    (tmp_path / "proposal.yaml").write_text(proposal_file)
    expected = {k: str(v) for k, v in load_params(tmp_path / "proposal.yaml").flat().items()}
    assert train_run.data.params == expected
    assert all(yaml.safe_load(train_run.data.params[k]) == v for k, v in proposal.items())
    tune = _json(ws.report("optimize"))["autotune"]
    assert tune["trial"] == 1  # the applied proposal is iteration 2's trial
    settled = {s["trial"]: s for s in tune["settled"]}
    assert settled[0]["acceptance"] == pytest.approx(17 / 23, abs=1e-6)  # version 1's reviews reached the study
    assert tune["proposal_trial"] == 2 and "Proposed by trial 2" in (ws.reports / "next_params.yaml").read_text()

    # 3. the gate compared iteration 2's challenger with champion 1 on equal terms, and its verdict and
    #    reason are the ones its rule gives for the numbers it recorded (which way depends on training)
    gate, reg = _json(ws.report("gate")), _json(ws.report("register"))
    assert reg["version"] == "2" and gate["reason"] == reg["reason"]
    assert gate["champion"]["version"] == "1"
    cfg = load_params(ws_root / "params.yaml")
    assert gate["settings"]["n_samples"] == cfg.evaluate.n_samples and gate["settings"]["seed"] == cfg.evaluate.seed
    assert gate["settings"]["bootstrap"] == 40 == gate["comparison"]["resamples"]
    comparison = Comparison(**gate["comparison"])
    assert (comparison.challenger, comparison.champion) == (gate["challenger"]["score"], gate["champion"]["score"])
    challenger = SimpleNamespace(memorisation=SimpleNamespace(share=gate["challenger"]["memorised_share"]))
    assert (gate["passed"], gate["reason"]) == decide(cfg, challenger, comparison)
    assert reg["promoted"] is gate["passed"]
    assert reg["champion_version"] == ("2" if gate["passed"] else "1")
    tags = client.get_model_version("genloop-generator", "2").tags
    assert tags["genloop.gate.passed"] == str(gate["passed"]) and tags["genloop.decision"] == gate["reason"]
    assert tags["genloop.data_version"] == data2

    # 4. the iterations are linked
    exp = client.get_experiment_by_name("genloop")
    loops = client.search_runs([exp.experiment_id], "tags.`genloop.stage` = 'loop'",
                               order_by=["attributes.start_time ASC"])
    assert [r.data.tags["genloop.iteration"] for r in loops] == ["1", "2"]
    one, two = loops
    assert two.data.tags["genloop.previous_run_id"] == one.info.run_id
    assert two.data.tags["genloop.previous_run_url"].endswith(f"/runs/{one.info.run_id}")
    assert two.data.tags["genloop.previous_data_version"] == data1 == one.data.tags["genloop.data_version"]
    assert two.data.tags["genloop.data_version"] == data2
    assert "genloop.previous_run_id" not in one.data.tags
    print(f"collected {report['accepted_added']}, "
          f"capped {report['capped']}, negatives {report['negatives_recorded']}, synthetic share "
          f"{report['synthetic_share']:.2%}; proposal {proposal}; gate: {gate['passed']} ({gate['reason']})")
