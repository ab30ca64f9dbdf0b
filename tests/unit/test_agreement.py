"""The curation score against reviewers: AUC against accept/reject and Spearman against ratings,
per model version and pooled, from records written through the feedback store's own API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from genloop.core.workspace import Workspace
from genloop.feedback import agreement
from genloop.feedback.store import FeedbackRecord, FeedbackStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def curated(ws: Workspace, version: str, scores: list[float]) -> list[str]:
    """outputs/curated/<version>/ as optimize leaves it: kept PNGs and scores.parquet; the image ids."""
    folder = ws.curated / version
    folder.mkdir(parents=True)
    files = [f"{i:06d}.png" for i in range(len(scores))]
    for f in files:
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / f)
    pd.DataFrame({"file": files, "score": scores, "kept": True, "model_version": version}).to_parquet(
        folder / "scores.parquet", index=False)
    return [f"v{version}-{Path(f).stem}" for f in files]


def review(ws: Workspace, version: str, ids: list[str], decisions: list[str | None],
           ratings: list[int | None] | None = None, start: int = 0) -> None:
    """One record per image through FeedbackStore.append, a second apart."""
    store = FeedbackStore.open("feedback", ws)
    for i, (image_id, decision) in enumerate(zip(ids, decisions, strict=True)):
        store.append(FeedbackRecord(image_id=image_id, sha256=f"{i:064x}", model_name="m", model_version=version,
                                    seed=1, decision=decision, rating=ratings[i] if ratings else None,
                                    reviewer="ann", time=T0 + timedelta(seconds=start + i)))


def report(ws: Workspace) -> dict:
    return agreement.report(FeedbackStore.open("feedback", ws).records(), ws)


def test_a_score_that_ranks_accepts_first_agrees_and_a_reversed_one_disagrees(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    scores = [float(s) for s in np.linspace(0.0, 1.0, 40)]
    high_accepted = ["accept" if s > 0.5 else "reject" for s in scores]
    review(ws, "1", curated(ws, "1", scores), high_accepted, ratings=[1 + int(4 * s) for s in scores])
    review(ws, "2", curated(ws, "2", scores), [{"accept": "reject", "reject": "accept"}[d] for d in high_accepted],
           start=100)
    out = report(ws)
    one, two = out["versions"]["1"], out["versions"]["2"]
    assert (one["reviewed"], one["decided"], one["accepted"], one["rated"]) == (40, 40, 20, 40)
    assert one["auc"]["value"] == 1.0 and one["auc"]["interval"] == [1.0, 1.0]
    assert one["rating_spearman"]["value"] > 0.95
    assert two["auc"]["value"] == 0.0 and two["rating_spearman"] is None  # no ratings on version 2
    assert out["pooled"]["reviewed"] == 80 and out["pooled"]["auc"]["value"] == pytest.approx(0.5)
    assert out["interval"].startswith("95% percentile bootstrap")


def test_a_noisy_score_gets_an_interval_and_the_latest_decision_counts(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=60)
    accepted = rng.uniform(size=60) < scores  # acceptance rises with the score, noisily
    ids = curated(ws, "3", [float(s) for s in scores])
    review(ws, "3", ids, ["reject"] * 60)  # first every image rejected, then each one's decision changed
    review(ws, "3", ids, ["accept" if a else "reject" for a in accepted], start=100)
    auc = report(ws)["versions"]["3"]["auc"]
    low, high = auc["interval"]
    assert 0.6 < auc["value"] < 0.95 and low < auc["value"] < high and high - low > 0.05
    assert report(ws)["versions"]["3"]["decided"] == 60  # one state per image, not one per record


def test_one_kind_of_decision_or_no_curated_batch_gives_no_auc(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    review(ws, "4", curated(ws, "4", [0.1, 0.2, 0.3]), ["accept"] * 3)
    review(ws, "5", ["v5-000000", "v5-000001"], ["accept", "reject"], start=10)  # no outputs/curated/5/
    out = report(ws)
    assert out["versions"]["4"]["auc"] is None and out["versions"]["4"]["accepted"] == 3
    assert "5" not in out["versions"]
    by_version = agreement.scored_reviews(FeedbackStore.open("feedback", ws).records(), ws)
    assert agreement.version_auc(by_version, "4") is None and agreement.version_auc(by_version, "5") is None


def test_the_vectorised_statistics_equal_sklearn_and_scipy() -> None:
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    score = np.round(rng.uniform(size=(5, 30)), 1)  # rounded: ties, which both must rank alike
    accepted = (rng.uniform(size=(5, 30)) < score).astype(int)
    rating = rng.integers(1, 6, size=(5, 30))
    assert agreement.auc_rows(score, accepted) == pytest.approx(
        [roc_auc_score(y, s) for s, y in zip(score, accepted, strict=True)])
    assert agreement.spearman_rows(score, rating) == pytest.approx(
        [spearmanr(s, r).statistic for s, r in zip(score, rating, strict=True)])
