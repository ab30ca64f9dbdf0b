"""Where a result came from: data version (data.dvc md5), git commit, params hash."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from genloop.core.workspace import Workspace


def _recorded_md5(dvc_file: Path) -> str | None:
    """The md5 a .dvc file records for its (first) output; None without the file or an md5."""
    if not dvc_file.exists():
        return None
    doc = yaml.safe_load(dvc_file.read_text()) or {}
    return next((str(out["md5"]) for out in doc.get("outs", []) if out.get("md5")), None)


def data_version(ws: Workspace) -> str:
    """What data.dvc records for data/raw, joined with what data/ledger.parquet.dvc records for the
    ledger (`<raw md5>.dir+<ledger md5>`): roles and labels live in the ledger only. 'untracked'
    without data.dvc; the raw md5 alone where the ledger is still inside data/raw."""
    raw = _recorded_md5(ws.data_dvc)
    if raw is None:
        return "untracked"
    ledger = _recorded_md5(ws.ledger_dvc)
    return f"{raw}+{ledger}" if ledger else raw


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
