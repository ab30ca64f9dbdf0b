"""Cache keys of stages: what changes them, what does not, and the intact-outputs check."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from genloop.core.config import load_params
from genloop.core.workspace import Workspace
from genloop.orchestrate import cache_policy
from genloop.orchestrate.code_deps import relative_deps
from genloop.stages.table import BY_NAME, ORDER

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    ws = Workspace.at(tmp_path)
    (ws.raw / "ab").mkdir(parents=True)
    (ws.raw / "ab" / "abc.png").write_bytes(b"one")
    ws.ledger.write_bytes(b"ledger")
    return ws


def test_stage_io_matches_dvc_yaml():
    """The flow's cache and `dvc repro` must agree on what each stage reads and writes."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(ORDER[1:])
    for name, spec in stages.items():
        deps = [d for d in spec["deps"] if not d.startswith("src/")]
        assert tuple(deps) == BY_NAME[name].inputs, name
        code = [d for d in spec["deps"] if d.startswith("src/")]
        assert code == relative_deps(BY_NAME[name].module), (
            f"dvc.yaml code deps of {name} != its imports: run `python -m genloop.orchestrate.code_deps`")
        assert tuple(spec["params"]) == BY_NAME[name].params, name
        declared = [next(iter(o)) if isinstance(o, dict) else o
                    for key in ("outs", "metrics") for o in spec.get(key, [])]
        assert set(BY_NAME[name].outputs) <= set(declared), name


def test_key_changes_with_input_content_and_own_params_only(ws: Workspace):
    cfg = load_params(None, [])
    key = cache_policy.stage_key("clean", cfg, ws)
    assert cache_policy.stage_key("clean", cfg, ws) == key  # stable
    assert cache_policy.stage_key("clean", load_params(None, ["train.lr=0.1"]), ws) == key  # not clean's param
    assert cache_policy.stage_key("clean", load_params(None, ["clean.blank_std=3"]), ws) != key
    train_key = cache_policy.stage_key("train", cfg, ws)
    assert cache_policy.stage_key("train", load_params(None, ["train.lr=0.1"]), ws) != train_key
    # clean's input is the ledger naming every content-addressed raw file: collect adding a file
    # rewrites it; a folder walk (10 s of every no-op `dvc repro` at 100k files) is not needed
    (ws.raw / "ab" / "abd.png").write_bytes(b"two")
    assert cache_policy.stage_key("clean", cfg, ws) == key
    ws.ledger.write_bytes(b"ledger naming abd.png too")
    assert cache_policy.stage_key("clean", cfg, ws) != key


def test_code_deps_follow_imports_and_leave_unrelated_modules_out():
    """A stage reruns when code it runs changes, and only then (the same files for DVC and Prefect)."""
    from genloop.orchestrate import code_deps

    train = {p.relative_to(code_deps.PACKAGE_ROOT).as_posix() for p in code_deps.closure("genloop.stages.train")}
    assert {"stages/train.py", "models/vae.py", "models/dcgan.py", "models/ddpm.py", "core/config.py",
            "mlops/tracking.py"} <= train  # families are imported explicitly, so they are seen
    assert not train & {"feedback/review_app.py", "cli/main.py", "orchestrate/flows.py", "eval/gate.py"}
    clean = {p.name for p in code_deps.closure("genloop.stages.clean")}
    assert "vae.py" not in clean and "images.py" in clean


def test_fingerprint_ignores_hidden_temp_files_and_sees_renames(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(b"x")
    before = cache_policy.fingerprint(tmp_path)
    (tmp_path / ".a.png.123.tmp").write_bytes(b"partial")
    assert cache_policy.fingerprint(tmp_path) == before
    (tmp_path / "a.png").rename(tmp_path / "b.png")
    assert cache_policy.fingerprint(tmp_path) != before
    assert cache_policy.fingerprint(tmp_path / "missing") == "missing"


def test_outputs_intact_only_for_the_same_key_and_untouched_outputs(ws: Workspace):
    cfg = load_params(None, [])
    for rel in BY_NAME["validate"].outputs:
        (ws.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws.root / rel).write_text("{}")
    key = cache_policy.stage_key("validate", cfg, ws)
    assert not cache_policy.outputs_intact("validate", key, ws)  # never ran through the flow
    cache_policy.write_stamp("validate", key, ws)
    assert cache_policy.outputs_intact("validate", key, ws)
    assert not cache_policy.outputs_intact("validate", "another-key", ws)
    ws.report("validation").write_text('{"rewritten": true}')  # e.g. `genloop validate` by hand
    assert not cache_policy.outputs_intact("validate", key, ws)
