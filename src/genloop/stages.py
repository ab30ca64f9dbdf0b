"""The loop's stages in order, by name: the one table the CLI, the flow and dvc.yaml share."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from genloop.config import Params
from genloop.workspace import Workspace

ORDER = ("collect", "clean", "validate", "train", "evaluate", "register", "generate", "optimize")

HELP = {
    "collect": "Copy images from the configured sources into data/raw (content-addressed) and `dvc add` it.",
    "clean": "Decode, convert, resize and dedupe data/raw into data/clean + data/manifest.parquet.",
    "validate": "Great Expectations gate on the manifest; a failure stops the loop before training.",
    "train": "Train the generator (model.family) on the train split; log to MLflow; checkpoint.",
    "evaluate": "FID/KID of generated vs held-out images with the named feature extractor.",
    "register": "Log the generator as an MLflow pyfunc model; set 'challenger', maybe 'champion'.",
    "generate": "Write generate.n images from models:/<name>@champion to outputs/generated/<version>/.",
    "optimize": "Score generated images, drop near-copies of training images, keep the best.",
}


def stage_fn(name: str) -> Callable[[Params, Workspace], dict[str, Any]]:
    """The `run(cfg, ws)` function of a stage."""
    return importlib.import_module(f"genloop.{name}").run
