"""Where every stage reads and writes: one folder, laid out as dvc.yaml expects."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    """Paths of a genloop workspace (the folder holding params.yaml and dvc.yaml)."""

    root: Path

    @classmethod
    def at(cls, root: str | Path = ".") -> Workspace:
        return cls(Path(root).resolve())

    # data
    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def ledger(self) -> Path:
        """The table naming every raw file (beside data/raw, not in it: see `ledger_dvc`)."""
        return self.root / "data" / "ledger.parquet"

    @property
    def legacy_ledger(self) -> Path:
        """Where the ledger lived before it moved out of data/raw; collect moves it."""
        return self.raw / "ledger.parquet"

    @property
    def data_dvc(self) -> Path:
        return self.root / "data.dvc"

    @property
    def ledger_dvc(self) -> Path:
        """The ledger's own .dvc file. clean depends on the ledger, so with the ledger outside
        data/raw a no-op `dvc repro` never walks data/raw's files (data.dvc's output)."""
        return self.root / "data" / "ledger.parquet.dvc"

    @property
    def clean(self) -> Path:
        return self.root / "data" / "clean"

    @property
    def manifest(self) -> Path:
        return self.root / "data" / "manifest.parquet"

    # results
    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def report(self, stage: str) -> Path:
        return self.reports / f"{stage}.json"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def checkpoints(self) -> Path:
        return self.models / "checkpoints"

    @property
    def generator(self) -> Path:
        return self.models / "generator.pt"

    @property
    def extractor(self) -> Path:
        return self.models / "extractor.pt"

    @property
    def generated(self) -> Path:
        return self.root / "outputs" / "generated"

    @property
    def curated(self) -> Path:
        return self.root / "outputs" / "curated"

    # local state that is neither data nor result
    @property
    def cache(self) -> Path:
        return self.root / ".genloop" / "cache"

    @property
    def judge_cache(self) -> Path:
        """Where trained judges live (extractors, real-image classifiers, reference statistics,
        calibration): $GENLOOP_JUDGE_CACHE when set, so checkouts and CI jobs on the same corpus
        share them (every entry is keyed by content: data version, manifest, params, recipe);
        else the workspace's own cache."""
        shared = os.environ.get("GENLOOP_JUDGE_CACHE")
        return Path(shared).expanduser().resolve() if shared else self.cache

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"
