"""Feedback from elsewhere: JSONL records or a Label Studio export, checked against the curated batches.

Every imported record must name a curated image (`v<model version>-<file stem>`, e.g. v3-000042)
whose file is in outputs/curated/<version>/; model name, version, seed and sha256 come from that
batch's scores.parquet and file. The whole file is validated first: one bad record and nothing
is imported (`ImportRejected` lists every problem with its line or task). Records are then
appended to the feedback store; a record already there (same record_id) is skipped, so
importing the same file twice adds nothing the second time.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlparse

from genloop.core.errors import StageInputMissing
from genloop.core.workspace import Workspace
from genloop.feedback.curated_batch import BatchIndex, CuratedBatch
from genloop.feedback.store import (
    FeedbackError,
    FeedbackRecord,
    FeedbackStore,
    parse_record,
)

log = logging.getLogger(__name__)

Format = Literal["auto", "jsonl", "label-studio"]
# Label Studio prefixes uploaded file names with 8 hex digits: /data/upload/1/8a3f2b1c-v3-000042.png
_LS_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
_LS_NAMESPACE = uuid.UUID("6f1c3a52-3d8e-4c3e-9a47-1e0b1b7d2c55")
_JSONL_NAMESPACE = uuid.UUID("0b6f4f8e-8d43-4f0f-9a3b-5a1f3c7e2d11")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
_DECISIONS = {"accept": "accept", "accepted": "accept", "reject": "reject", "rejected": "reject"}


# ---------------------------------------------------------------------------------------------
# import


class ImportRejected(FeedbackError):
    """Some records of an import file are invalid; nothing was imported."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} invalid record(s), nothing imported:\n"
                         + "\n".join(f"  {p}" for p in problems))


@dataclass(frozen=True)
class ImportResult:
    """What an import did."""

    imported: int
    already_present: int
    skipped: int  # tasks/annotations with no decision or rating, cancelled annotations, repeated records
    format: str
    store: str


def detect_format(path: Path) -> Literal["jsonl", "label-studio"]:
    """jsonl for .jsonl/.ndjson or a file of objects; label-studio for a JSON array."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return "label-studio" if head.startswith(b"[") else "jsonl"


def _complete(obj: dict[str, Any], index: BatchIndex, where: str, reviewer: str | None,
              source: str) -> FeedbackRecord:
    """Fill model name/version/seed/sha256 from the curated batch and check the given ones agree."""
    image_id = obj.get("image_id")
    if not isinstance(image_id, str):
        raise FeedbackError(f"{where}: image_id: a string is required (e.g. v3-000042)")
    try:
        batch, image = index.resolve(image_id)
    except ValueError as exc:
        raise FeedbackError(f"{where}: {exc}") from None
    known = {"model_name": image.model_name, "model_version": image.model_version,
             "sha256": batch.sha256(image)}
    mismatched = [f"{k} is {obj[k]!r}, the curated image's is {v!r}" for k, v in known.items()
                  if obj.get(k) is not None and str(obj[k]) != v]
    if mismatched:
        raise FeedbackError(f"{where}: {image_id}: " + "; ".join(mismatched))
    filled = {**{k: v for k, v in obj.items() if v is not None}, **known, "source": source}
    if obj.get("seed") is None:
        filled["seed"] = image.seed
    if filled.get("reviewer") is None and reviewer:
        filled["reviewer"] = reviewer
    return parse_record(filled, where)


def _jsonl_records(path: Path, index: BatchIndex, reviewer: str | None,
                   problems: list[str]) -> Iterator[FeedbackRecord]:
    now = datetime.now(UTC).isoformat()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
                continue
            if obj.get("record_id") is None:
                # the same line always becomes the same record: importing a file twice adds nothing
                canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
                obj["record_id"] = uuid.uuid5(_JSONL_NAMESPACE, f"{canonical}|{reviewer}").hex
            if obj.get("time") is None:
                obj["time"] = now
            try:
                yield _complete(obj, index, where, reviewer, "import")
            except FeedbackError as exc:
                problems.append(str(exc))


def _ls_image_id(data: Any) -> str:
    if not isinstance(data, dict):
        raise ValueError("task has no 'data' object")
    if data.get("image_id") is not None:
        return str(data["image_id"])
    candidates = [data["image"]] if isinstance(data.get("image"), str) else []
    candidates += [v for k, v in data.items() if k != "image" and isinstance(v, str)
                   and PurePosixPath(urlparse(v).path).suffix.lower() in _IMAGE_SUFFIXES]
    if not candidates:
        raise ValueError("task data has neither 'image_id' nor an image URL ('image')")
    url = urlparse(candidates[0])
    path = unquote(url.path)
    local = parse_qs(url.query).get("d")  # Label Studio's local files: /data/local-files/?d=dir/file.png
    if local and not PurePosixPath(path).suffix:
        path = local[0]
    return PurePosixPath(path).stem


def _ls_reviewer(completed_by: Any) -> str | None:
    if isinstance(completed_by, dict):
        for key in ("email", "username", "first_name", "id"):
            if completed_by.get(key) not in (None, ""):
                return str(completed_by[key])
        return None
    if isinstance(completed_by, bool) or completed_by is None or completed_by == "":
        return None
    if isinstance(completed_by, int):
        return f"label-studio-user-{completed_by}"
    return str(completed_by)


def _ls_values(results: Any) -> tuple[str | None, int | None]:
    """The decision and rating of one annotation's results; ValueError on anything unusable."""
    if not isinstance(results, list):
        raise ValueError("annotation 'result' must be a list")
    decision = rating = None
    for r in results:
        if not isinstance(r, dict):
            raise ValueError("each annotation result must be an object")
        kind, value = r.get("type"), r.get("value") or {}
        if kind == "choices":
            choices = value.get("choices") if isinstance(value, dict) else None
            if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], str):
                raise ValueError(f"choices must be exactly one of Accept/Reject, got {choices!r}")
            d = _DECISIONS.get(choices[0].strip().lower())
            if d is None:
                raise ValueError(f"choice {choices[0]!r} is neither Accept nor Reject")
            decision = d
        elif kind == "rating":
            raw = value.get("rating") if isinstance(value, dict) else None
            if isinstance(raw, bool) or not isinstance(raw, int | float) or raw != int(raw) or not 1 <= raw <= 5:
                raise ValueError(f"rating must be a whole number 1-5, got {raw!r}")
            rating = int(raw)
    return decision, rating


def _ls_records(path: Path, index: BatchIndex, reviewer: str | None, problems: list[str],
                skipped: list[int]) -> Iterator[FeedbackRecord]:
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        problems.append(f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")
        return
    if not isinstance(tasks, list):
        problems.append(f"a Label Studio export is a JSON list of tasks, got {type(tasks).__name__}")
        return
    for t, task in enumerate(tasks):
        task_where = f"task {t}" + (f" (id {task.get('id')})" if isinstance(task, dict) and "id" in task else "")
        if not isinstance(task, dict):
            problems.append(f"{task_where}: a task must be a JSON object")
            continue
        annotations = task.get("annotations") or []
        if not isinstance(annotations, list):
            problems.append(f"{task_where}: 'annotations' must be a list")
            continue
        try:
            image_id = _ls_image_id(task.get("data"))
        except ValueError as exc:
            problems.append(f"{task_where}: {exc}")
            continue
        if _LS_UPLOAD_PREFIX.match(image_id) and not _resolves(index, image_id):
            image_id = _LS_UPLOAD_PREFIX.sub("", image_id, count=1)
        if not annotations:
            skipped[0] += 1
            continue
        for a, ann in enumerate(annotations):
            where = f"{task_where}, annotation {a}" + (
                f" (id {ann.get('id')})" if isinstance(ann, dict) and "id" in ann else "")
            if not isinstance(ann, dict):
                problems.append(f"{where}: an annotation must be a JSON object")
                continue
            if ann.get("was_cancelled"):
                skipped[0] += 1
                continue
            try:
                decision, rating = _ls_values(ann.get("result"))
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
                continue
            if decision is None and rating is None:
                skipped[0] += 1
                continue
            obj: dict[str, Any] = {"image_id": image_id, "decision": decision, "rating": rating,
                                   "reviewer": _ls_reviewer(ann.get("completed_by"))}
            stamp = ann.get("updated_at") or ann.get("created_at")
            if stamp is not None:
                obj["time"] = stamp
            # the same annotation always becomes the same record: importing an export twice adds nothing
            key = f"label-studio:{task.get('id', t)}:{ann.get('id', a)}:{stamp}:{image_id}"
            obj["record_id"] = uuid.uuid5(_LS_NAMESPACE, key).hex
            try:
                yield _complete(obj, index, where, reviewer, "label-studio")
            except FeedbackError as exc:
                problems.append(str(exc))


def _resolves(index: BatchIndex, image_id: str) -> bool:
    try:
        index.resolve(image_id)
    except ValueError:
        return False
    return True


def read_records(path: Path, ws: Workspace, fmt: Format = "auto", reviewer: str | None = None,
                 default_model_name: str = "unknown") -> tuple[list[FeedbackRecord], int, str]:
    """Every record of the file, validated; ImportRejected listing each bad one.

    Returns (records, skipped, format); `skipped` counts Label Studio tasks/annotations without a
    decision or rating, cancelled annotations, and repeats of the same record.
    """
    path = Path(path)
    if not path.is_file():
        raise FeedbackError(f"{path} not found")
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind not in ("jsonl", "label-studio"):
        raise FeedbackError(f"unknown format {fmt!r}: use auto, jsonl or label-studio")
    index = BatchIndex(ws, default_model_name)
    problems: list[str] = []
    skipped = [0]
    if kind == "jsonl":
        records = list(_jsonl_records(path, index, reviewer, problems))
    else:
        records = list(_ls_records(path, index, reviewer, problems, skipped))
    unique: dict[str, FeedbackRecord] = {}
    for r in records:
        first = unique.setdefault(r.record_id, r)
        if first is not r and first.model_dump(exclude={"time"}) != r.model_dump(exclude={"time"}):
            problems.append(f"record_id {r.record_id} is given to two different records")
    if problems:
        raise ImportRejected(str(path), problems)
    skipped[0] += len(records) - len(unique)  # the same record twice: imported once
    records = list(unique.values())
    return records, skipped[0], kind


def import_file(path: Path, ws: Workspace, store: FeedbackStore, fmt: Format = "auto",
                reviewer: str | None = None, default_model_name: str = "unknown") -> ImportResult:
    """Validate every record of `path`, then append them all to `store` (or none, on any problem)."""
    records, skipped, kind = read_records(path, ws, fmt, reviewer, default_model_name)
    existing = {r.record_id for r in store.records()} if records else set()
    new = [r for r in records if r.record_id not in existing]
    store.extend(new)
    log.info("imported %d feedback record(s) from %s into %s (%d already there, %d skipped)",
             len(new), path, store.location, len(records) - len(new), skipped)
    return ImportResult(imported=len(new), already_present=len(records) - len(new), skipped=skipped,
                        format=kind, store=store.location)


# ---------------------------------------------------------------------------------------------
# stats


def stats(records: list[FeedbackRecord], ws: Workspace | None = None) -> list[dict[str, Any]]:
    """Per model version: images reviewed, accepted, rejected, acceptance rate, ratings, reviewers."""
    from genloop.feedback.store import latest

    state = latest(records)
    versions = sorted({r.model_version for r in records},
                      key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
    rows = []
    for v in versions:
        mine = [r for r in records if r.model_version == v]
        current = [s for s in state.values() if s.model_version == v]
        accepted = sum(s.decision == "accept" for s in current)
        rejected = sum(s.decision == "reject" for s in current)
        ratings = [s.rating for s in current if s.rating is not None]
        batch_size = None
        if ws is not None and (ws.curated / v / "scores.parquet").is_file():
            try:
                batch_size = len(CuratedBatch.load(ws, v))
            except (FeedbackError, StageInputMissing, OSError):
                batch_size = None
        rows.append({
            "model_version": v,
            "model_name": ", ".join(sorted({r.model_name for r in mine})),
            "records": len(mine),
            "images_reviewed": len(current),
            "curated_images": batch_size,
            "accepted": accepted,
            "rejected": rejected,
            "acceptance_rate": round(accepted / (accepted + rejected), 4) if accepted + rejected else None,
            "rated": len(ratings),
            "mean_rating": round(sum(ratings) / len(ratings), 3) if ratings else None,
            "reviewers": sorted({r.reviewer for r in mine}),
            "last_record": max(r.time for r in mine).isoformat(),
        })
    return rows

