"""The feedback store: append-only records on disk and on S3, concurrent writers, validated ids."""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from genloop.core.workspace import Workspace
from genloop.feedback.store import (
    FeedbackError,
    FeedbackRecord,
    FeedbackStore,
    acceptance_rate,
    curated_image_id,
    latest,
    parse_record,
)

SHA = "ab" * 32


def record(image_id: str = "v1-000001", **kw: object) -> FeedbackRecord:
    fields: dict[str, object] = dict(image_id=image_id, sha256=SHA, model_name="m", model_version="1", seed=7,
                                     decision="accept", reviewer="ann")
    fields.update(kw)
    return FeedbackRecord(**fields)


def _write_many(location: str, writer: int, n: int) -> None:
    store = FeedbackStore(location)
    for i in range(n):
        store.append(record(f"v1-{i:06d}", reviewer=f"reviewer-{writer}", rating=1 + i % 5))


def test_concurrent_writer_processes_lose_no_record(tmp_path: Path) -> None:
    store = FeedbackStore.open("feedback", Workspace.at(tmp_path))
    writers, each = 4, 60
    ctx = multiprocessing.get_context("fork")  # no re-import: seconds, not half a minute
    procs = [ctx.Process(target=_write_many, args=(store.location, w, each)) for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    records = store.records()
    assert len(records) == writers * each
    assert len({r.record_id for r in records}) == writers * each
    for w in range(writers):  # every writer's every record, none overwritten by another
        mine = sorted(r.image_id for r in records if r.reviewer == f"reviewer-{w}")
        assert mine == [f"v1-{i:06d}" for i in range(each)]
    assert not list(Path(store.location).rglob(".*.tmp"))


def test_a_record_is_never_rewritten_and_the_latest_action_wins(tmp_path: Path) -> None:
    store = FeedbackStore.open("fb", Workspace.at(tmp_path))
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    first = record(decision="reject", time=t0)
    store.append(first)
    with pytest.raises(FeedbackError, match="never rewritten"):
        store.append(first)
    store.append(record(decision=None, rating=4, time=t0 + timedelta(seconds=1)))
    store.append(record(decision="accept", time=t0 + timedelta(seconds=2)))
    store.append(record("v1-000002", decision="reject", time=t0 + timedelta(seconds=3)))
    records = store.records()
    assert [r.decision for r in records] == ["reject", None, "accept", "reject"]
    state = latest(records)
    assert state["v1-000001"].decision == "accept" and state["v1-000001"].rating == 4
    assert acceptance_rate(records) == 0.5
    assert acceptance_rate(records, "2") is None


def test_a_damaged_record_file_is_skipped_with_a_warning_not_fatal(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    store = FeedbackStore.open("fb", Workspace.at(tmp_path))
    store.append(record())
    bad = Path(store.location) / "records" / "2026-01-01" / "broken.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"image_id": "v1-000001", "decision": "acce')
    assert len(store.records()) == 1
    assert any("broken.json" in r.message for r in caplog.records)


@pytest.mark.parametrize("bad", ["../etc/passwd", "/abs", "a/b", "..", "x..y", "", "a\\b", "v1 000", "é",
                                 "v1-000000\n"])
def test_image_ids_that_could_escape_a_folder_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="image id"):
        record(bad)
    with pytest.raises(FeedbackError, match="line 3: invalid feedback record: image_id"):
        parse_record(record().model_dump(mode="json") | {"image_id": bad}, "import.jsonl line 3")


def test_a_record_must_say_something_and_ratings_are_one_to_five() -> None:
    with pytest.raises(ValueError, match="decision .* rating"):
        record(decision=None)
    with pytest.raises(ValueError, match="rating"):
        record(rating=6)
    with pytest.raises(ValueError, match="sha256"):
        record(sha256="xyz")
    assert curated_image_id("3", "000042.png") == "v3-000042"


def test_an_s3_store_appends_and_reads_back_and_never_overwrites(s3_env: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket="feedback-store")
    store = FeedbackStore.open("s3://feedback-store/team-a/", Workspace.at("/nonexistent"))
    assert store.location == "s3://feedback-store/team-a"
    first = record()
    where = store.append(first)
    assert where.startswith("s3://feedback-store/team-a/records/")
    with pytest.raises(FeedbackError, match="never rewritten"):
        store.append(first)
    store.append(record("v1-000002", decision="reject"))
    assert [r.image_id for r in store.records()] == ["v1-000001", "v1-000002"]
    assert acceptance_rate(store.records()) == 0.5
