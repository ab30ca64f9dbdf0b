"""`pytest -m "not integration"` starts no server: the marking in tests/conftest.py, checked on a
real collection of the whole suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import INTEGRATION_MODULES, SERVER_FIXTURES, TESTS
from tests.helpers import ROOT


def test_not_integration_collects_no_test_that_starts_a_server(tmp_path: Path) -> None:
    report = tmp_path / "collected.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not integration", "-p", "no:cacheprovider",
         "-p", "tests.collection_report", str(TESTS)],
        cwd=ROOT, env={**os.environ, "GENLOOP_COLLECTION_REPORT": str(report)}, capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = json.loads(report.read_text())
    selected, deselected = collected["selected"], collected["deselected"]
    # the report is what --collect-only listed
    assert {line for line in done.stdout.splitlines() if "::" in line} == set(selected)
    assert len(selected) >= 100 and len(deselected) >= 50  # both sides of the split really hold the suite

    servers = {nodeid: sorted(SERVER_FIXTURES & set(info["fixtures"])) for nodeid, info in selected.items()}
    assert {nodeid: used for nodeid, used in servers.items() if used} == {}
    assert [n for n in selected if n.startswith("tests/integration/")] == []
    assert [n for n in selected if n.split("::")[0].removeprefix("tests/") in INTEGRATION_MODULES] == []
    assert all("integration" in info["markers"] for info in deselected.values())
    # every fixture named in SERVER_FIXTURES exists and is used (a renamed one would slip through unmarked)
    used = set().union(*(info["fixtures"] for info in deselected.values()))
    assert SERVER_FIXTURES <= used, SERVER_FIXTURES - used
