"""One function mapped over chunks of work, on the engine `parallel.engine` names.

- `serial`: in this process.
- `processes`: a pool of one process per core on this machine (spawned, so a parent that has
  loaded torch or started threads is never forked, and without running the parent's main module
  again: `_workers_skip_main`). A pool whose worker dies is replaced once and
  the chunks that had not come back run again.
- `dask`: a Prefect flow run (`genloop-chunks`) whose `DaskTaskRunner` holds the scheduler at
  `parallel.address` or a `LocalCluster` of `parallel.workers` processes on 127.0.0.1 started for
  the stage (`Engine`: started in the background while Prefect loads, its workers preloaded with
  the chunk's module, and kept for the stage's later maps); every chunk is a Dask task submitted
  through the runner's client, and the flow run logs their progress. Dask reruns the chunks of a
  worker that dies on another worker.

The chunk function is the same for all three and for every entry point (the CLI, `dvc repro`,
the Prefect flow): it must be a picklable module-level function (or a `functools.partial` of
one), must write its side outputs atomically so that a chunk done twice leaves what one run
leaves, and returns its results; the caller publishes them only when every chunk has come back,
so the outputs stay a set whatever died on the way.

Results come back in chunk order; `on_result` sees each as it arrives (progress). With `stop`,
the map ends early once a result satisfies it: chunks not yet started are cancelled, the ones
running finish, and only the chunks that finished come back (still in chunk order).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from genloop.core.errors import GenloopError
from genloop.core.logs import NOT_ON_CONSOLE

if TYPE_CHECKING:  # a Dask worker imports this module: pydantic's 0.2 s stay out of its start
    from genloop.core.config import ParallelParams

C = TypeVar("C")
R = TypeVar("R")
log = logging.getLogger(__name__)

FLOW_LOG_LINES = 20  # progress lines in the chunks' flow run, at most
POOL_ATTEMPTS = 2  # a process pool broken by a dead worker is replaced once
GRAPH_BATCH = 16  # chunks per graph the Dask client sends to the scheduler
DASK_WORKERS_CONFIG = Path(__file__).with_name("dask_workers.yaml")  # why each setting: see the file


def dask_settings(path: Path = DASK_WORKERS_CONFIG) -> dict[str, Any]:
    """The file's settings as dotted keys, the form `dask.config.set` assigns one by one (a nested
    dict would replace the whole `distributed` section)."""
    def flat(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
        return out

    return flat(yaml.safe_load(path.read_text()), "")


def chunked(items: Sequence[C], size: int) -> list[list[C]]:
    """`items` cut into consecutive lists of at most `size`."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def chunk_map(fn: Callable[[C], R], chunks: Sequence[C], settings: ParallelParams,
              on_result: Callable[[R], None] | None = None, stop: Callable[[R], bool] | None = None) -> list[R]:
    """`[fn(c) for c in chunks]` on the engine `settings` names; see the module docstring."""
    if not chunks:
        return []
    with Engine(settings, fn) as engine:
        return engine.map(fn, chunks, on_result, stop)


class Engine:
    """The engine `settings` names, held over the maps of one stage: with engine dask and no
    `parallel.address`, the first map starts a local cluster (in the background while Prefect opens
    the flow run; its workers preloaded with `chunk_fn`'s module), every later map of the stage runs
    on it (clean in data.mode auto maps twice), and leaving the engine closes it. A stage with
    nothing to map starts nothing (a cluster started up front cost a no-op clean 1.5 s at 100k
    files). The other engines hold nothing."""

    def __init__(self, settings: ParallelParams, chunk_fn: Callable[..., Any]) -> None:
        self.settings = settings
        self._preload = _chunk_module(chunk_fn)
        self._local: _LocalCluster | None = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None

    def map(self, fn: Callable[[C], R], chunks: Sequence[C], on_result: Callable[[R], None] | None = None,
            stop: Callable[[R], bool] | None = None) -> list[R]:
        """`chunk_map(fn, chunks, settings, on_result, stop)` on this engine (entered)."""
        report = on_result or (lambda _r: None)
        until = stop or (lambda _r: False)
        if not chunks:
            return []
        if self.settings.engine == "dask":
            if self.settings.address is None and self._local is None:
                self._local = _LocalCluster(self.settings.worker_count(), self._preload)
            return _dask(fn, chunks, self._scheduler, report, until)
        return _local_map(fn, chunks, self.settings, report, until)

    def _scheduler(self) -> str:
        """The Dask scheduler's address: `parallel.address`, or the local cluster's once it is up."""
        return self._local.address() if self._local is not None else str(self.settings.address)


def _local_map(fn: Callable[[C], R], chunks: Sequence[C], settings: ParallelParams, report: Callable[[R], None],
               until: Callable[[R], bool]) -> list[R]:
    """The chunks in this process (serial, or one worker) or on a process pool."""
    workers = min(settings.worker_count(), len(chunks))
    if settings.engine == "serial" or workers <= 1:
        results = []
        for c in chunks:
            results.append(fn(c))
            report(results[-1])
            if until(results[-1]):
                break
        return results
    return _processes(fn, chunks, workers, report, until)


def _processes(fn: Callable[[C], R], chunks: Sequence[C], workers: int, report: Callable[[R], None],
               until: Callable[[R], bool]) -> list[R]:
    results: dict[int, R] = {}
    for attempt in range(1, POOL_ATTEMPTS + 1):
        todo = [i for i in range(len(chunks)) if i not in results]
        try:
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
                with _workers_skip_main(_chunk_module(fn)):  # the pool spawns its workers on submit
                    pending: dict[Future[R], int] = {pool.submit(fn, chunks[i]): i for i in todo}
                stopping = False
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        i = pending.pop(future)
                        if future.cancelled():
                            continue
                        results[i] = future.result()
                        report(results[i])
                        if not stopping and until(results[i]):
                            stopping = True
                            for f in pending:
                                f.cancel()  # not started: dropped; running: finishes and comes back
            break
        except BrokenProcessPool as exc:
            left = len(chunks) - len(results)
            if attempt == POOL_ATTEMPTS:
                raise GenloopError(f"a worker process died twice ({exc}); {left} of {len(chunks)} chunks did not "
                                   "finish and nothing was published. Look for an out-of-memory kill (dmesg) and "
                                   "lower parallel.workers or parallel.chunk_size") from None
            log.warning("a worker process died (%s); running the %d unfinished chunks again", exc, left)
    return [results[i] for i in sorted(results)]


_MAIN_LOCK = threading.Lock()


@contextmanager
def _workers_skip_main(chunk_module: str) -> Iterator[None]:
    """While worker processes are spawned here, this process's main module looks anonymous to
    multiprocessing, so that a worker does not import it again before its first chunk: under a
    deployment that module is `prefect.engine` (all of Prefect: about 2 s of CPU per worker on 2
    cores), under the CLI genloop's CLI (0.4 s). The chunks never need it: their function lives in
    a module of its own (a chunk function of the main module keeps multiprocessing's default)."""
    main = sys.modules.get("__main__")
    if main is None or chunk_module == "__main__":
        yield
        return
    with _MAIN_LOCK:  # one save and restore at a time
        spec, names = main.__spec__, vars(main)
        file = names.pop("__file__", None)
        main.__spec__ = None
        try:
            yield
        finally:
            main.__spec__ = spec
            if file is not None:
                names["__file__"] = file


class _Boxed:
    """A chunk as one opaque object for Dask: Dask looks through list arguments for futures to
    resolve, and would pickle and hash a whole chunk to name its task (8 s for 13 chunks of 8,192);
    the box hides the items and its token is drawn once, at random."""

    __slots__ = ("items", "token")

    def __init__(self, items: object) -> None:
        self.items = items
        self.token = uuid.uuid4().hex

    def __dask_tokenize__(self) -> str:
        return self.token

    def __getstate__(self) -> object:
        return (self.items, self.token)

    def __setstate__(self, state: tuple[object, str]) -> None:
        self.items, self.token = state


def _run_chunk(fn: Callable[[C], R], chunk: _Boxed) -> R:
    return fn(chunk.items)  # type: ignore[arg-type]


def _quiet_dask() -> None:
    """Dask's own lines below WARNING in this process (a dozen per worker as a cluster starts and
    stops) stay out of genloop's output: `silence_logs` quiets only Dask's handlers, and under a
    Prefect flow run the records reach Prefect's handlers on the root logger. The local cluster's
    workers run it too, as this module's `dask_setup`."""
    dask_log = logging.getLogger("distributed")
    if dask_log.getEffectiveLevel() < logging.WARNING:
        dask_log.setLevel(logging.WARNING)


def dask_setup(worker: object) -> None:
    """Dask's hook for a preloaded module, run as a worker starts (this module is preloaded in
    genloop's local cluster): the worker's lines below WARNING stay out of the output too."""
    _quiet_dask()


def _prefect_api_url() -> str:
    """The Prefect API the flow run reports to: PREFECT_API_URL when set, else the temporary server
    of this process (started here if the caller runs outside a flow)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return str(PREFECT_API_URL.value())
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # Prefect's own ephemeral server: one per process, stopped at exit
    if not server.running:  # the first map of this process starts it
        server.start()
        # stopped before Prefect's own stop at exit (atexit runs the last registered first), and
        # without Prefect's INFO line: by then the console's stream may be closed (pytest's capture)
        atexit.register(_stop_quietly, server)
    return server.api_url


def _stop_quietly(server: Any) -> None:
    """`server.stop()` with the `prefect` logger at WARNING meanwhile (the level restored after)."""
    logger = logging.getLogger("prefect")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        server.stop()
    finally:
        logger.setLevel(level)


def _chunk_module(fn: Callable[..., Any]) -> str:
    """The module that defines `fn` (through `functools.partial`)."""
    while isinstance(fn, partial):
        fn = fn.func
    return fn.__module__


class _LocalCluster(threading.Thread):
    """A `LocalCluster` of `workers` processes on 127.0.0.1, started in the background: its workers
    spawn and import this module and the chunk's while this process imports Prefect and opens the
    flow run (on 2 cores 1.0 s of start and 0.4 s of first-chunk imports, off the critical path)."""

    def __init__(self, workers: int, preload: str) -> None:
        super().__init__(name="genloop-dask-start", daemon=True)
        self.workers, self.preload = workers, preload
        self.cluster: Any = None
        self.error: BaseException | None = None
        import distributed  # noqa: F401  # here, in the caller's thread: no import in the start thread races Prefect's
        self.start()

    def run(self) -> None:
        import dask
        from distributed import LocalCluster  # imported by __init__ already

        _quiet_dask()
        try:
            # the nannies pass the settings on to the workers they spawn
            with dask.config.set(dask_settings()), _workers_skip_main(self.preload):
                self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                            host="127.0.0.1", dashboard_address=None, preload=[__name__, self.preload],
                                            silence_logs=logging.WARNING)
        except BaseException as exc:  # handed to the caller's thread by `address()`
            self.error = exc

    def address(self) -> str:
        """The scheduler's address once the cluster is up; its start's error, raised here."""
        self.join()
        if self.error is not None:
            cause: BaseException = self.error
            while (cause.__cause__ or cause.__context__) is not None:
                cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
            raise GenloopError(f"the local Dask cluster of {self.workers} workers did not start: {self.error} "
                               f"({type(cause).__name__}: {cause}). A worker imports {self.preload} first; "
                               "Dask's log lines above say more") from self.error
        return str(self.cluster.scheduler_address)

    def close(self) -> None:
        """Stop the cluster from a thread of its own (not a daemon: Python waits for it before it
        exits), so that the caller goes on with the results while the workers stop (0.4 s on 2 cores)."""
        self.join()
        if self.cluster is not None:
            threading.Thread(target=self._close, name="genloop-dask-close").start()

    def _close(self) -> None:
        try:
            self.cluster.close()
        except Exception as exc:  # the results are in already; a worker left behind exits with its nanny
            log.warning("the local Dask cluster did not close cleanly: %s", exc)


def _dask(fn: Callable[[C], R], chunks: Sequence[C], scheduler: Callable[[], str],
          report: Callable[[R], None], until: Callable[[R], bool]) -> list[R]:
    """The chunks on the Dask cluster of a Prefect flow run's DaskTaskRunner, as plain Dask tasks
    submitted through the runner's client, with progress lines in the flow run's logs. Not one
    Prefect task per chunk: with Prefect's per-task engine and API work the engine took 1.79 x the
    time of local processes at 100k files on 2 cores, as Dask tasks 1.27 x (bench/README.md)."""
    from distributed import as_completed
    from prefect import flow
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect_dask import DaskTaskRunner

    api_url = _prefect_api_url()
    address = scheduler()  # after Prefect's API: a local cluster starts meanwhile
    results: dict[int, R] = {}

    # no parameters: Prefect imports fastapi to serialise a flow's parameters (0.3 s)
    @flow(name="genloop-chunks", task_runner=DaskTaskRunner(address=address), log_prints=False,
          persist_result=False, validate_parameters=False)
    def run_chunks() -> None:
        # the results stay out of the flow's return value, which Prefect walks looking for futures
        n, done = len(chunks), 0
        every = -(-n // FLOW_LOG_LINES)  # a line per chunk made 196 lines at 100k files, and work for the API
        # the runner's own client, connected on first use (prefect_dask.get_dask_client reads it
        # before that in a flow run, and fails, in prefect-dask 0.3.7)
        client = FlowRunContext.get().task_runner.client  # type: ignore[union-attr]
        # in graphs of GRAPH_BATCH chunks: the first tasks start while the rest are sent, and no graph
        # reaches Dask's 10 MB warning (196 chunks of 512 files made one of 13.7 MB)
        futures = client.map(partial(_run_chunk, fn), [_Boxed(c) for c in chunks], pure=False,
                             batch_size=GRAPH_BATCH)
        order = {f.key: i for i, f in enumerate(futures)}
        with client.as_current():  # as_completed looks for the current client
            # the results come with their futures, gathered on the client's loop as they finish
            for future, result in as_completed(futures, with_results=True):
                i = order[future.key]
                results[i] = result
                # genloop's logger: Prefect sends its lines to the flow run's logs (with
                # PREFECT_LOGGING_EXTRA_LOGGERS=genloop, as the CLI and the deployments set)
                done += 1
                if done % every == 0 or done == n:
                    log.info("%d of %d chunks done on the Dask cluster at %s", done, n, address,
                             extra=NOT_ON_CONSOLE)
                report(results[i])
                if until(results[i]):
                    client.cancel(futures)  # the chunks not started are dropped, the running ones end
                    break

    # No heartbeats for the chunks' flow run: its heartbeat thread sleeps in 1 s steps and the
    # run's end waits for it (0.5 s on average). The run lives inside the stage's process,
    # whose exit status (or the calling flow run's heartbeats, under a deployment) tells a
    # crash; a run that completes or fails is marked so either way.
    with temporary_settings({PREFECT_API_URL: api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        run_chunks()
    return [results[i] for i in sorted(results)]


def engine_summary(settings: ParallelParams) -> str:
    """A short description for logs and reports: `processes x2`, `dask at tcp://…`."""
    if settings.engine == "dask":
        return f"dask at {settings.address}" if settings.address else f"dask local cluster x{settings.worker_count()}"
    return "serial" if settings.engine == "serial" else f"processes x{settings.worker_count()}"

