"""register: log the trained generator as an MLflow pyfunc model and move the aliases.

The new version always gets alias `challenger`; it becomes `champion` when there is no
champion yet or when its metric (FID by default, lower is better) beats the champion's.
The previous champion keeps a `previous-champion` alias so the history can be audited.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from genloop import tracking
from genloop.config import Params
from genloop.errors import StageInputMissing
from genloop.models import GeneratorSpec
from genloop.provenance import data_version, git_commit
from genloop.storage import read_json, sha256_file, write_json_atomic
from genloop.workspace import Workspace

log = logging.getLogger(__name__)
PYFUNC_CODE = Path(__file__).with_name("pyfunc_generator.py")
WEIGHTS_TAG = "genloop.generator_sha256"


def _signature(spec: GeneratorSpec) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("long", "n"), ColSpec("long", "seed")]
                    + ([ColSpec("string", "label", required=False)] if spec.classes else []))
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, spec.resolution, spec.resolution, spec.channels))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def decide(challenger: float, champion: float | None) -> tuple[bool, str]:
    """Lower-is-better promotion rule: promote when there is no champion or it is beaten."""
    if champion is None:
        return True, "no champion yet"
    if challenger < champion:
        return True, f"challenger {challenger:.4f} < champion {champion:.4f}"
    return False, f"challenger {challenger:.4f} >= champion {champion:.4f}"


def _already_registered(ws: Workspace, name: str, version: str, metric: str, score: float) -> dict[str, Any]:
    """The summary for weights that an earlier run registered already: no second version."""
    champ = tracking.get_alias_version(name, "champion")
    champion_version = str(champ.version) if champ else None
    summary = {
        "model_name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "champion_version": champion_version,
        "champion_uri": f"models:/{name}@champion",
        "promoted": champion_version == version,
        "reason": f"these weights are version {version} already; aliases left as they are",
        "metric": metric,
        "score": score,
        "champion_score_before": None,
        "run_id": None,
        "tracking_uri": tracking.tracking_uri(ws),
        "reused": True,
    }
    write_json_atomic(ws.report("register"), summary)
    log.info("register: %s version %s holds these weights already; nothing registered", name, version)
    return summary


def run(cfg: Params, ws: Workspace) -> dict[str, Any]:
    """Register models/generator.pt; write reports/register.json with the decision.

    Weights registered before (same sha256) are not registered again: the summary names
    the existing version and no alias moves.
    """
    import mlflow

    if not ws.report("eval").exists():
        raise StageInputMissing(f"{ws.report('eval')} not found: run `genloop evaluate` first")
    evaluation = read_json(ws.report("eval"))
    if evaluation.get("generator_sha256") != sha256_file(ws.generator):
        raise StageInputMissing("reports/eval.json is about another generator: rerun `genloop evaluate`")
    spec = GeneratorSpec.from_json(ws.generator.with_suffix(".json").read_text())
    name = cfg.register_.model_name
    metric = cfg.register_.metric
    score = float(evaluation[metric])
    tracking.configure(ws, cfg)
    existing = tracking.find_version(name, WEIGHTS_TAG, evaluation["generator_sha256"])
    if existing is not None:
        return _already_registered(ws, name, str(existing.version), metric, score)
    with tracking.stage_run(ws, cfg, "register") as run:
        info = mlflow.pyfunc.log_model(
            name="generator",
            python_model=str(PYFUNC_CODE),
            artifacts={"weights": str(ws.generator), "spec": str(ws.generator.with_suffix(".json"))},
            signature=_signature(spec),
            input_example=pd.DataFrame({"n": [2], "seed": [0]}),
            registered_model_name=name,
            pip_requirements=[f"genloop=={__import__('genloop').__version__}", "torch", "numpy", "pandas"],
        )
        version = str(info.registered_model_version)
        champion = tracking.get_alias_version(name, "champion")
        champ_score = None
        if champion is not None and str(champion.version) != version:
            champ_tags = tracking.version_tags(name, champion.version)
            champ_score = float(champ_tags[metric]) if metric in champ_tags else None
        promote, reason = decide(score, champ_score)
        tags = {
            "genloop.data_version": data_version(ws),
            "genloop.git_commit": git_commit(ws.root),
            WEIGHTS_TAG: evaluation["generator_sha256"],
            "genloop.extractor": evaluation["extractor"]["name"],
            "genloop.train_run_id": evaluation.get("train_run_id"),
            "genloop.eval_run_id": evaluation.get("run_id"),
            "fid": evaluation["fid"],
            "kid_mean": evaluation["kid_mean"],
            "kid_std": evaluation["kid_std"],
            "genloop.promoted": promote,
            "genloop.decision": reason,
        }
        tracking.tag_version(name, version, tags)
        tracking.set_alias(name, "challenger", version)
        if promote:
            if champion is not None and str(champion.version) != version:
                tracking.set_alias(name, "previous-champion", champion.version)
            tracking.set_alias(name, "champion", version)
        tracking.tag_run({"genloop.model_version": version, "genloop.promoted": promote})
        tracking.log_metrics({metric: score})
        run_id = run.info.run_id
    champ_now = tracking.get_alias_version(name, "champion")
    summary = {
        "model_name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "champion_version": str(champ_now.version) if champ_now else None,
        "champion_uri": f"models:/{name}@champion",
        "promoted": promote,
        "reason": reason,
        "metric": metric,
        "score": score,
        "champion_score_before": champ_score,
        "run_id": run_id,
        "tracking_uri": tracking.tracking_uri(ws),
        "reused": False,
    }
    write_json_atomic(ws.report("register"), summary)
    log.info("register: %s version %s (%s; %s)", name, version, "champion" if promote else "challenger", reason)
    return summary
