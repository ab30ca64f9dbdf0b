"""Prefect flows: the same stage functions, wired into `genloop-loop` and `genloop-collect`.

Tasks are stage-sized; retries are declared on the decorators where I/O can fail (S3
sources, the MLflow server). The loop runs under one MLflow parent run, and publishes a
markdown summary and a metrics table as Prefect artifacts.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from genloop import tracking
from genloop.config import load_params
from genloop.errors import Unreachable
from genloop.stages import ORDER, stage_fn
from genloop.workspace import Workspace


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only when a server or endpoint did not answer; a bad file or param fails at once."""
    try:
        state.result()
    except Unreachable:
        return True
    except Exception:
        return False
    return False


IO_RETRIES = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": _transient}
RETRIES = {"collect": IO_RETRIES, "register": IO_RETRIES, "generate": IO_RETRIES}


def _stage_task(name: str) -> Any:
    def body(params_file: str, overrides: list[str], workspace: str) -> dict[str, Any]:
        cfg = load_params(params_file, overrides)
        return stage_fn(name)(cfg, Workspace.at(workspace))

    body.__name__ = name
    return task(name=name, cache_policy=NO_CACHE, **RETRIES.get(name, {}))(body)


TASKS = {name: _stage_task(name) for name in ORDER}


def _where(ws: Workspace, results: dict[str, dict[str, Any]]) -> str:
    reg, gen, opt = results["register"], results["generate"], results["optimize"]
    alias = "champion" if reg["promoted"] else "challenger"
    return "\n".join([
        "genloop loop finished.",
        f"  model:      {reg['model_uri']} (alias '{alias}'; champion is version {reg['champion_version']}, "
        f"{reg['metric']}={reg['score']:.4f}: {reg['reason']})",
        f"  generated:  {gen['folder']} ({gen['n']} images)",
        f"  curated:    {opt['folder']} ({opt['kept']} kept)",
        f"  reports:    {ws.reports} (clean.json, validation.json, train.json, eval.json, register.json, ...)",
        f"  data docs:  {results['validate'].get('data_docs')}",
        f"  MLflow UI:  {tracking.ui_command(ws)}",
    ])


@flow(name="genloop-loop", log_prints=False)
def loop_flow(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    workspace: str = ".",
    collect: bool = True,
) -> dict[str, Any]:
    """collect -> clean -> validate -> train -> evaluate -> register -> generate -> optimize."""
    overrides = list(overrides or [])
    cfg = load_params(params_file, overrides)
    ws = Workspace.at(workspace)
    results: dict[str, dict[str, Any]] = {}
    if collect:
        results["collect"] = TASKS["collect"](params_file, overrides, workspace)
    with tracking.parent_run(ws, cfg) as parent:
        for name in ORDER[1:]:
            results[name] = TASKS[name](params_file, overrides, workspace)
            tracking.log_metrics({f"{name}.{k}": v for k, v in results[name].items()
                                  if isinstance(v, int | float) and not isinstance(v, bool)})
        run_id = parent.info.run_id
    where = _where(ws, results)
    reg, ev = results["register"], results["evaluate"]
    create_markdown_artifact(
        key="genloop-loop-summary",
        markdown=f"# genloop loop\n\n```\n{where}\n```\n\n"
        f"- data version: `{tracking.provenance_tags(ws, cfg, 'loop')['genloop.data_version']}`\n"
        f"- MLflow parent run: `{run_id}` at `{tracking.tracking_uri(ws)}`\n"
        f"- promoted: **{reg['promoted']}** ({reg['reason']})\n",
        description="Where the results of this loop iteration are",
    )
    create_table_artifact(
        key="genloop-loop-metrics",
        table=[{"metric": k, "value": ev[k]} for k in ("fid", "kid_mean", "kid_std", "fid_real_floor")],
        description="Evaluation metrics of this iteration's generator",
    )
    return {"results": results, "where": where, "parent_run_id": run_id}


@flow(name="genloop-collect")
def collect_flow(params_file: str = "params.yaml", overrides: list[str] | None = None,
                 workspace: str = ".") -> dict[str, Any]:
    """Ingestion only: collect the configured sources and bump data.dvc."""
    return TASKS["collect"](params_file, list(overrides or []), workspace)
