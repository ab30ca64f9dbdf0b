"""validate: a Great Expectations data gate on data/manifest.parquet.

The manifest is checked against an expectation suite ("genloop_manifest") built from
params: row count bounds, unique ids and hashes, no nulls in required columns, image size
and one mode as configured (auto: L or RGB), known splits, and, when labelled, no missing labels
and a bounded class imbalance (largest / smallest class count <= validate.max_class_ratio).

GE runs from a file-backed context in `<workspace>/gx/`; a Checkpoint with an
UpdateDataDocsAction builds Data Docs HTML into `reports/data_docs/`. Every setup call is
an add-or-update, so re-running in the same workspace is idempotent. The outcome is written
to reports/validation.json; if any expectation failed, `ValidationFailed` is raised after
the report is written, so the loop stops before training.

Great Expectations is imported inside functions: it takes seconds to import.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from genloop.core.config import Params
from genloop.core.errors import ValidationFailed
from genloop.core.manifest import read_manifest
from genloop.core.storage import write_json_atomic
from genloop.core.workspace import Workspace

log = logging.getLogger(__name__)

SUITE_NAME = "genloop_manifest"
DATASOURCE_NAME = "genloop"
ASSET_NAME = "manifest"
BATCH_DEFINITION_NAME = "whole_manifest"
VALIDATION_NAME = "genloop_manifest_validation"
CHECKPOINT_NAME = "genloop_validate"
DOCS_SITE_NAME = "genloop_data_docs"
DEFAULT_DOCS_SITE_NAME = "local_site"  # GE's default site in gx/uncommitted; replaced by ours

#: Columns every manifest row must fill.
REQUIRED_COLUMNS = ("id", "shard", "offset", "sha256", "pixel_hash", "phash", "width", "height", "mode",
                    "source", "split")
UNIQUE_COLUMNS = ("id", "sha256", "pixel_hash")
SPLITS = ("train", "holdout")
#: Derived column: each row's class count divided by the smallest class count; its max is
#: largest / smallest class count.
CLASS_RATIO_COLUMN = "class_count_ratio"


def data_docs_dir(ws: Workspace) -> Path:
    """Where the Data Docs site is built."""
    return ws.reports / "data_docs"


def _with_class_ratio(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Add CLASS_RATIO_COLUMN when the manifest has labels; return it and the class counts."""
    labels = df["label"].dropna()
    if labels.empty:
        return df, {}
    counts = labels.value_counts()
    smallest = int(counts.min())
    ratio = df["label"].map(counts / smallest).astype("float64")
    return df.assign(**{CLASS_RATIO_COLUMN: ratio}), {str(k): int(v) for k, v in counts.items()}


def build_expectations(cfg: Params, labelled: bool) -> list[Any]:
    """The expectations of the manifest suite, from params."""
    import great_expectations.expectations as gxe

    v = cfg.data_gate
    exps: list[Any] = [
        gxe.ExpectTableRowCountToBeBetween(min_value=v.min_rows, max_value=v.max_rows),
    ]
    exps += [gxe.ExpectColumnValuesToBeUnique(column=c) for c in UNIQUE_COLUMNS]
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in REQUIRED_COLUMNS]
    res, auto = cfg.data.resolution, cfg.data.mode == "auto"
    exps += [
        gxe.ExpectColumnValuesToBeBetween(column=c, min_value=res, max_value=res)
        for c in ("width", "height")
    ]
    exps += [
        gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=["L", "RGB"] if auto else [cfg.data.mode]),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
    ]
    if auto:  # clean chose L or RGB for the whole corpus: one of them, the same on every row
        exps.append(gxe.ExpectColumnUniqueValueCountToBeBetween(column="mode", min_value=1, max_value=1))
    if labelled:
        exps += [
            gxe.ExpectColumnValuesToNotBeNull(column="label"),
            gxe.ExpectColumnMaxToBeBetween(
                column=CLASS_RATIO_COLUMN,
                max_value=v.max_class_ratio,
                notes=(
                    "Class balance: the max of this derived column is the largest class "
                    f"count / the smallest class count; allowed <= {v.max_class_ratio} "
                    "(validate.max_class_ratio)."
                ),
            ),
        ]
    return exps


def _context(ws: Workspace) -> Any:
    """The file-backed GE context in ws.root/gx, with Data Docs going to reports/data_docs."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="file", project_root_dir=str(ws.root))
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    base = os.path.relpath(data_docs_dir(ws), ctx.root_directory)
    site = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": base.replace(os.sep, "/") + "/",
        },
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    sites = ctx.list_data_docs_sites()
    if DEFAULT_DOCS_SITE_NAME in sites:
        ctx.delete_data_docs_site(DEFAULT_DOCS_SITE_NAME)
    if DOCS_SITE_NAME in sites:
        if sites[DOCS_SITE_NAME] != site:
            ctx.update_data_docs_site(DOCS_SITE_NAME, site)
    else:
        ctx.add_data_docs_site(DOCS_SITE_NAME, site)
    return ctx


def _checkpoint(ctx: Any, expectations: list[Any]) -> Any:
    """(Re)create data source, asset, batch definition, suite, validation and checkpoint."""
    import great_expectations as gx

    source = ctx.data_sources.add_or_update_pandas(DATASOURCE_NAME)
    try:
        asset = source.get_asset(ASSET_NAME)
    except LookupError:
        asset = source.add_dataframe_asset(ASSET_NAME)
    try:
        batch_def = asset.get_batch_definition(BATCH_DEFINITION_NAME)
    except LookupError:  # KeyError included
        batch_def = asset.add_batch_definition_whole_dataframe(BATCH_DEFINITION_NAME)
    suite = ctx.suites.add_or_update(
        gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations)
    )
    validation = ctx.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=VALIDATION_NAME, data=batch_def, suite=suite)
    )
    return ctx.checkpoints.add_or_update(
        gx.Checkpoint(
            name=CHECKPOINT_NAME,
            validation_definitions=[validation],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs",
                                                        site_names=[DOCS_SITE_NAME])],
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 10},
        )
    )


def _observed(result: dict[str, Any]) -> Any:
    """What an expectation saw: its observed value, or the unexpected values it found."""
    if "observed_value" in result:
        return result["observed_value"]
    if "unexpected_count" in result:
        return {
            "unexpected_count": result.get("unexpected_count"),
            "unexpected_percent": result.get("unexpected_percent"),
            "partial_unexpected_list": result.get("partial_unexpected_list", []),
        }
    return None


def _summarise(expectation_result: Any) -> dict[str, Any]:
    """One JSON-ready row of the report from a GE ExpectationValidationResult."""
    d = expectation_result.to_json_dict()
    config = d.get("expectation_config") or {}
    kwargs = {k: v for k, v in (config.get("kwargs") or {}).items() if k != "batch_id"}
    row: dict[str, Any] = {
        "expectation_type": config.get("type"),
        "column": kwargs.get("column"),
        "kwargs": kwargs,
        "success": bool(d.get("success")),
        "observed_value": _observed(d.get("result") or {}),
    }
    exc = d.get("exception_info") or {}
    if exc.get("raised_exception"):
        row["exception"] = exc.get("exception_message")
    return row


def _describe(row: dict[str, Any]) -> str:
    where = f"({row['column']})" if row["column"] else ""
    observed = row["observed_value"]
    if isinstance(observed, dict) and "unexpected_count" in observed:
        sample = observed["partial_unexpected_list"][:3]
        observed = f"{observed['unexpected_count']} unexpected, e.g. {sample}"
    extra = f"; error: {row['exception']}" if row.get("exception") else ""
    return f"{row['expectation_type']}{where}: observed {observed}{extra}"


def run(cfg: Params, ws: Workspace) -> dict[str, object]:
    """Validate data/manifest.parquet; write reports/validation.json and Data Docs.

    Raises StageInputMissing without a manifest and ValidationFailed (after writing the
    report) when any expectation fails.
    """
    manifest = read_manifest(ws.manifest, arrow=True)  # a row per image: its text as Arrow strings
    df, class_counts = _with_class_ratio(manifest)
    ctx = _context(ws)
    checkpoint = _checkpoint(ctx, build_expectations(cfg, labelled=bool(class_counts)))
    result = checkpoint.run(batch_parameters={"dataframe": df})

    rows: list[dict[str, Any]] = []
    for suite_result in result.run_results.values():
        rows += [_summarise(r) for r in suite_result.results]
    failed = [r for r in rows if not r["success"]]
    docs_index = data_docs_dir(ws) / "index.html"
    success = bool(result.success) and not failed
    report = {
        "success": success,
        "rows": len(manifest),
        "evaluated": len(rows),
        "successful": len(rows) - len(failed),
        "failed": len(failed),
        "suite": SUITE_NAME,
        "class_counts": class_counts,
        "results": rows,
        "data_docs": str(docs_index),
    }
    report_path = ws.report("validation")
    write_json_atomic(report_path, report)
    log.info("validate: %d of %d expectations passed on %d rows; Data Docs at %s",
             len(rows) - len(failed), len(rows), len(manifest), docs_index)
    if not success:
        lines = "\n".join(f"  - {_describe(r)}" for r in failed)
        raise ValidationFailed(
            f"data validation failed: {len(failed)} of {len(rows)} expectations on "
            f"{ws.manifest} failed:\n{lines}\nSee {report_path} and {docs_index}."
        )
    return {
        "success": success,
        "rows": len(manifest),
        "evaluated": len(rows),
        "failed": len(failed),
        "data_docs": str(docs_index),
    }
