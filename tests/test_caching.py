"""Cache keys of stages: what changes them, what does not, and the intact-outputs check."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from genloop import caching
from genloop.config import load_params
from genloop.stages import IO, ORDER
from genloop.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    ws = Workspace.at(tmp_path)
    (ws.raw / "ab").mkdir(parents=True)
    (ws.raw / "ab" / "abc.png").write_bytes(b"one")
    (ws.raw / "ledger.parquet").write_bytes(b"ledger")
    return ws


def test_stage_io_matches_dvc_yaml():
    """The flow's cache and `dvc repro` must agree on what each stage reads and writes."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(IO) == set(ORDER[1:])
    for name, spec in stages.items():
        deps = [d for d in spec["deps"] if not d.startswith("src/")]
        assert tuple(deps) == IO[name].inputs, name
        assert tuple(spec["params"]) == IO[name].params, name
        declared = [next(iter(o)) if isinstance(o, dict) else o
                    for key in ("outs", "metrics") for o in spec.get(key, [])]
        assert set(IO[name].outputs) <= set(declared), name


def test_key_changes_with_input_content_and_own_params_only(ws: Workspace):
    cfg = load_params(None, [])
    key = caching.stage_key("clean", cfg, ws)
    assert caching.stage_key("clean", cfg, ws) == key  # stable
    assert caching.stage_key("clean", load_params(None, ["train.lr=0.1"]), ws) == key  # not clean's param
    assert caching.stage_key("clean", load_params(None, ["clean.blank_std=3"]), ws) != key
    assert caching.stage_key("train", load_params(None, ["train.lr=0.1"]), ws) != caching.stage_key("train", cfg, ws)
    (ws.raw / "ab" / "abc.png").write_bytes(b"two")
    assert caching.stage_key("clean", cfg, ws) != key


def test_fingerprint_ignores_hidden_temp_files_and_sees_renames(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(b"x")
    before = caching.fingerprint(tmp_path)
    (tmp_path / ".a.png.123.tmp").write_bytes(b"partial")
    assert caching.fingerprint(tmp_path) == before
    (tmp_path / "a.png").rename(tmp_path / "b.png")
    assert caching.fingerprint(tmp_path) != before
    assert caching.fingerprint(tmp_path / "missing") == "missing"


def test_outputs_intact_only_for_the_same_key_and_untouched_outputs(ws: Workspace):
    cfg = load_params(None, [])
    for rel in IO["validate"].outputs:
        (ws.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws.root / rel).write_text("{}")
    key = caching.stage_key("validate", cfg, ws)
    assert not caching.outputs_intact("validate", key, ws)  # never ran through the flow
    caching.write_stamp("validate", key, ws)
    assert caching.outputs_intact("validate", key, ws)
    assert not caching.outputs_intact("validate", "another-key", ws)
    ws.report("validation").write_text('{"rewritten": true}')  # e.g. `genloop validate` by hand
    assert not caching.outputs_intact("validate", key, ws)
