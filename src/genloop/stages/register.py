"""register: log the trained generator as an MLflow pyfunc model and let the gate decide.

The new version always gets alias `challenger`. It becomes `champion` only when the
promotion gate passes (genloop.eval.gate): no memorised training images beyond the limit, and
better than the current champion by more than the metric's bootstrap noise, both scored
with the same extractor, samples and seeds. The decision, its numbers and reason go to
reports/gate.json, the version's tags and the register run; the replaced champion keeps
the `previous-champion` alias and the champion history is kept as a registered-model tag.

Order, so that an MLflow server dying mid-stage leaves nothing half-made: the model's files
are uploaded first; the version is then created from them with all its tags in one call
(tag `genloop.registration=pending`); the aliases move; the tag becomes `complete`. A rerun
that finds a pending version of the same weights finishes it (aliases, from the decision
recorded on it) instead of registering the weights a second time.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from genloop.core.config import Params
from genloop.core.errors import StageInputMissing
from genloop.core.grids import side_by_side
from genloop.core.provenance import data_version, git_commit
from genloop.core.storage import atomic_outputs, read_json, sha256_file
from genloop.core.workspace import Workspace
from genloop.eval import calibration
from genloop.eval import gate as gate_mod
from genloop.eval.extractors import get_extractor
from genloop.eval.gate import WEIGHTS_TAG
from genloop.eval.generator_eval import asked_classes, evaluate_generator
from genloop.eval.reference import load_reference
from genloop.mlops import aliases, tracking
from genloop.models import GeneratorSpec, load_generator, sample

log = logging.getLogger(__name__)
# logged as MLflow "models from code"; found without importing it (importing runs set_model)
PYFUNC_CODE = Path(str(importlib.util.find_spec("genloop.mlops.pyfunc").origin))
TAGGED_METRICS = ("fid", "kid_mean", "kid_std", "inception_score", "precision", "recall", "coverage", "c2st_auc",
                  "class_consistency")
REGISTRATION_TAG = "genloop.registration"  # pending (aliases not yet set) | complete | duplicate of <v>


def _signature(spec: GeneratorSpec) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("long", "n"), ColSpec("long", "seed")]
                    + ([ColSpec("string", "label", required=False)] if spec.classes else []))
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, spec.resolution, spec.resolution, spec.channels))])
    return ModelSignature(inputs=inputs, outputs=outputs)


# What the pyfunc (genloop.mlops.pyfunc and the genloop.models code it runs) imports, by
# distribution name. genloop itself is not on PyPI: the model carries its source (code_paths).
PYFUNC_DISTRIBUTIONS = ("mlflow", "torch", "numpy", "pandas")
# what a family's generator needs beyond those: the ddpm family is a diffusers UNet and sampler
FAMILY_DISTRIBUTIONS = {"ddpm": ("diffusers",)}


def pip_requirements(family: str = "") -> list[str]:
    """The pyfunc's requirements for a generator of `family`, pinned to the versions installed
    here and installable from PyPI: public versions only (torch `2.13.0+cpu` is pinned as
    `2.13.0`, which pip matches to a CPU or CUDA build of it), no local paths or editable installs."""
    dists = (*PYFUNC_DISTRIBUTIONS, *FAMILY_DISTRIBUTIONS.get(family, ()))
    return [f"{dist}=={dist_version(dist).split('+')[0]}" for dist in dists]


def log_generator(ws: Workspace, spec: GeneratorSpec) -> Any:
    """Log models/generator.pt as the pyfunc model `generator` of the active run; returns its info.

    The genloop package goes with it (`code/genloop`, without byte code): `mlflow models serve`
    and `mlflow.pyfunc.load_model` in an environment built from `pip_requirements()` find it there.
    """
    import mlflow

    package = PYFUNC_CODE.parents[1]  # src/genloop
    with tempfile.TemporaryDirectory(prefix="genloop-code-") as tmp:
        code = Path(tmp) / "genloop"
        shutil.copytree(package, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return mlflow.pyfunc.log_model(
            name="generator",
            python_model=str(PYFUNC_CODE),
            artifacts={"weights": str(ws.generator), "spec": str(ws.generator.with_suffix(".json"))},
            code_paths=[str(code)],
            signature=_signature(spec),
            input_example=pd.DataFrame({"n": [2], "seed": [0]}),
            pip_requirements=pip_requirements(spec.family),
        )


def _already_registered(ws: Workspace, name: str, version: str, metric: str, score: float,
                        reason: str | None = None) -> dict[str, Any]:
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
        "reason": reason or f"these weights are version {version} already; aliases left as they are",
        "metric": metric,
        "score": score,
        "champion_score_before": None,
        "run_id": None,
        "tracking_uri": tracking.tracking_uri(ws),
        "reused": True,
    }
    with atomic_outputs() as out:
        out.write_json(ws.report("register"), summary)
        out.write_json(ws.report("gate"), {"passed": None, "reason": summary["reason"], "version": version})
    log.info("register: %s version %s holds these weights already; nothing registered", name, version)
    return summary


def _run_gate(cfg: Params, ws: Workspace, name: str, metric: tuple[str, str]) -> tuple[dict[str, Any], Any | None]:
    """Score the challenger and the champion on equal terms and decide on `metric` (name, why);
    returns the gate report and the champion-vs-challenger grid (None without a champion)."""
    extractor = get_extractor(cfg, ws)
    ref, train_set = load_reference(cfg, ws, extractor)
    cal = (calibration.load_or_compute(cfg, ws, extractor, ref, train_set)
           if cfg.evaluate.calibration.enabled else None)
    generator, spec = load_generator(ws.generator)
    challenger = evaluate_generator(cfg, ws, lambda n, seed: sample(generator, spec, n, seed),
                                    sha256_file(ws.generator), extractor, ref, asked=lambda n: asked_classes(spec, n))
    champion_version = aliases.champion_version(name)
    champion = how = comparison = grid = None
    if champion_version is not None:
        champion, how = gate_mod.evaluate_champion(cfg, ws, name, champion_version, extractor, ref)
        g = cfg.registry.gate
        comparison = gate_mod.paired_bootstrap(
            metric[0], ref.holdout, challenger.features, champion.features, resamples=g.bootstrap,
            confidence=g.confidence, seed=g.seed, kid_subset=cfg.evaluate.kid_subset_size, bank=ref.train)
        grid = side_by_side(champion.images[:40], challenger.images[:40], columns=spec.num_classes or 8,
                            captions=(f"champion v{champion_version}", "challenger"))
    passed, reason = gate_mod.decide(cfg, challenger, comparison, champion, cal.noise if cal else None)
    report = gate_mod.gate_report(cfg, challenger, champion, champion_version, how, comparison, passed, reason,
                                  extractor, ref, metric)
    log.info("gate: %s (%s)", "passed" if passed else "not passed", reason)
    return report, grid


def run(cfg: Params, ws: Workspace) -> dict[str, Any]:
    """Register models/generator.pt; write reports/register.json with the decision.

    Weights registered before (same sha256) are not registered again: the summary names
    the existing version and no alias moves.
    """
    if not ws.report("eval").exists():
        raise StageInputMissing(f"{ws.report('eval')} not found: run `genloop evaluate` first")
    evaluation = read_json(ws.report("eval"))
    if evaluation.get("generator_sha256") != sha256_file(ws.generator):
        raise StageInputMissing("reports/eval.json is about another generator: rerun `genloop evaluate`")
    spec = GeneratorSpec.from_json(ws.generator.with_suffix(".json").read_text())
    name = cfg.registry.model_name
    chosen = evaluation.get("gate_metric") or {}
    metric = chosen.get("name") or calibration.choose_gate_metric(cfg, None)[0]
    score = float(evaluation[metric])
    tracking.configure(ws, cfg)
    with tracking.server_errors(ws, f"registering model {name!r}"):
        return _register(cfg, ws, evaluation, spec, name, (metric, chosen.get("why", "")), score)


def _set_aliases(name: str, version: str, promote: bool, reason: str) -> None:
    """`challenger` (and `champion` when the gate passed); then the version is complete."""
    tracking.set_alias(name, "challenger", version)
    if promote:
        aliases.promote(name, version, reason)
    tracking.tag_version(name, version, {REGISTRATION_TAG: "complete"})


def _resume(ws: Workspace, name: str, pending: list[Any], metric: str, score: float) -> dict[str, Any]:
    """Finish the newest pending version of these weights (a run stopped after creating it):
    set its aliases from the gate decision recorded on it; the others are duplicates."""
    version = pending[-1]
    v, tags = str(version.version), dict(version.tags)
    champion = aliases.champion_version(name)
    promote = aliases.passed_gate(tags) and champion != v
    reason = tags.get("genloop.gate.reason") or tags.get("genloop.decision") or ""
    if promote and champion != tags.get("genloop.gate.champion_version"):
        promote = False  # the champion changed since the gate ran: its decision no longer holds
        reason = f"not promoted: the champion is version {champion} now, not the one the gate compared with"
    _set_aliases(name, v, promote, reason)
    for other in pending[:-1]:
        tracking.tag_version(name, other.version, {REGISTRATION_TAG: f"duplicate of {v}"})
    log.warning("register: finished version %s of %s, which an interrupted run created", v, name)
    return _already_registered(ws, name, v, metric, score,
                               f"completed version {v}, created by an interrupted run: {reason}")


def _version_tags(ws: Workspace, evaluation: dict[str, Any], gate: dict[str, Any]) -> dict[str, Any]:
    """The new version's tags: provenance, metrics and the gate's decision; marked pending until done."""
    promote = gate["passed"]
    comparison = gate["comparison"] or {}
    return {
        "genloop.data_version": data_version(ws),
        "genloop.git_commit": git_commit(ws.root),
        WEIGHTS_TAG: evaluation["generator_sha256"],
        "genloop.extractor": evaluation["extractor"]["name"],
        "genloop.train_run_id": evaluation.get("train_run_id"),
        "genloop.eval_run_id": evaluation.get("run_id"),
        **{k: evaluation[k] for k in TAGGED_METRICS if evaluation.get(k) is not None},
        "memorised_share": evaluation["memorisation"]["share_below_threshold"],
        "genloop.promoted": promote,
        "genloop.decision": gate["reason"],
        aliases.PASSED_TAG: promote,
        "genloop.gate.reason": gate["reason"][:4000],
        "genloop.gate.champion_version": (gate["champion"] or {}).get("version"),
        **{f"genloop.gate.{k}": round(comparison[k], 6) for k in ("delta", "delta_low", "delta_high")
           if k in comparison},
        REGISTRATION_TAG: "pending",
    }


def _summary(ws: Workspace, gate: dict[str, Any], name: str, version: str, metric: str, score: float,
             run_id: str) -> dict[str, Any]:
    """reports/register.json: the version, where the champion alias points now and why."""
    champ_now = tracking.get_alias_version(name, "champion")
    return {
        "model_name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "champion_version": str(champ_now.version) if champ_now else None,
        "champion_uri": f"models:/{name}@champion",
        "promoted": gate["passed"],
        "reason": gate["reason"],
        "metric": metric,
        "score": score,
        "champion_version_before": (gate["champion"] or {}).get("version"),
        "champion_score_before": (gate["champion"] or {}).get("score"),
        "run_id": run_id,
        "tracking_uri": tracking.tracking_uri(ws),
        "reused": False,
    }


def _register(cfg: Params, ws: Workspace, evaluation: dict[str, Any], spec: GeneratorSpec, name: str,
              chosen: tuple[str, str], score: float) -> dict[str, Any]:
    metric = chosen[0]
    versions = tracking.find_versions(name, WEIGHTS_TAG, evaluation["generator_sha256"])
    done = [v for v in versions if v.tags.get(REGISTRATION_TAG, "complete") == "complete"]
    pending = [v for v in versions if v.tags.get(REGISTRATION_TAG) == "pending"]
    if done:
        for other in pending:
            tracking.tag_version(name, other.version, {REGISTRATION_TAG: f"duplicate of {done[-1].version}"})
        return _already_registered(ws, name, str(done[-1].version), metric, score)
    if pending:
        return _resume(ws, name, pending, metric, score)
    gate, comparison_grid = _run_gate(cfg, ws, name, chosen)
    promote = gate["passed"]
    with tracking.stage_run(ws, cfg, "register") as run:
        info = log_generator(ws, spec)  # the files first: a version is only ever created from uploaded files
        comparison = gate["comparison"] or {}
        tags = _version_tags(ws, evaluation, gate)
        version = tracking.create_version(name, info.model_uri, tags)  # with its tags, in one call
        gate["challenger"]["version"] = version
        _set_aliases(name, version, promote, gate["reason"])
        tracking.tag_run({"genloop.model_version": version, "genloop.promoted": promote})
        tracking.log_metrics({metric: score} | {f"gate_{k}": comparison[k] for k in ("delta", "delta_low", "delta_high")
                                                if k in comparison})
        tracking.log_json(gate, "gate/gate.json")
        if comparison_grid is not None:
            tracking.log_image(comparison_grid, "gate/champion_vs_challenger.png")
            if evaluation.get("run_id"):  # and beside the challenger's own evaluation
                tracking.log_image_to_run(evaluation["run_id"], comparison_grid, "eval/champion_vs_challenger.png")
        run_id = run.info.run_id
    summary = _summary(ws, gate, name, version, metric, score, run_id)
    with atomic_outputs() as out:  # both reports or neither
        out.write_json(ws.report("gate"), gate)
        out.write_json(ws.report("register"), summary)
    log.info("register: %s version %s (%s; %s)", name, version, "champion" if promote else "challenger",
             gate["reason"])
    return summary
