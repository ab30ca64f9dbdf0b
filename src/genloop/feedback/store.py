"""The feedback store: reviewers' decisions on curated images, one immutable record per action.

A record says who judged which image (id + sha256), made by which model version and seed,
and how (accept/reject, a 1-5 rating, or both). Records are appended, never rewritten: each
is its own JSON object, created exclusively under `<store>/records/<day>/`, so any number of
reviewers and importers can write at once without a lock and without losing a record. The
store is a local folder (`feedback.store`, relative to the workspace) or an s3://bucket/prefix.
The current state of an image is its latest record (`latest`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from genloop.core.errors import GenloopError
from genloop.core.storage import describe_s3_failure, join_s3_uri, parse_s3_uri, s3_client, transient_s3
from genloop.core.workspace import Workspace

log = logging.getLogger(__name__)

IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
Decision = Literal["accept", "reject"]


class FeedbackError(GenloopError):
    """The feedback store cannot be read or written, or a record is invalid."""


def check_image_id(value: str) -> str:
    """An image id is one safe path segment: letters, digits, `_.-`, no `..`, at most 128 chars."""
    if not isinstance(value, str) or not IMAGE_ID.fullmatch(value) or ".." in value:
        raise ValueError(
            f"image id {value!r} is not allowed: use letters, digits, '_', '.', '-' "
            "(starting with a letter or digit, no '..', at most 128 characters)"
        )
    return value


def curated_image_id(model_version: str, file: str) -> str:
    """The id of a curated image: `v<model version>-<file stem>` (e.g. v3-000042)."""
    return check_image_id(f"v{model_version}-{PurePosixPath(file).stem}")


class FeedbackRecord(BaseModel):
    """One reviewer action on one image."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_id: str = Field(description="the curated image's id, e.g. v3-000042")
    sha256: str = Field(description="sha256 of the image file the reviewer saw")
    model_name: str = Field(min_length=1, max_length=200)
    model_version: str = Field(min_length=1, max_length=32, pattern=r"^[0-9A-Za-z_.-]+$")
    seed: int | None = Field(None, description="the generation seed of the image's batch")
    decision: Decision | None = None
    rating: int | None = Field(None, ge=1, le=5)
    reviewer: str = Field(min_length=1, max_length=100)
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    source: str = Field("review", max_length=50, description="review | import | label-studio")
    record_id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=r"^[0-9a-f]{32}$")

    @field_validator("image_id")
    @classmethod
    def _image_id(cls, v: str) -> str:
        return check_image_id(v)

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not SHA256.fullmatch(v):
            raise ValueError("must be 64 lower-case hex digits (the image file's sha256)")
        return v

    @field_validator("time")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)

    @model_validator(mode="after")
    def _says_something(self) -> FeedbackRecord:
        if self.decision is None and self.rating is None:
            raise ValueError("a record needs a decision (accept/reject), a rating (1-5), or both")
        return self

    def object_name(self) -> str:
        """records/<day>/<time>-<record id>.json: unique, and sorted by time."""
        stamp = self.time.strftime("%Y%m%dT%H%M%S%fZ")
        return f"records/{self.time:%Y-%m-%d}/{stamp}-{self.record_id}.json"


def parse_record(obj: Any, where: str) -> FeedbackRecord:
    """A validated record, or FeedbackError naming `where` (file:line) and every bad field."""
    if not isinstance(obj, dict):
        raise FeedbackError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    try:
        return FeedbackRecord.model_validate(obj)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in exc.errors()
        )
        raise FeedbackError(f"{where}: invalid feedback record: {problems}") from None


@dataclass(frozen=True)
class FeedbackStore:
    """A local folder or an S3 prefix of immutable feedback records."""

    location: str  # absolute folder path, or s3://bucket/prefix

    @classmethod
    def open(cls, store: str, ws: Workspace) -> FeedbackStore:
        """`feedback.store` resolved against the workspace."""
        if store.startswith("s3://"):
            parse_s3_uri(store)
            return cls(store.rstrip("/"))
        path = Path(store).expanduser()
        return cls(str(path if path.is_absolute() else ws.root / path))

    @property
    def is_s3(self) -> bool:
        return self.location.startswith("s3://")

    def append(self, record: FeedbackRecord) -> str:
        """Write one record; never overwrites. Returns where it went."""
        body = (record.model_dump_json() + "\n").encode()
        name = record.object_name()
        if self.is_s3:
            uri = join_s3_uri(self.location, name)
            bucket, key = parse_s3_uri(uri)
            try:
                s3_client().put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json",
                                       IfNoneMatch="*")
            except Exception as exc:
                if "PreconditionFailed" in str(exc):
                    raise FeedbackError(f"feedback record {uri} already exists; records are never rewritten") from exc
                hint = " (a transient failure: retry)" if transient_s3(exc) else ""
                raise FeedbackError(describe_s3_failure(uri, exc, "write") + hint) from exc
            return uri
        path = Path(self.location) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "xb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)  # fails if the name exists: a record is never replaced
        except FileExistsError as exc:
            raise FeedbackError(f"feedback record {path} already exists; records are never rewritten") from exc
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise FeedbackError(f"cannot write feedback record {path}: disk full") from exc
            raise FeedbackError(f"cannot write feedback record {path}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return str(path)

    def extend(self, records: Iterable[FeedbackRecord]) -> int:
        """Append many records; returns how many."""
        n = 0
        for record in records:
            self.append(record)
            n += 1
        return n

    def _raw_objects(self) -> list[tuple[str, bytes]]:
        if self.is_s3:
            bucket, prefix = parse_s3_uri(join_s3_uri(self.location, "records") + "/")
            client = s3_client()
            try:
                pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                keys = [o["Key"] for p in pages for o in p.get("Contents", []) if o["Key"].endswith(".json")]
                return [(f"s3://{bucket}/{k}", client.get_object(Bucket=bucket, Key=k)["Body"].read())
                        for k in sorted(keys)]
            except Exception as exc:
                raise FeedbackError(describe_s3_failure(self.location, exc)) from exc
        root = Path(self.location) / "records"
        if not root.is_dir():
            return []
        return [(str(p), p.read_bytes()) for p in sorted(root.glob("*/*.json")) if not p.name.startswith(".")]

    def records(self) -> list[FeedbackRecord]:
        """Every record, oldest first. A damaged record is skipped with a warning, never dropped."""
        out = []
        for where, data in self._raw_objects():
            try:
                out.append(parse_record(json.loads(data), where))
            except (FeedbackError, ValueError) as exc:
                log.warning("skipping unreadable feedback record %s: %s", where, exc)
        return sorted(out, key=lambda r: (r.time, r.record_id))

    def frame(self) -> pd.DataFrame:
        """Every record as a table (one row per action)."""
        rows = [r.model_dump(mode="json") for r in self.records()]
        return pd.DataFrame(rows, columns=list(FeedbackRecord.model_fields))


def latest(records: Iterable[FeedbackRecord]) -> dict[str, FeedbackRecord]:
    """Each image's current state: its latest decision and latest rating, folded into one record."""
    state: dict[str, FeedbackRecord] = {}
    for r in sorted(records, key=lambda r: (r.time, r.record_id)):
        prev = state.get(r.image_id)
        if prev is None:
            state[r.image_id] = r
            continue
        update: dict[str, Any] = {k: v for k, v in r.model_dump().items() if k not in ("decision", "rating")}
        update["decision"] = r.decision if r.decision is not None else prev.decision
        update["rating"] = r.rating if r.rating is not None else prev.rating
        state[r.image_id] = FeedbackRecord.model_construct(**update)
    return state


def acceptance_rate(records: Iterable[FeedbackRecord], model_version: str | None = None) -> float | None:
    """Share of decided images that were accepted (latest decision per image); None if none decided."""
    decided = [r for r in latest(records).values() if r.decision is not None
               and (model_version is None or r.model_version == str(model_version))]
    return sum(r.decision == "accept" for r in decided) / len(decided) if decided else None
