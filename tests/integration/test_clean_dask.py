"""clean on Dask's real scheduler and workers on 127.0.0.1, through Prefect's DaskTaskRunner: the
same manifest as one process, with a local cluster genloop starts and with a running cluster at
parallel.address, and nothing lost when a worker is killed mid-chunk."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from genloop.core import chunk_map
from tests.data.test_clean_parallel import build_corpus, clean_with, outputs

distributed = pytest.importorskip("distributed")


@pytest.fixture
def cluster() -> Iterator[distributed.LocalCluster]:
    """A Dask scheduler and two single-threaded worker processes (each under a nanny that restarts it)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as c:
        yield c


def test_clean_on_a_local_dask_cluster_matches_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.mode auto on a corpus that turns colour part-way: the grey pass stops at the first chunk
    with colour (the rest of its chunks cancelled on the cluster), then every file is cleaned in RGB,
    both passes on the one local cluster the stage started."""
    started: list[chunk_map._LocalCluster] = []

    class Counted(chunk_map._LocalCluster):
        def run(self) -> None:
            started.append(self)
            super().run()

    monkeypatch.setattr(chunk_map, "_LocalCluster", Counted)
    src = tmp_path / "src"
    build_corpus(src, 60, colour_from=40)
    one, _ = clean_with(tmp_path, src, "serial", "auto", "parallel.engine=serial")
    dask, summary = clean_with(tmp_path, src, "dask", "auto", "parallel.engine=dask", "parallel.workers=2",
                               "parallel.chunk_size=8")
    assert len(started) == 1 and started[0].cluster is not None
    manifest, report, images = outputs(dask)
    manifest_1, report_1, images_1 = outputs(one)
    pd.testing.assert_frame_equal(manifest, manifest_1)
    assert np.array_equal(images, images_1) and report["dropped_files"] == report_1["dropped_files"]
    assert report["mode"] == "RGB"
    assert summary["decoded"] >= report["raw"] > 60  # every file in RGB, plus the grey chunks before the colour


def test_a_dask_worker_killed_mid_chunk_loses_nothing(tmp_path: Path, cluster: distributed.LocalCluster) -> None:
    src = tmp_path / "src"
    build_corpus(src, 1200, colour_from=None)
    one, _ = clean_with(tmp_path, src, "serial", "L", "parallel.engine=serial")
    with distributed.Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
    cache = tmp_path / "dask" / ".genloop" / "cache" / "clean"
    finished = threading.Event()
    killed: list[int] = []

    def kill_a_worker_once_chunks_land() -> None:
        while not finished.is_set():
            if cache.exists() and sum(1 for _ in cache.rglob("*.npy")) >= 2:  # two chunks' shards written
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_worker_once_chunks_land, daemon=True)
    killer.start()
    try:
        dask, summary = clean_with(tmp_path, src, "dask", "L", "parallel.engine=dask",
                                   f"parallel.address={cluster.scheduler_address}", "parallel.chunk_size=20")
    finally:
        finished.set()
        killer.join()
    assert killed, "the run ended before a worker could be killed: make the corpus larger"
    assert summary["decoded"] == summary["raw"]  # every file once in the index, whatever ran twice
    manifest, report, images = outputs(dask)
    manifest_1, report_1, images_1 = outputs(one)
    pd.testing.assert_frame_equal(manifest, manifest_1)
    assert np.array_equal(images, images_1) and report["dropped_files"] == report_1["dropped_files"]
