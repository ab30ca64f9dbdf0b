"""Prefect flows: the same stage functions, wired into `genloop-loop` and `genloop-collect`.

Tasks are stage-sized and their runs are named after the stage (`train`); flow runs are named
`loop-<data version>-<time>` (`collect-...`). Retries are declared on the decorators where I/O
can fail (S3 sources, the MLflow server). The loop runs under one MLflow parent run and
publishes Prefect artifacts: a link to each stage's MLflow run (on the stage's task run), the
evaluated samples, a markdown summary with every MLflow run and a metrics table; long stages
show a live progress artifact (genloop.core.progress).
"""

from __future__ import annotations

import base64
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from prefect import flow, task
from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE, CachePolicy

from genloop.core import logs
from genloop.core.config import load_params
from genloop.core.errors import Unreachable
from genloop.core.lock import workspace_lock
from genloop.core.provenance import data_version
from genloop.core.storage import read_json
from genloop.core.workspace import Workspace
from genloop.feedback import tuning
from genloop.mlops import tracking
from genloop.orchestrate import cache_policy
from genloop.stages.table import BY_NAME, CACHEABLE, ORDER

log = logging.getLogger(__name__)
logs.install_redaction()  # credentials never reach a log record, whichever handler sends it on
logs.hide_user_error_tracebacks()
if logging.getLogger("genloop").level == logging.NOTSET:  # a worker's flow run: stage progress goes to Prefect
    logging.getLogger("genloop").setLevel(logging.INFO)


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only when a server or endpoint did not answer; a bad file or param fails at once."""
    try:
        state.result()
    except Unreachable:
        return True
    except Exception:
        return False
    return False


# Bounded retries with backoff for the tasks that talk to S3 or the MLflow server. Inside each
# try, boto3 (4 attempts) and MLflow's HTTP client (3 retries) back off too.
IO_RETRIES = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": _transient}
RETRIES = {"collect": IO_RETRIES, "train": IO_RETRIES, "evaluate": IO_RETRIES, "register": IO_RETRIES,
           "generate": IO_RETRIES, "optimize": IO_RETRIES}


@dataclass
class StageCache(CachePolicy):
    """Prefect cache policy: the key of `cache_policy.stage_key` (input content hashes + the
    stage's params + genloop's source), computed from the task's own arguments."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        cfg = load_params(inputs["params_file"], inputs["overrides"])
        return cache_policy.stage_key(task_ctx.task.name, cfg, Workspace.at(inputs["workspace"]))


def _run_name(kind: str) -> str:
    """`<kind>-<data version>-<local time>`: the data version (data.dvc's md5, 8 hex digits, or
    `untracked`) as the flow run starts, before this run's collect."""
    from prefect.runtime import flow_run

    workspace = (flow_run.parameters or {}).get("workspace", ".")
    version = data_version(Workspace.at(workspace))
    short = version if version == "untracked" else version.removesuffix(".dir")[:8]
    return f"{kind}-{short}-{time.strftime('%Y%m%d-%H%M%S')}"


def _loop_run_name() -> str:
    return _run_name("loop")


def _collect_run_name() -> str:
    return _run_name("collect")


def _link_stage_runs(name: str, ws: Workspace) -> None:
    """A link artifact, on this stage's task run, to each MLflow run the stage made under the
    loop's parent run (none outside `loop`, or when the stage made none)."""
    parent = os.environ.get(tracking.PARENT_RUN_ENV)
    if not parent:
        return
    try:
        for run in tracking.child_runs(parent):
            if run.data.tags.get("genloop.stage") == name:
                create_link_artifact(
                    key=f"mlflow-{name}-run",
                    link=tracking.run_link(ws, run),
                    link_text=f"MLflow run of {name} ({run.info.run_id[:8]})",
                    description=f"The {name} stage's MLflow run: params, metrics, artifacts",
                )
    except Exception as exc:  # a convenience: the stage itself is done
        log.warning("%s: no link to its MLflow run in Prefect (%s: %s)", name, exc.__class__.__name__,
                    logs.redact(str(exc))[:300])


def _stage_task(name: str) -> Any:
    def body(params_file: str, overrides: list[str], workspace: str) -> dict[str, Any]:
        cfg = load_params(params_file, overrides)
        ws = Workspace.at(workspace)
        key = cache_policy.stage_key(name, cfg, ws) if name in CACHEABLE else None
        result = BY_NAME[name].run(cfg, ws)
        if key is not None:
            cache_policy.write_stamp(name, key, ws)
        _link_stage_runs(name, ws)
        return result

    body.__name__ = name
    options: dict[str, Any] = {"cache_policy": NO_CACHE}
    if name in CACHEABLE:
        options = {"cache_policy": StageCache(), "persist_result": True, "result_serializer": "json"}
    return task(name=name, task_run_name=name, **options, **RETRIES.get(name, {}))(body)


TASKS = {name: _stage_task(name) for name in ORDER}


def run_stage(name: str, params_file: str, overrides: list[str], workspace: str) -> tuple[dict[str, Any], bool]:
    """Run one stage task inside a flow; returns (result, skipped because cached).

    A cacheable stage whose outputs are not the ones its last run under the same key left
    behind (deleted, or rewritten outside the flow) refreshes the cache instead of hitting it.
    """
    stage_task = TASKS[name]
    if name in CACHEABLE:
        ws = Workspace.at(workspace)
        key = cache_policy.stage_key(name, load_params(params_file, overrides), ws)
        store = cache_policy.results_dir(ws)
        stage_task = stage_task.with_options(
            refresh_cache=not cache_policy.outputs_intact(name, key, ws),
            result_storage=store / "results",  # the results, and apart from them the cache records
            cache_policy=StageCache().configure(key_storage=store / "records"),
        )
    state = stage_task(params_file, overrides, workspace, return_state=True)
    result = state.result()  # raises the stage's error when it failed
    cached = state.name == "Cached"
    if cached:
        log.info("%s: skipped, inputs and params unchanged (cached result of an earlier run)", name)
    return result, cached


MAX_EMBEDDED_IMAGE = 400_000  # bytes of PNG embedded in a markdown artifact; larger ones are only linked


def _publish_samples(ws: Workspace) -> None:
    """The evaluated generator's sample grid (reports/eval_samples.png, also the evaluate run's
    `eval/samples.png`) as Prefect artifacts: markdown that embeds the PNG (a data: URI, so it
    shows with no server) and links it in MLflow; with a tracking server, also an image artifact
    of its URL (Prefect's image artifacts take a URL, which a local store does not serve)."""
    grid = ws.reports / "eval_samples.png"
    if not grid.exists():
        return
    run_id = read_json(ws.report("eval")).get("run_id") if ws.report("eval").exists() else None
    url = tracking.artifact_link(ws, run_id, "eval/samples.png") if run_id else None
    data = grid.read_bytes()
    lines = ["# Samples of this iteration's generator", ""]
    if len(data) <= MAX_EMBEDDED_IMAGE:
        lines.append(f"![samples](data:image/png;base64,{base64.b64encode(data).decode()})")
    if url:
        lines += ["", f"In MLflow: [eval/samples.png]({url}) of the evaluate run `{run_id}`"
                  + ("" if tracking.served(ws) else f" (served by `{tracking.ui_command(ws)}`)")]
    lines += ["", f"On disk: `{grid}`"]
    create_markdown_artifact(key="genloop-samples", markdown="\n".join(lines),
                             description="Samples of the generator this iteration evaluated")
    if url and tracking.served(ws):
        create_image_artifact(image_url=url, key="genloop-samples-image",
                              description="Samples of the generator this iteration evaluated (MLflow)")


def _runs_table(ws: Workspace, parent: Any) -> str:
    """A markdown table of the parent run and each stage run under it, with links."""
    rows = [f"| loop | [{parent.info.run_id}]({tracking.run_link(ws, parent)}) |"]
    rows += [f"| {run.data.tags.get('genloop.stage', run.info.run_name)} | "
             f"[{run.info.run_id}]({tracking.run_link(ws, run)}) |" for run in tracking.child_runs(parent.info.run_id)]
    return "| MLflow run | |\n|---|---|\n" + "\n".join(rows)


def _where(ws: Workspace, results: dict[str, dict[str, Any]], skipped: list[str]) -> str:
    reg, gen, opt = results["register"], results["generate"], results["optimize"]
    alias = "champion" if reg["promoted"] else "challenger"
    return "\n".join([
        "genloop loop finished.",
        f"  model:      {reg['model_uri']} (alias '{alias}'; champion is version {reg['champion_version']}, "
        f"{reg['metric']}={reg['score']:.4f}: {reg['reason']})",
        *[f"  {'quality:' if i == 0 else '':<12}{line}"
          for i, line in enumerate(results["evaluate"].get("readable", []))],
        f"  generated:  {gen['folder']} ({gen['n']} images)" + (f" -> {gen['sink']}" if gen.get("sink") else ""),
        f"  curated:    {opt['folder']} ({opt['kept']} kept)" + (f" -> {opt['sink']}" if opt.get("sink") else ""),
        f"  skipped:    {', '.join(skipped) if skipped else 'nothing'} (unchanged inputs and params)",
        f"  reports:    {ws.reports} (clean.json, validation.json, train.json, eval.json, register.json, ...)",
        f"  data docs:  {results['validate'].get('data_docs')}",
        f"  MLflow UI:  {tracking.ui_command(ws)}",
    ])


@flow(name="genloop-loop", flow_run_name=_loop_run_name, log_prints=False)
def loop_flow(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    workspace: str = ".",
    collect: bool = True,
) -> dict[str, Any]:
    """collect -> clean -> validate -> train -> evaluate -> register -> generate -> optimize.

    `overrides` are `dotted.key=value` strings, like `genloop loop --set`; stages whose inputs
    and params did not change since the last run are skipped (Prefect task cache).
    """
    with workspace_lock(Workspace.at(workspace), "genloop-loop flow"):
        return _loop(params_file, list(overrides or []), workspace, collect)


def _loop(params_file: str, overrides: list[str], workspace: str, collect: bool) -> dict[str, Any]:
    cfg = load_params(params_file, overrides)
    ws = Workspace.at(workspace)
    applied = tuning.apply_proposal(cfg, ws, overrides) if cfg.loop.autotune else None
    if applied is not None:  # the last optimize's proposal (reports/next_params.yaml); explicit --set wins
        overrides = applied.overrides
        cfg = load_params(params_file, overrides)
    results: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    if collect:
        results["collect"], _ = run_stage("collect", params_file, overrides, workspace)
    with tracking.parent_run(ws, cfg) as parent:
        for name in ORDER[1:]:
            results[name], cached = run_stage(name, params_file, overrides, workspace)
            if cached:
                skipped.append(name)
            tracking.log_metrics({f"{name}.{k}": v for k, v in results[name].items()
                                  if isinstance(v, int | float) and not isinstance(v, bool)})
        tracking.tag_run({"genloop.skipped_stages": ",".join(skipped) or "none",
                          "genloop.autotune": applied.describe()[:4000] if applied else "off or no proposal"})
        run_id = parent.info.run_id
        iteration = tracking.run_tags(run_id).get("genloop.iteration")
        run_link = tracking.run_link(ws, parent)
        runs_table = _runs_table(ws, parent)
    where = _where(ws, results, skipped) + (f"\n  autotune:   {applied.describe()}" if applied else "")
    where += f"\n  iteration:  {iteration} (MLflow parent run {run_id})"
    reg, ev = results["register"], results["evaluate"]
    stage_rows = "\n".join(f"| {name} | {'skipped (cached)' if name in skipped else 'ran'} |"
                           for name in ORDER if name in results)
    create_markdown_artifact(
        key="genloop-loop-summary",
        markdown=f"# genloop loop\n\n"
        f"- iteration {iteration}, data version `{tracking.provenance_tags(ws, cfg, 'loop')['genloop.data_version']}`\n"
        f"- MLflow parent run: [{run_id}]({run_link})\n"
        f"- model: `{reg['model_uri']}`, promoted: **{reg['promoted']}** ({reg['reason']})\n"
        f"- FID {ev['fid']:.3f} (real-vs-real floor {ev['fid_real_floor']:.3f}), "
        f"KID {ev['kid_mean']:.5f} ± {ev['kid_std']:.5f}, precision {ev['precision']:.3f}, "
        f"recall {ev['recall']:.3f}, memorised {ev['memorised_share']:.1%} ({ev['extractor']} features)\n"
        + "".join(f"- {line}\n" for line in ev.get("readable", [])) +
        f"- gate: see `reports/gate.json`; roll back with `genloop rollback --reason ...`\n\n"
        f"| stage | this run |\n|---|---|\n{stage_rows}\n\n{runs_table}\n\n```\n{where}\n```\n",
        description="What this loop iteration did and where its results are",
    )
    _publish_samples(ws)
    create_table_artifact(
        key="genloop-loop-metrics",
        table=[{"metric": k, "value": ev[k]} for k in ("fid", "kid_mean", "kid_std", "inception_score", "precision",
                                                        "recall", "memorised_share", "fid_real_floor")
               if ev.get(k) is not None],
        description="Evaluation metrics of this iteration's generator",
    )
    return {"results": results, "where": where, "parent_run_id": run_id, "skipped": skipped, "iteration": iteration,
            "autotune": {"file": applied.file, "overrides": applied.overrides,
                         "changes": {k: list(v) for k, v in applied.changes.items()}} if applied else None}


@flow(name="genloop-collect", flow_run_name=_collect_run_name)
def collect_flow(params_file: str = "params.yaml", overrides: list[str] | None = None,
                 workspace: str = ".") -> dict[str, Any]:
    """Ingestion only: collect the configured sources, bump data.dvc (and push it to the DVC remote)."""
    with workspace_lock(Workspace.at(workspace), "genloop-collect flow"):
        result, _ = run_stage("collect", params_file, list(overrides or []), workspace)
    return result
