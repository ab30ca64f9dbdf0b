"""The curated batches optimize writes (outputs/curated/<version>/), read back for review and import.

An image id is `v<model version>-<file stem>` (e.g. v3-000042); `BatchIndex` resolves ids to the
batch and image, and what optimize recorded about them (model, seed, scores, sha256).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from genloop.core.errors import StageInputMissing
from genloop.core.storage import read_json, sha256_file
from genloop.core.workspace import Workspace
from genloop.feedback.store import FeedbackError, check_image_id, curated_image_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CuratedImage:
    """One kept image of a curated batch, with what optimize recorded about it."""

    image_id: str
    file: str
    model_name: str
    model_version: str
    seed: int | None
    label: str | None
    score: float | None
    realism: float | None
    novelty: float | None


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _seed(value: Any) -> int | None:
    f = _number(value)
    return None if f is None else int(f)


@dataclass
class CuratedBatch:
    """outputs/curated/<version>/: the kept images (best score first), looked up by image id."""

    version: str
    folder: Path
    images: list[CuratedImage]
    by_id: dict[str, CuratedImage] = field(default_factory=dict)
    _sha: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, ws: Workspace, version: str, default_model_name: str = "unknown") -> CuratedBatch:
        """Read scores.parquet; keep the rows marked `kept` whose file is in the folder."""
        version = str(version)
        if not re.fullmatch(r"[0-9A-Za-z_.-]{1,32}", version) or ".." in version:
            raise FeedbackError(f"model version {version!r} is not a valid version name")
        folder = ws.curated / version
        scores_path = folder / "scores.parquet"
        if not scores_path.is_file():
            known = ", ".join(available_versions(ws)) or "none"
            raise StageInputMissing(
                f"no curated batch for model version {version}: {scores_path} not found "
                f"(curated versions: {known}; `genloop optimize` writes them)"
            )
        scores = pd.read_parquet(scores_path)
        if "file" not in scores.columns:
            raise FeedbackError(f"{scores_path} has no 'file' column: not a curated batch")
        if "kept" in scores.columns:
            scores = scores[scores["kept"].astype(bool)]
        if "score" in scores.columns:
            scores = scores.sort_values("score", ascending=False, kind="stable")
        images, missing = [], 0
        present = {p.name for p in folder.iterdir()}
        for row in scores.to_dict("records"):
            name = PurePosixPath(str(row["file"])).name
            if name != str(row["file"]) or name not in present:
                missing += 1
                continue
            images.append(CuratedImage(
                image_id=curated_image_id(version, name),
                file=name,
                model_name=str(row.get("model_name") or default_model_name),
                model_version=str(row.get("model_version") or version),
                seed=_seed(row.get("seed")),
                label=None if row.get("label") is None else str(row.get("label")),
                score=_number(row.get("score")),
                realism=_number(row.get("realism")),
                novelty=_number(row.get("novelty")),
            ))
        if missing:
            log.warning("%d kept images of %s are not in the folder; they are left out", missing, folder)
        return cls(version=version, folder=folder, images=images, by_id={i.image_id: i for i in images})

    def __len__(self) -> int:
        return len(self.images)

    def get(self, image_id: str) -> CuratedImage | None:
        """The image with this id, or None (also for an id that is not a safe name)."""
        try:
            check_image_id(image_id)
        except ValueError:
            return None
        return self.by_id.get(image_id)

    def path(self, image: CuratedImage) -> Path:
        """The image's file, resolved and checked to lie inside the batch folder."""
        root = self.folder.resolve()
        path = (root / image.file).resolve()
        if path.parent != root:
            raise FeedbackError(f"image {image.image_id} resolves outside its batch folder")
        return path

    def sha256(self, image: CuratedImage) -> str:
        """sha256 of the image file (computed once; curated batches are written atomically)."""
        digest = self._sha.get(image.image_id)
        if digest is None:
            digest = self._sha[image.image_id] = sha256_file(self.path(image))
        return digest


def available_versions(ws: Workspace) -> list[str]:
    """Model versions with a curated batch, in name order."""
    if not ws.curated.is_dir():
        return []
    return sorted(p.name for p in ws.curated.iterdir()
                  if (p / "scores.parquet").is_file() and not p.name.startswith("."))


def latest_version(ws: Workspace) -> str:
    """The model version of the latest curated batch, from reports/optimize.json."""
    report = ws.report("optimize")
    if not report.is_file():
        raise StageInputMissing(f"{report} not found: run `genloop optimize` first, or pass --version")
    version = read_json(report).get("model_version")
    if version is None:
        raise FeedbackError(f"{report} names no model_version: run `genloop optimize` again, or pass --version")
    return str(version)


class BatchIndex:
    """Curated batches loaded on demand, to resolve image ids `v<version>-<stem>`."""

    def __init__(self, ws: Workspace, default_model_name: str = "unknown") -> None:
        self.ws = ws
        self.default_model_name = default_model_name
        self._batches: dict[str, CuratedBatch | None] = {}

    def batch(self, version: str) -> CuratedBatch | None:
        if version not in self._batches:
            try:
                self._batches[version] = CuratedBatch.load(self.ws, version, self.default_model_name)
            except (StageInputMissing, FeedbackError):
                self._batches[version] = None
        return self._batches[version]

    def resolve(self, image_id: str) -> tuple[CuratedBatch, CuratedImage]:
        """The batch and image an id names; ValueError saying why not."""
        check_image_id(image_id)
        if not image_id.startswith("v") or "-" not in image_id:
            raise ValueError(f"image id {image_id!r} is not a curated image id (v<model version>-<file stem>)")
        tried = []
        # the version may itself hold '-': try every split, shortest version first
        for i, ch in enumerate(image_id):
            if ch != "-" or i < 2:
                continue
            version = image_id[1:i]
            batch = self.batch(version)
            if batch is None:
                tried.append(version)
                continue
            image = batch.get(image_id)
            if image is not None:
                return batch, image
            raise ValueError(f"unknown image {image_id!r}: not a kept image of the curated batch {batch.folder}")
        raise ValueError(f"unknown image {image_id!r}: no curated batch for model version "
                         f"{' or '.join(tried) or '?'} under {self.ws.curated}")
