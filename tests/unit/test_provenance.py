"""The data version a run records: data/raw's md5 joined with the ledger's, as the .dvc files name them."""

from __future__ import annotations

from pathlib import Path

from genloop.core.provenance import data_version
from genloop.core.workspace import Workspace

RAW = "outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data/raw\n"
LEDGER = "outs:\n- md5: fedcba9876543210fedcba9876543210\n  path: ledger.parquet\n"


def test_the_data_version_joins_the_raw_files_and_the_ledger_so_a_role_change_is_a_new_version(tmp_path: Path):
    ws = Workspace.at(tmp_path)
    assert data_version(ws) == "untracked"
    ws.data_dvc.write_text(RAW)
    assert data_version(ws) == "0123456789abcdef0123456789abcdef.dir"  # an older layout: the ledger in data/raw
    ws.ledger_dvc.parent.mkdir(parents=True)
    ws.ledger_dvc.write_text(LEDGER)
    joined = data_version(ws)
    assert joined == "0123456789abcdef0123456789abcdef.dir+fedcba9876543210fedcba9876543210"
    ws.ledger_dvc.write_text(LEDGER.replace("fedcba98", "00000000"))  # e.g. feedback turned a row negative
    assert data_version(ws) != joined and data_version(ws).startswith("0123456789abcdef")
