"""How well the curation score agrees with reviewers: ROC AUC against accept/reject, Spearman against ratings.

For every model version with reviews, each reviewed image's current state (its latest decision
and latest rating, `store.latest`) is paired with the curation score optimize gave it (the
`score` column of outputs/curated/<version>/scores.parquet, found by the image id
`v<version>-<stem>`). AUC 1.0: every accepted image scored above every rejected one; 0.5: the
score says nothing about what people keep; below 0.5: it ranks backwards. Intervals are 95 %
percentile bootstrap intervals over the reviewed images (`BOOTSTRAP` resamples, fixed seed).
People only review kept images, the top of each batch, so these figures describe how well the
score orders that top, not the whole batch. "pooled" puts every version's images together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from genloop.core.workspace import Workspace
from genloop.feedback.curated_batch import BatchIndex
from genloop.feedback.store import FeedbackRecord, latest

log = logging.getLogger(__name__)

BOOTSTRAP = 1000
INTERVAL = "95% percentile bootstrap over the reviewed images, 1000 resamples"


# sklearn's roc_auc_score and scipy's spearmanr score one sample per call (tens of ms each on a
# busy 2-core machine); a 1000-resample bootstrap needs them vectorised, so both are their rank
# formulas on scipy's rankdata over a (resamples, images) array. tests/unit/test_agreement.py
# checks them against sklearn and scipy.
def auc_rows(score: np.ndarray, accepted: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of `score` against the 0/1 row of `accepted` (Mann-Whitney U / n1 n0);
    NaN for a row with one class only."""
    from scipy.stats import rankdata

    ranks = rankdata(score, axis=1)
    n1 = accepted.sum(axis=1)
    n0 = accepted.shape[1] - n1
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((ranks * accepted).sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def spearman_rows(score: np.ndarray, rating: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of each row pair (NaN where a row is constant)."""
    from scipy.stats import rankdata

    a, b = (rankdata(x, axis=1) for x in (score, rating))
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))


def _with_interval(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], score: np.ndarray, y: np.ndarray,
                   seed: int) -> dict[str, Any] | None:
    """The statistic and its bootstrap interval; None when it is undefined on these images."""
    if len(np.unique(y)) < 2 or len(np.unique(score)) < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, len(y), (BOOTSTRAP, len(y)))
    draws = fn(score[idx], y[idx])
    draws = draws[np.isfinite(draws)]  # resamples that drew one class (or one score) only
    value = float(fn(score[None], y[None])[0])
    low, high = np.percentile(draws, [2.5, 97.5]) if len(draws) else (float("nan"), float("nan"))
    return {"value": round(value, 4), "interval": [round(float(low), 4), round(float(high), 4)]}


def agreement_of(score: np.ndarray, decision: list[str | None], rating: list[int | None],
                 seed: int = 0) -> dict[str, Any]:
    """AUC of `score` against accept (1) / reject (0) and Spearman against 1-5 ratings, with counts."""
    decided = np.array([d is not None for d in decision], dtype=bool)
    rated = np.array([r is not None for r in rating], dtype=bool)
    accepted = np.array([d == "accept" for d in decision], dtype=int)
    ratings = np.array([r if r is not None else 0 for r in rating], dtype=float)
    return {
        "reviewed": int(len(score)),
        "decided": int(decided.sum()),
        "accepted": int(accepted[decided].sum()),
        "rated": int(rated.sum()),
        "auc": _with_interval(auc_rows, score[decided], accepted[decided], seed),
        "rating_spearman": _with_interval(spearman_rows, score[rated], ratings[rated], seed),
    }


def scored_reviews(records: Iterable[FeedbackRecord], ws: Workspace) -> dict[str, list[tuple[float, FeedbackRecord]]]:
    """Per model version, each reviewed image's curation score and current state (images whose
    curated batch or score is gone are left out, with a warning)."""
    index, out, missing = BatchIndex(ws), {}, 0
    for image_id, state in latest(records).items():
        batch = index.batch(state.model_version)
        image = batch.get(image_id) if batch is not None else None
        if image is None or image.score is None:
            missing += 1
            continue
        out.setdefault(state.model_version, []).append((image.score, state))
    if missing:
        log.warning("agreement: %d reviewed image(s) have no curated score under %s; left out", missing, ws.curated)
    return out


def _of_pairs(pairs: list[tuple[float, FeedbackRecord]], seed: int) -> dict[str, Any]:
    return agreement_of(np.array([s for s, _ in pairs], dtype=float), [r.decision for _, r in pairs],
                        [r.rating for _, r in pairs], seed)


def report(records: Iterable[FeedbackRecord], ws: Workspace, seed: int = 0) -> dict[str, Any]:
    """reports/optimize.json's `agreement`: per model version with reviews, and pooled."""
    by_version = scored_reviews(records, ws)
    pooled = [p for pairs in by_version.values() for p in pairs]
    return {
        "score": "the curation score (scores.parquet `score`) of each reviewed image",
        "interval": INTERVAL,
        "versions": {v: _of_pairs(by_version[v], seed) for v in sorted(by_version)},
        "pooled": _of_pairs(pooled, seed) if pooled else None,
    }


def version_auc(by_version: dict[str, list[tuple[float, FeedbackRecord]]], version: str) -> float | None:
    """The AUC of one version's curation score against its reviewers' decisions (no interval);
    None without both an accepted and a rejected scored image."""
    decided = [(s, r.decision == "accept") for s, r in by_version.get(str(version), []) if r.decision is not None]
    if len({a for _, a in decided}) < 2:
        return None
    return float(auc_rows(np.array([[s for s, _ in decided]]), np.array([[a for _, a in decided]], dtype=int))[0])

__all__ = ["INTERVAL", "agreement_of", "auc_rows", "spearman_rows", "report", "scored_reviews", "version_auc"]
