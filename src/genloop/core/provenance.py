"""Where a result came from: data version (data.dvc md5), git commit, params hash."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from genloop.core.workspace import Workspace


def data_version(ws: Workspace) -> str:
    """The md5 that data.dvc records for data/raw, or 'untracked' when there is none."""
    if not ws.data_dvc.exists():
        return "untracked"
    doc = yaml.safe_load(ws.data_dvc.read_text()) or {}
    for out in doc.get("outs", []):
        if out.get("md5"):
            return str(out["md5"])
    return "untracked"


def git_commit(root: Path) -> str:
    """HEAD's commit of the repository holding `root`, '+dirty' marked; 'unknown' outside git."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=30,
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
