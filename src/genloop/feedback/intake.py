"""The `feedback:` collect source: reviewers' decisions on curated images become data.

Every image whose latest decision is `accept` is read from outputs/curated/<version>/<file>,
checked against the sha256 the reviewer saw (a changed file is skipped with the reason) and
offered to collect with its provenance (model, version, seed, rating, reviewer, record).
Accepted generated images are capped at `collect.max_synthetic_fraction` of the corpus (the
ledger rows that are trained on); the excess waits for a later collect, chosen
deterministically: highest rating first, then optimize's score, then image id. Images whose
latest decision is `reject` are recorded in the ledger as negatives (`role` = negative, no
file in data/raw): clean never trains on them. An image accepted earlier and rejected now
turns into a negative; a negative accepted now is collected.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import PurePosixPath
from typing import Any

import pandas as pd

from genloop.core.config import Params, Source
from genloop.core.manifest import FEEDBACK_SOURCE, ROLE_NEGATIVE, ROLE_TRAIN, Item
from genloop.core.storage import sha256_bytes
from genloop.core.workspace import Workspace
from genloop.feedback.store import FeedbackRecord, FeedbackStore, latest

log = logging.getLogger(__name__)

__all__ = ["FEEDBACK_SOURCE", "Candidate", "Intake", "Review", "intake", "iter_accepted", "read_review",
           "synthetic_budget"]

MAX_LISTED = 100  # image ids named per list in reports/collect.json


@dataclass(frozen=True)
class Candidate:
    """An accepted, verified curated image, ready to enter data/raw."""

    image_id: str
    sha256: str
    rating: int | None
    score: float | None
    item: Item

    def priority(self) -> tuple[float, float, str]:
        """Sort key of the cap: highest rating first, then highest score, then image id."""
        return (-(self.rating or 0), -(self.score if self.score is not None else -math.inf), self.image_id)


@dataclass
class Review:
    """What the feedback store says now, per image (its latest decision)."""

    store: str
    accepted: list[Candidate] = field(default_factory=list)  # verified, in cap priority order
    rejected: list[tuple[FeedbackRecord, dict[str, Any]]] = field(default_factory=list)  # record, curated facts
    skipped: list[dict[str, str]] = field(default_factory=list)  # image_id, reason
    n_accepted: int = 0  # latest decision accept (verified or not)
    n_rejected: int = 0

    @property
    def rejected_share(self) -> float | None:
        decided = self.n_accepted + self.n_rejected
        return round(self.n_rejected / decided, 6) if decided else None


def synthetic_budget(real: int, synthetic: int, max_fraction: float) -> int:
    """How many more generated images the corpus can take while synthetic / (real + synthetic)
    stays at most `max_fraction` (exact decimal arithmetic: 0.2 of 400 real allows 100)."""
    if max_fraction >= 1:
        return 2**62
    f = Fraction(repr(float(max_fraction)))
    allowed = math.floor(f * real / (1 - f))
    return max(0, allowed - synthetic)


class _Curated:
    """The curated batches of a workspace, read once per version."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self._scores: dict[str, pd.DataFrame | None] = {}

    def scores(self, version: str) -> pd.DataFrame | None:
        if version not in self._scores:
            path = self.ws.curated / version / "scores.parquet"
            frame = pd.read_parquet(path) if path.exists() else None
            if frame is not None:
                frame = frame.assign(_stem=[PurePosixPath(f).stem for f in frame["file"]])
            self._scores[version] = frame
        return self._scores[version]

    def locate(self, rec: FeedbackRecord) -> tuple[str, dict[str, Any]]:
        """The curated file name of a record's image and what scores.parquet says about it."""
        prefix = f"v{rec.model_version}-"
        stem = rec.image_id[len(prefix):] if rec.image_id.startswith(prefix) else rec.image_id
        facts: dict[str, Any] = {}
        scores = self.scores(rec.model_version)
        if scores is not None:
            match = scores[scores["_stem"] == stem]
            if len(match):
                row = match.iloc[0]
                facts = {k: _plain(row[k]) for k in ("label", "score", "seed") if k in row.index}
                return str(row["file"]), facts
        folder = self.ws.curated / rec.model_version
        found = sorted(p.name for p in folder.glob(f"{stem}.*")) if folder.is_dir() else []
        return (found[0] if found else f"{stem}.png"), facts


def _plain(value: Any) -> Any:
    """A parquet cell as a JSON-able value (None for a missing one)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _provenance(rec: FeedbackRecord, facts: dict[str, Any], file: str) -> dict[str, Any]:
    return {
        "image_id": rec.image_id,
        "model_name": rec.model_name,
        "model_version": rec.model_version,
        "seed": rec.seed if rec.seed is not None else facts.get("seed"),
        "rating": rec.rating,
        "decision": rec.decision,
        "reviewer": rec.reviewer,
        "record_id": rec.record_id,
        "reviewed_at": rec.time.isoformat(),
        "score": facts.get("score"),
        "curated_file": f"outputs/curated/{rec.model_version}/{file}",
    }


def read_review(cfg: Params, ws: Workspace) -> Review:
    """Every image's latest decision; accepted images read from outputs/curated and verified."""
    store = FeedbackStore.open(cfg.feedback.store, ws)
    review = Review(store=store.location)
    curated = _Curated(ws)
    for rec in sorted(latest(store.records()).values(), key=lambda r: r.image_id):
        if rec.decision is None:
            continue  # rated but not decided: neither data nor a negative
        file, facts = curated.locate(rec)
        if rec.decision == "reject":
            review.n_rejected += 1
            review.rejected.append((rec, {**facts, "file": file}))
            continue
        review.n_accepted += 1
        path = ws.curated / rec.model_version / file
        if not path.is_file():
            review.skipped.append({"image_id": rec.image_id, "reason": (
                f"outputs/curated/{rec.model_version}/{file} is not in this workspace")})
            continue
        data = path.read_bytes()
        if sha256_bytes(data) != rec.sha256:
            review.skipped.append({"image_id": rec.image_id, "reason": (
                f"sha256 mismatch: outputs/curated/{rec.model_version}/{file} is not the image the reviewer "
                f"saw (record {rec.record_id}: {rec.sha256[:12]}, file: {sha256_bytes(data)[:12]})")})
            continue
        label = facts.get("label")
        item = Item(original=f"outputs/curated/{rec.model_version}/{file}", data=data,
                    label=None if label is None else str(label), provenance=_provenance(rec, facts, file))
        score = facts.get("score")
        review.accepted.append(Candidate(rec.image_id, rec.sha256, rec.rating,
                                         None if score is None else float(score), item))
    review.accepted.sort(key=Candidate.priority)
    for skip in review.skipped:
        log.warning("feedback: skipping %s: %s", skip["image_id"], skip["reason"])
    return review


def iter_accepted(cfg: Params, ws: Workspace) -> Iterator[Item]:
    """The accepted, verified curated images in cap priority order (no cap applied here)."""
    FeedbackStore.open(cfg.feedback.store, ws)  # a bad store location fails now, before any work

    def items() -> Iterator[Item]:
        for cand in read_review(cfg, ws).accepted:
            yield cand.item

    return items()


@dataclass
class Intake:
    """What the feedback source changes in one collect."""

    ledger: pd.DataFrame  # the ledger with role changes and the new negatives
    new: list[tuple[dict[str, object], bytes]]  # ledger rows (and bytes) of the accepted images added
    counts: dict[str, int]  # offered/added, like every source
    report: dict[str, Any]  # the `feedback` section of reports/collect.json

    @property
    def changed(self) -> bool:
        return bool(self.new or self.report["negatives_recorded"] or self.report["retracted"]
                    or self.report["reinstated"])


def _row(sha: str, file: object, original: str, label: object, provenance: dict[str, Any], role: str,
         now: str) -> dict[str, object]:
    return {"sha256": sha, "file": file, "source": FEEDBACK_SOURCE, "original": original, "label": label,
            "collected_at": now, "provenance": json.dumps(provenance, sort_keys=True, default=str), "role": role}


@dataclass
class _Rejections:
    """What the rejected images change: new negative rows, images retracted from training, bytes rejected."""

    negatives: list[dict[str, object]] = field(default_factory=list)  # ledger rows of new negatives
    retracted: list[str] = field(default_factory=list)  # image ids turned from training rows into negatives
    rejected_sha: dict[str, str] = field(default_factory=dict)  # sha256 -> image id


@dataclass
class _Selection:
    """The accepted images chosen under the cap, and what became of the others."""

    chosen: list[Candidate] = field(default_factory=list)
    capped: list[str] = field(default_factory=list)  # image ids that wait for a later collect
    already: int = 0  # collected before and still trained on
    reinstated: list[str] = field(default_factory=list)  # image ids of negatives accepted now
    drop: list[int] = field(default_factory=list)  # ledger index of those negatives' rows


def _index_ledger(ledger: pd.DataFrame, new_rows: list[dict[str, object]]) -> tuple[dict[str, int], set[str]]:
    """The feedback rows' ledger index by sha256, and the sha256s of every other source (this collect's too)."""
    is_fb = ledger["source"] == FEEDBACK_SOURCE
    fb_index = {sha: i for i, sha in zip(ledger.index[is_fb], ledger.loc[is_fb, "sha256"], strict=True)}
    other = set(ledger.loc[~is_fb, "sha256"].dropna()) | {str(r["sha256"]) for r in new_rows}
    return fb_index, other


def _record_rejections(review: Review, ledger: pd.DataFrame, fb_index: dict[str, int], other: set[str],
                       skipped: list[dict[str, str]], now: str) -> _Rejections:
    """Rejected images become negatives; one accepted before leaves the training corpus (`ledger` in place)."""
    out = _Rejections()
    for rec, facts in review.rejected:
        out.rejected_sha[rec.sha256] = rec.image_id
        i = fb_index.get(rec.sha256)
        if i is not None:
            if ledger.at[i, "role"] != ROLE_NEGATIVE:
                ledger.at[i, "role"] = ROLE_NEGATIVE
                out.retracted.append(rec.image_id)
            continue
        if rec.sha256 in other:
            skipped.append({"image_id": rec.image_id, "reason": "rejected, but the same bytes were collected from "
                            "a real source: left in the corpus"})
            continue
        if any(r["sha256"] == rec.sha256 for r in out.negatives):
            continue
        label = facts.get("label")
        original = f"outputs/curated/{rec.model_version}/{facts['file']}"
        out.negatives.append(_row(rec.sha256, pd.NA, original, None if label is None else str(label),
                                  _provenance(rec, facts, str(facts["file"])), ROLE_NEGATIVE, now))
    return out


def _corpus_counts(ledger: pd.DataFrame, new_rows: list[dict[str, object]]) -> tuple[int, int]:
    """(real, synthetic): the trained-on rows of the other sources (this collect's included) and of feedback."""
    train = ledger["role"] != ROLE_NEGATIVE
    real = int((train & (ledger["source"] != FEEDBACK_SOURCE)).sum()) + len(new_rows)
    synthetic = int((train & (ledger["source"] == FEEDBACK_SOURCE)).sum())
    return real, synthetic


def _select_accepted(offered: list[Candidate], ledger: pd.DataFrame, fb_index: dict[str, int], other: set[str],
                     rejected_sha: dict[str, str], budget: int, skipped: list[dict[str, str]]) -> _Selection:
    """The accepted images to add, in priority order, up to `budget`; duplicates and rejected bytes skipped."""
    out = _Selection()
    seen: set[str] = set()
    for cand in offered:
        i = fb_index.get(cand.sha256)
        if i is not None and ledger.at[i, "role"] != ROLE_NEGATIVE:
            out.already += 1
            continue
        if cand.sha256 in rejected_sha:
            skipped.append({"image_id": cand.image_id,
                            "reason": f"the same image is rejected as {rejected_sha[cand.sha256]}"})
            continue
        if cand.sha256 in other or cand.sha256 in seen:
            skipped.append({"image_id": cand.image_id, "reason": "the same bytes are in the corpus already"})
            continue
        seen.add(cand.sha256)
        if len(out.chosen) >= budget:
            out.capped.append(cand.image_id)
            continue
        out.chosen.append(cand)
        if i is not None:  # a negative accepted now: its row gives way to a training row with a file
            out.drop.append(i)
            out.reinstated.append(cand.image_id)
    return out


def _updated_ledger(ledger: pd.DataFrame, drop: list[int], negatives: list[dict[str, object]]) -> pd.DataFrame:
    """The ledger without the reinstated negatives' rows, with the new negatives, renumbered."""
    if drop:
        ledger = ledger.drop(index=drop)
    if negatives:
        ledger = pd.concat([ledger, pd.DataFrame(negatives)], ignore_index=True)
    return ledger.reset_index(drop=True)


def _training_rows(chosen: list[Candidate], now: str) -> list[tuple[dict[str, object], bytes]]:
    """The ledger rows (file named by sha256) and bytes of the chosen accepted images."""
    new: list[tuple[dict[str, object], bytes]] = []
    for cand in chosen:
        suffix = PurePosixPath(cand.item.original).suffix.lower() or ".png"
        row = _row(cand.sha256, f"{cand.sha256[:2]}/{cand.sha256}{suffix}", cand.item.original,
                   cand.item.label, cand.item.provenance, ROLE_TRAIN, now)
        new.append((row, cand.item.data))
    return new


def _intake_report(cfg: Params, review: Review, ledger: pd.DataFrame, rejections: _Rejections,
                   selection: _Selection, skipped: list[dict[str, str]], real: int, synthetic: int,
                   budget: int) -> dict[str, Any]:
    """The `feedback` section of reports/collect.json."""
    synthetic_after = synthetic + len(selection.chosen)
    corpus = real + synthetic_after
    return {
        "store": review.store,
        "reviewed": review.n_accepted + review.n_rejected,
        "accepted": review.n_accepted,
        "rejected": review.n_rejected,
        "rejected_share_of_reviewed": review.rejected_share,
        "accepted_added": len(selection.chosen),
        "already_collected": selection.already,
        "capped": len(selection.capped),
        "capped_images": selection.capped[:MAX_LISTED],
        "max_synthetic_fraction": cfg.collect.max_synthetic_fraction,
        "synthetic_budget": min(budget, 2**31),
        "synthetic_in_corpus": synthetic_after,
        "corpus": corpus,
        "synthetic_share": round(synthetic_after / corpus, 6) if corpus else 0.0,
        "negatives_recorded": len(rejections.negatives),
        "negatives_total": int((ledger["role"] == ROLE_NEGATIVE).sum()),
        "retracted": len(rejections.retracted),
        "retracted_images": rejections.retracted[:MAX_LISTED],
        "reinstated": len(selection.reinstated),
        "skipped": skipped[:MAX_LISTED],
        "skipped_count": len(skipped),
    }


def intake(cfg: Params, ws: Workspace, source: Source, ledger: pd.DataFrame,
           new_rows: list[dict[str, object]], now: str) -> Intake:
    """Apply the reviewers' latest decisions to the ledger: negatives, role changes, and the
    accepted images that fit under the cap. `new_rows` are this collect's rows from the other
    sources (all real, all trained on)."""
    review = read_review(cfg, ws)
    ledger = ledger.copy()
    fb_index, other = _index_ledger(ledger, new_rows)
    skipped = list(review.skipped)
    rejections = _record_rejections(review, ledger, fb_index, other, skipped, now)
    real, synthetic = _corpus_counts(ledger, new_rows)
    budget = synthetic_budget(real, synthetic, cfg.collect.max_synthetic_fraction)
    offered = review.accepted[: source.limit] if source.limit else review.accepted
    selection = _select_accepted(offered, ledger, fb_index, other, rejections.rejected_sha, budget, skipped)
    ledger = _updated_ledger(ledger, selection.drop, rejections.negatives)
    new = _training_rows(selection.chosen, now)
    report = _intake_report(cfg, review, ledger, rejections, selection, skipped, real, synthetic, budget)
    if selection.capped:
        log.info("feedback: %d accepted images wait for a later collect: the synthetic share is capped at %.0f%% "
                 "(collect.max_synthetic_fraction)", len(selection.capped), 100 * cfg.collect.max_synthetic_fraction)
    log.info("feedback: %d accepted images added, %d negatives recorded, synthetic share %.1f%%",
             len(selection.chosen), len(rejections.negatives), 100 * report["synthetic_share"])
    return Intake(ledger=ledger, new=new, counts={"offered": len(offered), "added": len(selection.chosen)},
                  report=report)
