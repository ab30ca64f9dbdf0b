"""generate: load `models:/<name>@champion` through mlflow.pyfunc and write PNGs.

Images land in outputs/generated/<model version>/ with manifest.parquet (file, seed,
model name, version, label) so every image can be traced to the model that made it. With
`generate.sink` set, the finished folder is also uploaded to <sink>/<model version>/, the
manifest last so that its presence marks a complete batch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from genloop.core.config import Params
from genloop.core.errors import GenloopError
from genloop.core.grids import make_grid
from genloop.core.progress import Progress
from genloop.core.storage import atomic_outputs, join_s3_uri, upload_dir
from genloop.core.workspace import Workspace
from genloop.mlops import tracking

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
    spec = model.unwrap_python_model().spec
    classes = spec.classes
    rows: list[dict[str, Any]] = []
    target = ws.generated / version
    sink = join_s3_uri(g.sink, version) if g.sink else None
    # the folder and the report are published together, after the upload: a failure anywhere
    # (a full disk, an unwritable sink) leaves the previous batch and report as they were
    with atomic_outputs() as out:
        tmp = out.folder(target)
        with Progress("generate", g.n, "images") as bar:
            _generate(cfg, model, classes, version, tmp, bar, rows)
        uploaded = upload_dir(tmp, sink) if sink else []
        summary = {"model_name": cfg.registry.model_name, "model_version": version, "n": len(rows),
                   "folder": str(target), "seed": g.seed, "sink": sink, "sink_objects": len(uploaded)}
        out.write_json(ws.report("generate"), summary)
    log.info("generate: %d images from %s v%s in %s", len(rows), cfg.registry.model_name, version, target)
    return summary


def _generate(cfg: Params, model: Any, classes: list[str], version: str, tmp: Path, bar: Progress,
              rows: list[dict[str, Any]]) -> None:
    """Write the batch's PNGs into the folder `tmp`, then its manifest.parquet and grid.png."""
    import numpy as np

    g = cfg.generate
    grid_images: list[Any] = []
    for start in range(0, g.n, g.batch_size):
        count = min(g.batch_size, g.n - start)
        seed = g.seed + start  # one seed per batch: any batch can be regenerated alone
        request = {"n": [count], "seed": [seed]}
        if g.label is not None:
            request["label"] = [str(g.label)]
        images = model.predict(pd.DataFrame(request))
        for i, img in enumerate(images):
            index = start + i
            name = f"{index:06d}.png"
            Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(tmp / name)
            label = str(g.label) if g.label is not None else (classes[i % len(classes)] if classes else None)
            rows.append({"file": name, "seed": seed, "index": i, "label": label,
                         "model_name": cfg.registry.model_name, "model_version": version})
        if len(grid_images) < 80:
            grid_images.extend(images[: 80 - len(grid_images)])
        bar.advance(count)
    pd.DataFrame(rows, columns=GENERATED_COLUMNS).to_parquet(tmp / "manifest.parquet", index=False)
    make_grid(np.stack(grid_images), columns=len(classes) or None, scale=2).save(tmp / "grid.png")
