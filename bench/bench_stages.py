"""What the bench scripts share: the collect overrides of a named corpus, one corpus prepared by
the real stages (collect, clean, validate, the extractor and its calibration ladder), and plain
text tables.

The scripts run as `python bench/<name>.py`, so this folder is on sys.path; importing this
module sets up offline_env (no telemetry, an embedded MLflow store) before genloop loads.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import offline_env  # noqa: F401  (first: the environment genloop and MLflow read at import)

from genloop.core.config import Params
from genloop.core.workspace import Workspace
from genloop.eval import calibration
from genloop.eval.extractors import get_extractor
from genloop.eval.reference import load_reference
from genloop.stages import clean, collect, validate


def corpus_sources(corpus: str, workdir: Path, limit: int = 0) -> list[str]:
    """The overrides that point collect at `corpus` (at most `limit` images; 0: all): `mnist` (the
    built-in digits with labels), `mnist-unlabelled`, `emoji` (built here by
    bench/build_emoji_corpus.py) or a folder of images."""
    if corpus in ("mnist", "mnist-unlabelled"):
        labels = ", labels: none" if corpus == "mnist-unlabelled" else ""
        return [f"collect.sources=[{{uri: 'builtin:mnist', limit: {limit}{labels}}}]", "data.mode=L"]
    folder = Path(corpus)
    if corpus == "emoji":
        from build_emoji_corpus import build_corpus

        folder = workdir / "emoji-images"
        if not folder.exists():
            build_corpus(folder, size=64)
    return [f"collect.sources=[{{uri: '{folder.resolve()}', limit: {limit}, labels: none}}]", "data.mode=RGB"]


def prepare_corpus(cfg: Params, ws: Workspace, ladder: bool = False) -> dict[str, Any]:
    """collect, clean and validate once; train the extractor (and, with `ladder`, compute the
    calibration ladder) here, so no generator's evaluation time includes them."""
    started = time.perf_counter()
    collect.run(cfg, ws)
    kept = int(clean.run(cfg, ws)["kept"])
    validate.run(cfg, ws)
    extractor = get_extractor(cfg, ws)
    if ladder and cfg.evaluate.calibration.enabled:
        ref, train_set = load_reference(cfg, ws, extractor)
        calibration.load_or_compute(cfg, ws, extractor, ref, train_set)
    return {"clean_images": kept, "extractor": extractor.kind, "seconds": round(time.perf_counter() - started, 1)}


def print_table(rows: list[dict[str, Any]], header: list[str]) -> None:
    """`rows` as left-aligned columns under `header` (a missing cell prints as -)."""
    cells = [[("-" if r.get(h) is None else str(r[h])) for h in header] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
