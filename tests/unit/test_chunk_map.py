"""genloop.core.chunk_map on this machine: results in chunk order from every local engine, and a
process pool whose worker dies mid-chunk runs the unfinished chunks again and loses nothing."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest

from genloop.core.chunk_map import _chunk_module, _LocalCluster, chunk_map, chunked, dask_settings
from genloop.core.config import ParallelParams
from genloop.core.errors import GenloopError


def square_all(chunk: list[int]) -> list[int]:
    return [x * x for x in chunk]


def die_once(marker: Path, chunk: list[int]) -> list[int]:
    """Kills its own process (as an out-of-memory kill would) the first time it sees 7."""
    if 7 in chunk and not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(9)
    return square_all(chunk)


def always_die(chunk: list[int]) -> list[int]:
    os._exit(9)


def test_chunked_keeps_every_item_in_order() -> None:
    assert chunked(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunked([], 3) == []


@pytest.mark.parametrize("engine", ["serial", "processes"])
def test_every_local_engine_returns_the_results_in_chunk_order(engine: str) -> None:
    seen: list[list[int]] = []
    chunks = chunked(list(range(50)), 4)
    out = chunk_map(square_all, chunks, ParallelParams(engine=engine, workers=2), seen.append)
    assert out == [square_all(c) for c in chunks]
    assert sorted(map(tuple, seen)) == sorted(map(tuple, out))  # each result reported once


def test_a_worker_that_dies_mid_chunk_costs_a_rerun_not_a_result(tmp_path: Path) -> None:
    marker = tmp_path / "died"
    chunks = chunked(list(range(40)), 3)
    out = chunk_map(partial(die_once, marker), chunks, ParallelParams(engine="processes", workers=2))
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker died, not this process
    assert out == [square_all(c) for c in chunks]


def test_a_worker_that_keeps_dying_is_a_clear_error() -> None:
    with pytest.raises(GenloopError, match="died twice.*nothing was published.*parallel.workers"):
        chunk_map(always_die, chunked(list(range(8)), 2), ParallelParams(engine="processes", workers=2))


@pytest.mark.parametrize("engine", ["serial", "processes"])
def test_stop_ends_the_map_early_and_returns_only_finished_chunks_in_order(engine: str) -> None:
    chunks = chunked(list(range(200)), 2)
    out = chunk_map(square_all, chunks, ParallelParams(engine=engine, workers=2),
                    stop=lambda squares: 16 in squares)  # the chunk [4, 5]
    assert [9, 16] not in out and [16, 25] in out
    assert len(out) < len(chunks)  # the rest was cancelled
    assert all(r in [square_all(c) for c in chunks] for r in out)
    assert out == sorted(out)  # chunk order


def test_the_dask_worker_settings_change_only_what_they_name() -> None:
    """Applied as dotted keys: the nanny spawns workers without MALLOC_TRIM_THRESHOLD_ (so glibc keeps
    its own mmap threshold) and with the profiler off, and the rest of Dask's settings stay."""
    import dask
    from distributed.nanny import _get_env_variables

    before = dask.config.get("distributed.scheduler.work-stealing")
    assert "MALLOC_TRIM_THRESHOLD_" in _get_env_variables("distributed.nanny.pre-spawn-environ")
    with dask.config.set(dask_settings()):
        spawn_env = _get_env_variables("distributed.nanny.pre-spawn-environ")
        assert "MALLOC_TRIM_THRESHOLD_" not in spawn_env and spawn_env["OMP_NUM_THREADS"] == "1"
        assert dask.config.get("distributed.worker.profile.enabled") is False
        assert dask.config.get("distributed.worker.profile.interval") == "10ms"  # a sibling left alone
        assert dask.config.get("distributed.scheduler.work-stealing") == before
    assert dask.config.get("distributed.worker.profile.enabled") is True


def test_the_local_cluster_preloads_the_module_of_the_function_inside_the_partials() -> None:
    assert _chunk_module(partial(partial(die_once, Path("marker")), [1])) == __name__


def test_a_local_cluster_that_cannot_start_names_the_cause_in_the_caller() -> None:
    """The cluster starts in a thread of its own; what stopped it is raised where the address is needed."""
    cluster = _LocalCluster(1, "genloop_module_that_does_not_exist")
    try:
        with pytest.raises(GenloopError, match="did not start.*ModuleNotFoundError.*genloop_module_that_does_not"):
            cluster.address()
    finally:
        cluster.close()


def test_dask_lines_below_warning_stay_out_and_a_stricter_level_stays() -> None:
    """Under a Prefect flow run Dask's INFO records reach Prefect's root handlers: genloop's local
    cluster raises Dask's logger to WARNING, and leaves a level already above it alone."""
    import logging

    from genloop.core.chunk_map import _quiet_dask

    dask_log = logging.getLogger("distributed")
    before = dask_log.level
    try:
        dask_log.setLevel(logging.INFO)
        _quiet_dask()
        assert dask_log.level == logging.WARNING
        dask_log.setLevel(logging.ERROR)
        _quiet_dask()
        assert dask_log.level == logging.ERROR
    finally:
        dask_log.setLevel(before)


MAIN_SCRIPT = '''
import os, sys
from pathlib import Path
if __name__ != "__main__":  # run again inside a worker, as multiprocessing does by default
    Path(os.environ["MAIN_MARKS"], str(os.getpid())).write_text(__name__)
else:
    from genloop.core.chunk_map import chunk_map
    from genloop.core.config import ParallelParams
    print(chunk_map(len, [[1, 2], [3], [4, 5, 6]], ParallelParams(engine="processes", workers=2)))
'''


def test_pool_workers_do_not_run_the_callers_main_module_again(tmp_path: Path) -> None:
    """A deployment's main module is prefect.engine (all of Prefect) and the CLI's is genloop's CLI:
    a worker imports what its chunks need, not them."""
    import subprocess
    import sys

    script, marks = tmp_path / "main_script.py", tmp_path / "marks"
    script.write_text(MAIN_SCRIPT)
    marks.mkdir()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MAIN_MARKS": str(marks)}, check=True)
    assert done.stdout.strip() == "[2, 1, 3]"
    assert list(marks.iterdir()) == []
