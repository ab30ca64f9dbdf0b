"""The repository's data.dvc and data/ledger.parquet.dvc are the built-in corpus: a fresh clone's
`genloop collect` rebuilds them exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from genloop.core.config import load_params
from genloop.core.workspace import Workspace
from genloop.stages import collect
from tests.helpers import ROOT, cli_env


def test_collect_with_the_default_params_reproduces_the_committed_data_dvc(tmp_path: Path):
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, env=cli_env(tmp_path))
    cfg = load_params(ROOT / "params.yaml", [])
    summary = collect.run(cfg, Workspace.at(tmp_path))
    versions = []
    for name in ("data.dvc", "data/ledger.parquet.dvc"):
        committed = yaml.safe_load((ROOT / name).read_text())
        rebuilt = yaml.safe_load((tmp_path / name).read_text())
        assert rebuilt == committed, f"genloop collect on the default params no longer gives the committed {name}"
        versions.append(committed["outs"][0]["md5"])
    assert summary["data_version"] == "+".join(versions)
