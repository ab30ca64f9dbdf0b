"""The validate stage: a Great Expectations gate on data/manifest.parquet."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from genloop.core.config import Params, load_params
from genloop.core.errors import StageInputMissing, ValidationFailed
from genloop.core.manifest import MANIFEST_COLUMNS, write_table
from genloop.core.workspace import Workspace
from genloop.stages import validate

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

OVERRIDES = [
    "validate.min_rows=5",
    "validate.max_rows=1000",
    "validate.max_class_ratio=2.0",
    "data.resolution=32",
    "data.mode=L",
]


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_manifest(n: int = 12, labels: list[str] | None = None) -> pd.DataFrame:
    """A valid manifest of `n` rows; `labels` cycles over the rows when given."""
    raw = [_h(f"raw{i}") for i in range(n)]
    return pd.DataFrame(
        {
            "id": [r[:16] for r in raw],
            "shard": [f"shard{i // 5}.npy" for i in range(n)],
            "offset": [i % 5 for i in range(n)],
            "sha256": [_h(f"png{i}") for i in range(n)],
            "raw_sha256": raw,
            "pixel_hash": [_h(f"px{i}") for i in range(n)],
            "phash": [f"{i:016x}" for i in range(n)],
            "width": [32] * n,
            "height": [32] * n,
            "mode": ["L"] * n,
            "source": ["builtin:mnist"] * n,
            "label": [labels[i % len(labels)] for i in range(n)] if labels else [None] * n,
            "split": ["holdout" if i % 5 == 0 else "train" for i in range(n)],
        }
    )


def workspace_with(tmp: Path, df: pd.DataFrame) -> Workspace:
    ws = Workspace.at(tmp)
    write_table(df, ws.manifest, MANIFEST_COLUMNS)
    return ws


@pytest.fixture(scope="module")
def cfg() -> Params:
    return load_params(None, OVERRIDES)


def failing(cfg: Params, ws: Workspace) -> tuple[str, dict]:
    """Run validate expecting failure; return the error message and the written report."""
    with pytest.raises(ValidationFailed) as info:
        validate.run(cfg, ws)
    report = json.loads(ws.report("validation").read_text())
    assert report["success"] is False
    return str(info.value), report


def failed_rows(report: dict) -> list[dict]:
    return [r for r in report["results"] if not r["success"]]


@pytest.fixture(scope="module")
def passed(tmp_path_factory: pytest.TempPathFactory, cfg: Params) -> tuple[Workspace, list[dict]]:
    """A labelled valid manifest validated twice in the same workspace (idempotency)."""
    ws = workspace_with(tmp_path_factory.mktemp("ok"), make_manifest(12, ["0", "1", "2"]))
    summaries = [validate.run(cfg, ws), validate.run(cfg, ws)]
    return ws, summaries


def test_valid_manifest_passes_and_writes_report_and_docs(passed) -> None:
    ws, summaries = passed
    summary = summaries[-1]
    assert summary["success"] is True
    assert summary["rows"] == 12 and summary["failed"] == 0
    report = json.loads(ws.report("validation").read_text())
    assert report["success"] is True
    assert report["evaluated"] == report["successful"] == summary["evaluated"]
    types = {(r["expectation_type"], r["column"]) for r in report["results"]}
    assert ("expect_table_row_count_to_be_between", None) in types
    assert ("expect_column_values_to_be_unique", "sha256") in types
    assert ("expect_column_values_to_not_be_null", "label") in types
    assert ("expect_column_max_to_be_between", validate.CLASS_RATIO_COLUMN) in types
    assert report["class_counts"] == {"0": 4, "1": 4, "2": 4}
    docs = Path(summary["data_docs"])
    assert docs == ws.reports / "data_docs" / "index.html"
    assert docs.is_file() and "genloop_manifest" in docs.read_text()
    assert report["data_docs"] == str(docs)


def test_running_twice_is_idempotent(passed) -> None:
    ws, (first, second) = passed
    assert first == second
    assert (ws.root / "gx" / "great_expectations.yml").is_file()
    # GE's default site in gx/uncommitted is replaced by reports/data_docs
    assert not list((ws.root / "gx").rglob("index.html"))


def test_unlabelled_manifest_skips_label_checks(tmp_path: Path, cfg: Params) -> None:
    ws = workspace_with(tmp_path, make_manifest(6))
    assert validate.run(cfg, ws)["success"] is True
    report = json.loads(ws.report("validation").read_text())
    assert not {r["column"] for r in report["results"]} & {"label", validate.CLASS_RATIO_COLUMN}


def test_duplicate_sha256_fails(tmp_path: Path, cfg: Params) -> None:
    df = make_manifest(8)
    df.loc[3, "sha256"] = df.loc[2, "sha256"]
    message, report = failing(cfg, workspace_with(tmp_path, df))
    assert [(r["expectation_type"], r["column"]) for r in failed_rows(report)] == [
        ("expect_column_values_to_be_unique", "sha256")
    ]
    assert "expect_column_values_to_be_unique(sha256)" in message
    assert df.loc[2, "sha256"] in message
    assert str(Path(tmp_path) / "reports" / "validation.json") in message


def test_wrong_width_and_bad_mode_fail(tmp_path: Path, cfg: Params) -> None:
    df = make_manifest(8)
    df.loc[1, "width"] = 64
    df.loc[4, "mode"] = "RGB"
    message, report = failing(cfg, workspace_with(tmp_path, df))
    failed = {(r["expectation_type"], r["column"]): r for r in failed_rows(report)}
    assert set(failed) == {
        ("expect_column_values_to_be_between", "width"),
        ("expect_column_values_to_be_in_set", "mode"),
    }
    assert failed[("expect_column_values_to_be_between", "width")]["observed_value"][
        "partial_unexpected_list"
    ] == [64]
    assert "expect_column_values_to_be_between(width)" in message
    assert "expect_column_values_to_be_in_set(mode)" in message and "'RGB'" in message


def test_class_imbalance_fails(tmp_path: Path, cfg: Params) -> None:
    # 9 x "a", 3 x "b": ratio 3.0 > max_class_ratio 2.0
    df = make_manifest(12, ["a", "a", "a", "b"])
    message, report = failing(cfg, workspace_with(tmp_path, df))
    [row] = failed_rows(report)
    assert row["expectation_type"] == "expect_column_max_to_be_between"
    assert row["column"] == validate.CLASS_RATIO_COLUMN
    assert row["observed_value"] == pytest.approx(3.0)
    assert report["class_counts"] == {"a": 9, "b": 3}
    assert f"expect_column_max_to_be_between({validate.CLASS_RATIO_COLUMN})" in message


def test_missing_label_and_too_few_rows_fail(tmp_path: Path, cfg: Params) -> None:
    df = make_manifest(4, ["a", "b"])
    df.loc[0, "label"] = None
    _, report = failing(cfg, workspace_with(tmp_path, df))
    failed = {(r["expectation_type"], r["column"]) for r in failed_rows(report)}
    assert failed == {
        ("expect_table_row_count_to_be_between", None),
        ("expect_column_values_to_not_be_null", "label"),
    }


def test_missing_manifest_raises_stage_input_missing(tmp_path: Path, cfg: Params) -> None:
    with pytest.raises(StageInputMissing, match="genloop clean"):
        validate.run(cfg, Workspace.at(tmp_path))
    assert not (tmp_path / "reports").exists()
