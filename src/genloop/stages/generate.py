"""generate: load `models:/<name>@champion` through mlflow.pyfunc and write PNGs.

The batches are chunks mapped on the engine `parallel.engine` names (`generate_chunk`: one process
per core by default, Dask, or this process; on a GPU, this process), each loading the champion's
state dict that this stage saves once.

Images land in outputs/generated/<model version>/ with manifest.parquet (file, seed,
model name, version, label) so every image can be traced to the model that made it. With
`generate.sink` set, the finished folder is also uploaded to <sink>/<model version>/, the
manifest last so that its presence marks a complete batch.
"""

from __future__ import annotations

import logging
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from genloop.core.chunk_map import chunk_map, chunked, engine_summary
from genloop.core.config import ParallelParams, Params
from genloop.core.errors import GenloopError
from genloop.core.grids import make_grid
from genloop.core.progress import Progress
from genloop.core.storage import atomic_outputs, join_s3_uri, temp_dir, upload_dir
from genloop.core.workspace import Workspace
from genloop.mlops import tracking
from genloop.models import class_labels, save_generator
from genloop.stages.generate_chunk import GenerateJob, batch_starts, generate_chunk

log = logging.getLogger(__name__)

GENERATED_COLUMNS = ["file", "seed", "index", "label", "model_name", "model_version"]


def load_champion(cfg: Params, ws: Workspace) -> tuple[Any, str]:
    """The champion (run by genloop's own code, never the model's stored code) and its version number."""
    tracking.configure(ws, cfg)
    name = cfg.registry.model_name
    with tracking.server_errors(ws, f"loading the champion of model {name!r}"):
        champion = tracking.get_alias_version(name, "champion")
        if champion is None:
            raise GenloopError(
                f"model {name!r} has no 'champion' alias at {tracking.tracking_uri(ws)}: run `genloop register`"
            )
        return tracking.load_model(name, champion.version), str(champion.version)


def run(cfg: Params, ws: Workspace) -> dict[str, Any]:
    """Write `generate.n` images from the champion to outputs/generated/<version>/."""
    g = cfg.generate
    model, version = load_champion(cfg, ws)
    champion = model.unwrap_python_model()
    target = ws.generated / version
    sink = join_s3_uri(g.sink, version) if g.sink else None
    # the folder and the report are published together, after the upload: a failure anywhere
    # (a full disk, an unwritable sink) leaves the previous batch and report as they were
    with atomic_outputs() as out:
        tmp = out.folder(target)
        rows = _generate(cfg, ws, champion, version, tmp)
        uploaded = upload_dir(tmp, sink) if sink else []
        summary = {"model_name": cfg.registry.model_name, "model_version": version, "n": len(rows),
                   "folder": str(target), "seed": g.seed, "sink": sink, "sink_objects": len(uploaded)}
        out.write_json(ws.report("generate"), summary)
    log.info("generate: %d images from %s v%s in %s", len(rows), cfg.registry.model_name, version, target)
    return summary


def plan_chunks(cfg: Params, n_batches: int) -> tuple[ParallelParams, str, int, int]:
    """(engine settings, device, batches per chunk, torch threads per chunk). On a GPU the batches
    run in this process, one after another on the device; on CPUs they are spread over the
    engine's workers, each with its share of the cores."""
    import torch

    from genloop.models.device import threads_per_chunk

    per_chunk = max(1, cfg.parallel.chunk_size // cfg.generate.batch_size)
    if torch.cuda.is_available():
        return cfg.parallel.model_copy(update={"engine": "serial"}), "cuda", per_chunk, torch.get_num_threads()
    return cfg.parallel, "cpu", per_chunk, threads_per_chunk(cfg.parallel, -(-n_batches // per_chunk))


def _generate(cfg: Params, ws: Workspace, champion: Any, version: str, tmp: Path) -> list[dict[str, Any]]:
    """Write the batch's PNGs into the folder `tmp` (chunks of batches on the engine
    `parallel.engine` names), then its manifest.parquet and grid.png; the manifest's rows."""
    import numpy as np

    g = cfg.generate
    class_labels(champion.spec, 1, g.label)  # a label the model does not know fails here, not in a worker
    starts = batch_starts(g.n, g.batch_size)
    settings, device, per_chunk, threads = plan_chunks(cfg, len(starts))
    weights_dir = temp_dir(ws.cache / "generate" / "champion")
    try:
        # the champion as a state dict the chunks load (weights_only): workers need no MLflow
        save_generator(champion.generator, champion.spec, weights_dir / "generator.pt")
        job = GenerateJob(weights=(weights_dir / "generator.pt").resolve(), folder=tmp.resolve(), n=g.n,
                          batch_size=g.batch_size, seed=g.seed, label=None if g.label is None else str(g.label),
                          device=device, threads=threads)
        chunks = chunked(starts, per_chunk)
        log.info("generate: %d images in %d chunks (%s, %s)", g.n, len(chunks), engine_summary(settings), device)
        with Progress("generate", g.n, "images") as bar:
            results = chunk_map(partial(generate_chunk, job), chunks, settings, lambda r: bar.advance(len(r)))
    finally:
        shutil.rmtree(weights_dir, ignore_errors=True)
    rows = [r | {"model_name": cfg.registry.model_name, "model_version": version} for chunk in results for r in chunk]
    pd.DataFrame(rows, columns=GENERATED_COLUMNS).to_parquet(tmp / "manifest.parquet", index=False)
    first = [np.asarray(Image.open(tmp / str(r["file"]))) for r in rows[:80]]
    grid = np.stack([a[:, :, None] if a.ndim == 2 else a for a in first])
    make_grid(grid, columns=len(champion.spec.classes) or None, scale=2).save(tmp / "grid.png")
    return rows
