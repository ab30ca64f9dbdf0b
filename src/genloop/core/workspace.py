"""Where every stage reads and writes: one folder, laid out as dvc.yaml expects."""

from __future__ import annotations

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
        return self.raw / "ledger.parquet"

    @property
    def data_dvc(self) -> Path:
        return self.root / "data.dvc"

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
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"
