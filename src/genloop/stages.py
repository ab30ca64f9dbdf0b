"""The loop's stages in order, by name: the one table the CLI, the flow and dvc.yaml share."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from genloop.config import Params
from genloop.workspace import Workspace

ORDER = ("collect", "clean", "validate", "train", "evaluate", "register", "generate", "optimize")

HELP = {
    "collect": "Copy images from the configured sources into data/raw (content-addressed) and `dvc add` it.",
    "clean": "Decode, convert, resize and dedupe data/raw into data/clean + data/manifest.parquet.",
    "validate": "Great Expectations gate on the manifest; a failure stops the loop before training.",
    "train": "Train the generator (model.family) on the train split; log to MLflow; checkpoint.",
    "evaluate": "FID, KID, IS, precision/recall vs held-out images, and a memorisation check; extractor named.",
    "register": "Log the generator as an MLflow pyfunc model ('challenger'); the gate decides 'champion'.",
    "generate": "Write generate.n images from models:/<name>@champion to outputs/generated/<version>/.",
    "optimize": "Score generated images, drop near-copies of training images, keep the best.",
}


def stage_fn(name: str) -> Callable[[Params, Workspace], dict[str, Any]]:
    """The `run(cfg, ws)` function of a stage."""
    return importlib.import_module(f"genloop.{name}").run


@dataclass(frozen=True)
class StageIO:
    """What a stage reads and writes (workspace-relative paths) and which params it depends on.

    dvc.yaml declares the same deps/params/outs (a test keeps them in step); the Prefect
    flow keys its task cache on these inputs and params.
    """

    inputs: tuple[str, ...]
    params: tuple[str, ...]
    outputs: tuple[str, ...]


IO = {
    "clean": StageIO(("data/raw",), ("data", "clean"),
                     ("data/clean", "data/manifest.parquet", "reports/clean.json")),
    "validate": StageIO(("data/manifest.parquet",), ("data.resolution", "data.mode", "validate"),
                        ("reports/validation.json",)),
    "train": StageIO(("data/clean", "data/manifest.parquet", "reports/validation.json"),
                     ("data", "model", "train"),
                     ("models/generator.pt", "models/generator.json", "reports/train.json")),
    "evaluate": StageIO(("models/generator.pt", "data/clean", "data/manifest.parquet"),
                        ("evaluate",), ("reports/memorisation.csv", "reports/eval.json")),
    "register": StageIO(("models/generator.pt", "reports/eval.json"), ("register", "tracking"),
                        ("reports/register.json", "reports/gate.json")),
    "generate": StageIO(("reports/register.json",), ("generate",), ("outputs/generated", "reports/generate.json")),
    "optimize": StageIO(("reports/generate.json", "data/clean", "data/manifest.parquet"), ("optimize",),
                        ("outputs/curated", "reports/optimize.json", "reports/next_params.yaml")),
}

# Stages whose result depends only on workspace files and params: safe to skip when those are
# unchanged. register/generate/optimize also depend on the model registry (aliases move), so
# they always run; register itself does not make a second version of identical weights.
CACHEABLE = ("clean", "validate", "train", "evaluate")
