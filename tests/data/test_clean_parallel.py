"""clean over a process pool, chunk by chunk: the same manifest, report and data/clean as one
process, for a grey corpus with bad files and for a colour corpus in data.mode=auto."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from genloop.core.config import load_params
from genloop.core.manifest import read_manifest
from genloop.core.shards import manifest_images
from genloop.core.workspace import Workspace
from genloop.stages import clean, collect
from tests.data.test_clean import make_zoo, noise_png


def build_corpus(src: Path, n: int, colour_from: int | None) -> None:
    """The clean zoo (bad and awkward files) plus `n` noise images, in colour from `colour_from` on."""
    make_zoo(src)
    for i in range(n):
        mode = "RGB" if colour_from is not None and i >= colour_from else "L"
        (src / f"extra_{i:04d}.png").write_bytes(noise_png(1000 + i, size=40, mode=mode))


def clean_with(tmp_path: Path, src: Path, name: str, mode: str, *parallel: str) -> tuple[Workspace, dict]:
    ws = Workspace.at(tmp_path / name)
    cfg = load_params(None, [f"data.mode={mode}", "collect.dvc_add=false", f"collect.sources=['{src}']",
                             "data.resolution=32", "clean.near_duplicate_distance=4", *parallel])
    collect.run(cfg, ws)
    return ws, clean.run(cfg, ws)


def outputs(ws: Workspace) -> tuple[pd.DataFrame, dict, np.ndarray]:
    """The manifest without the shard and offset columns (those follow the chunking), the report,
    and the images in manifest order."""
    report = json.loads(ws.report("clean").read_text())
    manifest = read_manifest(ws.manifest)
    return manifest.drop(columns=["shard", "offset"]), report, manifest_images(ws.clean, manifest)


@pytest.mark.parametrize(("mode", "colour_from"), [("L", None), ("auto", 90)])
def test_clean_on_a_process_pool_publishes_what_one_process_does(tmp_path: Path, mode: str,
                                                                 colour_from: int | None) -> None:
    src = tmp_path / "src"
    build_corpus(src, 120, colour_from)
    one, _ = clean_with(tmp_path, src, "serial", mode, "parallel.engine=serial")
    pool, summary = clean_with(tmp_path, src, "pool", mode, "parallel.engine=processes", "parallel.workers=2",
                               "parallel.chunk_size=9")
    manifest, report, images = outputs(pool)
    manifest_1, report_1, images_1 = outputs(one)
    pd.testing.assert_frame_equal(manifest, manifest_1)
    assert np.array_equal(images, images_1)
    # a shard per chunk: the serial run's one chunk of 512 files, the pool's chunks of 9 files
    assert len(list(one.clean.iterdir())) == 1
    assert len(list(pool.clean.iterdir())) >= len(manifest) / 9
    assert report["dropped_files"] == report_1["dropped_files"] and report["mode"] == report_1["mode"]
    assert report["mode"] == ("RGB" if colour_from is not None else "L")
    assert summary["kept"] == len(manifest) > 100
    assert report["dropped"] >= 10  # the zoo's bad files, each with its reason
    # a second run decodes nothing: the per-file cache the chunks wrote is the one clean reads
    _, again = clean_with(tmp_path, src, "pool", mode, "parallel.engine=processes", "parallel.workers=2",
                          "parallel.chunk_size=9")
    assert again["decoded"] == 0 and again["kept"] == summary["kept"]
