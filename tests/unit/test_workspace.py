"""Where a workspace keeps its trained judges: its own cache, or one shared by checkouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from genloop.core.workspace import Workspace


def test_judges_live_in_the_workspace_cache_unless_a_shared_cache_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = Workspace.at(tmp_path / "ws")
    monkeypatch.delenv("GENLOOP_JUDGE_CACHE", raising=False)
    assert ws.judge_cache == ws.cache == tmp_path / "ws" / ".genloop" / "cache"
    monkeypatch.setenv("GENLOOP_JUDGE_CACHE", str(tmp_path / "shared" / ".." / "shared"))
    assert ws.judge_cache == tmp_path / "shared"  # resolved, so every checkout names the same folder
    assert ws.cache == tmp_path / "ws" / ".genloop" / "cache"  # checkpoints and evaluations stay per workspace
