"""The loop's stages in order: the one table the CLI, the Prefect flow and dvc.yaml share.

Each row names the stage's `run(cfg, ws)` function, what it reads and writes (workspace paths)
and the params it depends on. dvc.yaml declares the same deps, params and outs, and a test keeps
them in step; the Prefect flow keys its task cache on the same inputs and params.

The run functions are imported when a stage runs, not when the table is read, so `genloop --help`
does not pay for torch and MLflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from genloop.core.config import Params
from genloop.core.workspace import Workspace

StageFn = Callable[[Params, Workspace], dict[str, Any]]


def _collect(cfg: Params, ws: Workspace) -> dict[str, Any]:
    from genloop.stages import collect
    return collect.run(cfg, ws)


def _clean(cfg: Params, ws: Workspace) -> dict[str, Any]:
    from genloop.stages import clean
    return clean.run(cfg, ws)


def _validate(cfg: Params, ws: Workspace) -> dict[str, Any]:
    from genloop.stages import validate
    return validate.run(cfg, ws)


def _train(cfg: Params, ws: Workspace) -> dict[str, Any]:
    from genloop.stages import train
    return train.run(cfg, ws)


def _evaluate(cfg: Params, ws: Workspace) -> dict[str, Any]:
    from genloop.stages import evaluate
    return evaluate.run(cfg, ws)


def _register(cfg: Params, ws: Workspace) -> dict[str, Any]:
    from genloop.stages import register
    return register.run(cfg, ws)


def _generate(cfg: Params, ws: Workspace) -> dict[str, Any]:
    from genloop.stages import generate
    return generate.run(cfg, ws)


def _optimize(cfg: Params, ws: Workspace) -> dict[str, Any]:
    from genloop.stages import optimize
    return optimize.run(cfg, ws)


@dataclass(frozen=True)
class Stage:
    """One stage: its run function, help text, and what it reads and writes.

    `inputs`/`outputs` are workspace-relative paths; `params` are dotted params.yaml keys.
    `cacheable` stages depend only on workspace files and params, so the flow may skip them
    when those are unchanged. register/generate/optimize also depend on the model registry
    (aliases move), so they always run.
    """

    name: str
    run: StageFn
    help: str
    inputs: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    cacheable: bool = False

    @property
    def module(self) -> str:
        """The module that holds the stage's code (dvc.yaml's code deps start from it)."""
        return f"genloop.stages.{self.name}"


STAGES: tuple[Stage, ...] = (
    Stage("collect", _collect,
          "Copy images from the configured sources into data/raw (content-addressed) and `dvc add` it."),
    Stage("clean", _clean,
          "Decode, convert, resize and dedupe data/raw into data/clean + data/manifest.parquet.",
          # the ledger, not the folder: it names every raw file by its sha256 (the files are
          # content-addressed), so it changes whenever data/raw's content does, and DVC and the
          # flow's cache key read one file instead of walking 100k. It lives beside data/raw, so
          # data.dvc is not upstream of clean and a no-op `dvc repro` never walks data/raw
          # (9.4 s -> 1.3 s at 100k; `dvc status data.dvc` still checks every file)
          inputs=("data/ledger.parquet",), params=("data", "clean"),
          outputs=("data/clean", "data/manifest.parquet", "reports/clean.json"), cacheable=True),
    Stage("validate", _validate,
          "Great Expectations gate on the manifest; a failure stops the loop before training.",
          inputs=("data/manifest.parquet",), params=("data.resolution", "data.mode", "validate"),
          outputs=("reports/validation.json",), cacheable=True),
    Stage("train", _train,
          "Train the generator (model.family) on the train split; log to MLflow; checkpoint.",
          inputs=("data/clean", "data/manifest.parquet", "reports/validation.json"),
          params=("data", "model", "train"),
          outputs=("models/generator.pt", "models/generator.json", "reports/train.json"), cacheable=True),
    Stage("evaluate", _evaluate,
          "FID, KID, C2ST, precision/recall vs held-out images, placed on the calibration ladder; memorisation.",
          inputs=("models/generator.pt", "data/clean", "data/manifest.parquet"), params=("evaluate", "register.metric"),
          outputs=("reports/memorisation.csv", "reports/eval.json", "reports/calibration.json"), cacheable=True),
    Stage("register", _register,
          "Log the generator as an MLflow pyfunc model ('challenger'); the gate decides 'champion'.",
          inputs=("models/generator.pt", "reports/eval.json"), params=("register", "tracking"),
          outputs=("reports/register.json", "reports/gate.json")),
    Stage("generate", _generate,
          "Write generate.n images from models:/<name>@champion to outputs/generated/<version>/.",
          inputs=("reports/register.json",), params=("generate",),
          outputs=("outputs/generated", "reports/generate.json")),
    Stage("optimize", _optimize,
          "Score generated images, drop near-copies of training images, keep the best.",
          inputs=("reports/generate.json", "data/clean", "data/manifest.parquet"), params=("optimize", "evaluate"),
          outputs=("outputs/curated", "reports/optimize.json", "reports/next_params.yaml")),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
ORDER: tuple[str, ...] = tuple(BY_NAME)
CACHEABLE: tuple[str, ...] = tuple(s.name for s in STAGES if s.cacheable)
