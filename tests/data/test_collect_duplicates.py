"""collect names every exact duplicate it merges, and which file it duplicates."""

from __future__ import annotations

import json
from pathlib import Path

from genloop.core.workspace import Workspace
from genloop.stages import collect
from tests.data.test_collect import params, tiny_png


def test_every_merged_duplicate_is_named_with_the_file_it_duplicates(tmp_path: Path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "a.png").write_bytes(tiny_png(1))
    (first / "b.png").write_bytes(tiny_png(2))
    (first / "z copy.png").write_bytes(tiny_png(1))  # within one source
    (second / "b-again.png").write_bytes(tiny_png(2))  # across sources
    (second / "c.png").write_bytes(tiny_png(3))
    ws = Workspace.at(tmp_path / "ws")
    sources = f"collect.sources=[{{uri: '{first}'}}, {{uri: '{second}'}}]"
    summary = collect.run(params(sources), ws)
    assert summary["added"] == 3
    dupes = sorted(summary["duplicates"], key=lambda d: d["original"])
    assert dupes == [
        {"source": str(second), "original": "b-again.png", "duplicate_of": f"{first}: b.png"},
        {"source": str(first), "original": "z copy.png", "duplicate_of": f"{first}: a.png"},
    ]
    assert json.loads(ws.report("collect").read_text())["duplicates"] == summary["duplicates"]

    (second / "c-later.png").write_bytes(tiny_png(3))  # a later collect: duplicates of ledger rows
    again = collect.run(params(sources), ws)
    assert again["added"] == 0
    named = {(d["original"], d["duplicate_of"]) for d in again["duplicates"]}
    assert ("c-later.png", f"{second}: c.png") in named and ("a.png", f"{first}: a.png") in named
    assert len(again["duplicates"]) == 6  # every file offered again is named
