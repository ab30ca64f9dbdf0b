"""A pytest plugin for tests/unit/test_markers.py: `-p tests.collection_report` writes, to the file
named by GENLOOP_COLLECTION_REPORT, every collected test that `-m`/`-k` selected and every one they
deselected, each with its fixture closure and its markers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

_deselected: list[pytest.Item] = []


def _describe(items: list[pytest.Item]) -> dict[str, dict[str, list[str]]]:
    return {item.nodeid: {"fixtures": sorted(getattr(item, "fixturenames", ())),
                          "markers": sorted({m.name for m in item.iter_markers()})} for item in items}


def pytest_deselected(items: list[pytest.Item]) -> None:
    _deselected.extend(items)


def pytest_collection_finish(session: pytest.Session) -> None:
    if out := os.environ.get("GENLOOP_COLLECTION_REPORT"):
        Path(out).write_text(json.dumps({"selected": _describe(session.items), "deselected": _describe(_deselected)},
                                        indent=1))
