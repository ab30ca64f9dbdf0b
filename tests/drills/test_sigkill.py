"""SIGKILL mid-work: `genloop collect`, `genloop clean` and `genloop generate` are killed (the
whole process group, as a crashed machine or an OOM kill would) while they work, then rerun.
The rerun must end where an uninterrupted run ends, with nothing lost and nothing doubled:
every ledger row names a file that exists, every file under data/raw is in the ledger, no
sha256 twice; the same manifest and clean images; the same generated batch. A kill at the swap
of data/clean leaves data/clean in place (the previous folder or the new one, complete), never
missing. (train has its own kill-and-resume test in tests/model/test_training.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from genloop.core.config import Params, load_params
from genloop.core.manifest import read_ledger
from genloop.core.workspace import Workspace
from genloop.stages import clean, collect, generate
from tests.drills.test_injected_faults import (
    DiskFull,
    copy_workspace,
    git_dvc_workspace,
    model_workspace,
    snapshot,
    temp_leftovers,
)
from tests.helpers import BIN, cli_env, run_cli


def start(cmd: list[str], ws: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """The command in its own process group (so that the kill takes its children too)."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=ws, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool], log: Path, timeout: float = 300) -> None:
    """SIGKILL the process group as soon as `ready()` (evidence of work in progress) holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} ended (rc {proc.returncode}) before it could be killed mid-work:\n"
                        f"{log.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"no work in progress seen within {timeout} s"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def files_in(folder: Path, pattern: str = "*") -> int:
    try:
        return sum(1 for p in folder.rglob(pattern) if p.is_file())
    except FileNotFoundError:  # the folder went away while counting
        return 0


def assert_nothing_lost_or_doubled(ws: Workspace) -> pd.DataFrame:
    ledger = read_ledger(ws.ledger)
    assert ledger["sha256"].is_unique, "a file was collected twice"
    on_disk = {p.relative_to(ws.raw).as_posix() for p in ws.raw.rglob("*") if p.is_file()}
    assert on_disk == set(ledger["file"]), (on_disk ^ set(ledger["file"]))
    return ledger


GENLOOP = str(BIN / "genloop")


def test_collect_killed_while_staging_and_during_dvc_add_then_rerun(tmp_path: Path) -> None:
    overrides = ["collect.sources=[{uri: 'builtin:mnist', limit: 800}]"]
    reference = Workspace.at(tmp_path / "reference")
    collect.run(load_params(None, [*overrides, "collect.dvc_add=false"]), reference)  # uninterrupted

    ws = Workspace.at(git_dvc_workspace(tmp_path / "ws", overrides))
    env = cli_env(ws.root)
    staging = ws.cache / "collect-staging"

    # 1. killed while the files are being read and staged: nothing may be published
    log = tmp_path / "collect-1.log"
    proc = start([GENLOOP, "collect"], ws.root, env, log)
    kill_when(proc, lambda: files_in(staging, "*.png") >= 50, log)
    assert not ws.ledger.exists() and not ws.data_dvc.exists()
    assert files_in(ws.raw) == 0

    # 2. killed while `dvc add data/raw data/ledger.parquet` runs (the files and the ledger are published)
    log = tmp_path / "collect-2.log"
    proc = start([GENLOOP, "collect"], ws.root, env, log)
    kill_when(proc, lambda: ws.ledger.exists(), log)
    assert not ws.data_dvc.exists()
    assert_nothing_lost_or_doubled(ws)

    # 3. the rerun completes: the same ledger and files as the uninterrupted run
    done = run_cli([GENLOOP, "collect"], ws.root, env, timeout=300)
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    ledger = assert_nothing_lost_or_doubled(ws)
    expected = read_ledger(reference.ledger)
    pd.testing.assert_frame_equal(ledger.drop(columns="collected_at"), expected.drop(columns="collected_at"))
    assert len(ledger) == 800 and summary["total"] == 800
    assert snapshot(ws.root, "data/raw") == snapshot(reference.root, "data/raw")
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "data.dvc", "data/ledger.parquet.dvc"],
                            cwd=ws.root,
                            env=env, capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout.strip() == "{}", status.stdout + status.stderr
    assert temp_leftovers(ws.raw) == []
    assert [p.name for p in staging.iterdir()] == []  # the killed runs' staging folders were removed


def kill_at_swap(target: Path, when: str, exchange: bool = True) -> tuple[list[str], dict[str, str]]:
    """`genloop` that SIGKILLs itself at the first rename (or atomic exchange) that moves `target`
    or puts something in its place: just `before` it or just `after` it (in-process fault
    injection at the OS boundary: the crash lands exactly in the swap). With exchange=False the
    filesystem is made to refuse RENAME_EXCHANGE (EINVAL), so the swap falls back to two renames."""
    prelude = (
        "import errno, os, signal, sys\n"
        "import genloop.core.storage as storage\n"
        "target, when = os.environ['KILL_AT_SWAP_OF'], os.environ['KILL_AT_SWAP_WHEN']\n"
        "def hook(real):\n"
        "    def call(src, dst, *a, **kw):\n"
        "        hit = target in (os.fspath(src), os.fspath(dst))\n"
        "        if hit and when == 'before':\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        out = real(src, dst, *a, **kw)\n"
        "        if hit:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return out\n"
        "    return call\n"
        "def cannot_exchange(a, b):\n"
        "    raise OSError(errno.EINVAL, 'RENAME_EXCHANGE not supported here')\n"
        "if os.environ['KILL_AT_SWAP_EXCHANGE'] == '0':\n"
        "    storage._exchange = cannot_exchange\n"
        "os.replace, os.rename, storage._exchange = hook(os.replace), hook(os.rename), hook(storage._exchange)\n"
        "sys.argv[0] = 'genloop'\n"
        "from genloop.cli.main import main\n"
        "main()\n"
    )
    env = {"KILL_AT_SWAP_OF": str(target), "KILL_AT_SWAP_WHEN": when, "KILL_AT_SWAP_EXCHANGE": str(int(exchange))}
    return [sys.executable, "-c", prelude], env


def killed_clean(ws: Workspace, env: dict[str, str], when: str, exchange: bool = True) -> None:
    cmd, extra = kill_at_swap(ws.clean, when, exchange)
    done = subprocess.run(cmd + ["clean"], cwd=ws.root, capture_output=True, text=True, env={**env, **extra},
                          timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]


def leftovers(ws: Workspace) -> list[str]:
    """What the killed runs left beside the outputs: staged temporaries by output name, `old` for a
    folder moved aside by a swap that was not atomic."""
    return sorted("old" if p.endswith(".old") else Path(p).name.split(".")[1] for p in temp_leftovers(ws.root))


def test_clean_killed_mid_decode_and_mid_swap_then_rerun(tmp_path: Path) -> None:
    overrides = ["collect.dvc_add=false", "collect.sources=[{uri: 'builtin:mnist', limit: 1200}]"]
    cfg = load_params(None, overrides)
    ws = Workspace.at(git_dvc_workspace(tmp_path / "ws", overrides))
    collect.run(cfg, ws)
    first = Workspace.at(shutil.copytree(ws.root, tmp_path / "first"))
    clean.run(cfg, first)  # uninterrupted
    clean_out, outputs = ("data/clean",), ("data/clean", "data/manifest.parquet", "reports/clean.json")
    env = cli_env(ws.root)

    # 1. killed while decoding: nothing published
    log = tmp_path / "clean-1.log"
    proc = start([GENLOOP, "clean"], ws.root, env, log)
    kill_when(proc, lambda: files_in(ws.cache / "clean", "*.npy") >= 1, log)  # a chunk's shard is written
    assert snapshot(ws.root, *outputs) == {}
    run_cli([GENLOOP, "clean"], ws.root, env, timeout=300)
    previous = snapshot(ws.root, *outputs)
    assert {k: v for k, v in previous.items() if not k.startswith("reports")} == snapshot(
        first.root, "data/clean", "data/manifest.parquet")

    # 100 more raw images: the next clean publishes another data/clean (the uninterrupted result: `second`)
    collect.run(load_params(None, [*overrides[:1], "collect.sources=[{uri: 'builtin:mnist', limit: 1300}]"]), ws)
    second = Workspace.at(shutil.copytree(ws.root, tmp_path / "second"))
    clean.run(cfg, second)
    new = snapshot(second.root, *outputs)
    assert snapshot(second.root, *clean_out) != snapshot(ws.root, *clean_out)
    before, after = ({f.name for f in w.clean.iterdir()} for w in (ws, second))
    # the previous shards, and one more holding the 100 new images (the only ones decoded)
    assert before < after and len(after - before) == 1
    assert json.loads(second.report("clean").read_text())["decoded"] == 100

    # 2. killed at the swap of data/clean, just before it: at that instant data/clean is the previous output
    killed_clean(ws, env, "before")
    assert snapshot(ws.root, *outputs) == previous
    assert leftovers(ws) == ["clean", "clean", "manifest"]  # the killed run's staged folder, report, manifest

    # 3. killed just after the swap (one atomic RENAME_EXCHANGE): data/clean is the new folder, complete;
    #    it was never missing. The manifest and report renames had not run yet: still the previous ones
    killed_clean(ws, env, "after")
    assert snapshot(ws.root, *clean_out) == snapshot(second.root, *clean_out)
    assert snapshot(ws.root, "data/manifest.parquet", "reports/clean.json") == {
        k: previous[k] for k in ("data/manifest.parquet", "reports/clean.json")}
    assert leftovers(ws) == ["clean", "clean", "manifest"]  # the previous folder, swapped out, and the staged files
    run_cli([GENLOOP, "clean"], ws.root, env, timeout=300)
    assert snapshot(ws.root, *outputs[:2]) == snapshot(second.root, *outputs[:2])
    assert temp_leftovers(ws.root) == []  # the killed runs' temporaries were swept
    print(f"\n[SIGKILL clean] at the swap: data/clean present at once (previous {len(previous) - 2} files before it,"
          f" the complete new {len(new) - 2} files after it)")


def test_clean_killed_mid_swap_where_renames_cannot_exchange_restores_at_the_next_start(tmp_path: Path) -> None:
    """The fallback where the filesystem refuses RENAME_EXCHANGE: two renames, and a run killed
    between them leaves data/clean missing and `.clean.old`; the next start of clean puts it back
    before anything else, even a run that then fails (a full disk)."""
    overrides = ["collect.dvc_add=false", "collect.sources=[{uri: 'builtin:mnist', limit: 300}]"]
    cfg = load_params(None, overrides)
    ws = Workspace.at(git_dvc_workspace(tmp_path / "ws", overrides))
    collect.run(cfg, ws)
    clean.run(cfg, ws)
    outputs = ("data/clean", "data/manifest.parquet", "reports/clean.json")
    previous = snapshot(ws.root, *outputs)
    env = cli_env(ws.root)

    killed_clean(ws, env, "after", exchange=False)  # the old folder moved aside, the new one not yet in
    assert not ws.clean.exists() and (ws.clean.parent / ".clean.old").is_dir()
    assert leftovers(ws) == ["clean", "clean", "manifest", "old"]
    with pytest.MonkeyPatch.context() as mp, pytest.raises(OSError):  # a rerun that fails (disk full)...
        DiskFull(mp, ws.root, after=0)
        clean.run(cfg, ws)
    assert snapshot(ws.root, *outputs) == previous  # ...has put the previous data/clean back first
    assert not (ws.clean.parent / ".clean.old").exists()
    run_cli([GENLOOP, "clean"], ws.root, env, timeout=300)
    assert snapshot(ws.root, *outputs[:2]) == {k: v for k, v in previous.items() if not k.startswith("reports")}
    assert temp_leftovers(ws.root) == []


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Params]:
    return model_workspace(tmp_path_factory)


def test_generate_killed_mid_batch_then_rerun(trained: tuple[Path, Params], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "GENLOOP_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    ws = copy_workspace(trained[0], tmp_path / "ws")
    cfg = trained[1].model_copy(deep=True)
    first = generate.run(cfg, ws)  # the previous batch
    version = first["model_version"]
    outputs = (f"outputs/generated/{version}", "reports/generate.json")
    before = snapshot(ws.root, *outputs)

    sets = ["--set", "generate.n=2000", "--set", "generate.batch_size=100", "--set", "generate.seed=7"]
    big = cfg.model_copy(deep=True)
    big.generate.n, big.generate.batch_size, big.generate.seed = 2000, 100, 7
    reference = copy_workspace(ws.root, tmp_path / "reference")
    generate.run(big, reference)  # uninterrupted

    env = cli_env(ws.root)
    log = tmp_path / "generate.log"
    proc = start([GENLOOP, "generate", *sets], ws.root, env, log)
    kill_when(proc, lambda: any(files_in(d, "*.png") >= 20 for d in ws.generated.glob(f".{version}.*.tmp")), log)
    assert snapshot(ws.root, *outputs) == before  # the previous batch and report, untouched
    # out of sight: the killed run's half-written batch, and its copy of the champion for the workers
    left = temp_leftovers(ws.root)
    assert [Path(p).parent.as_posix() for p in left] == [".genloop/cache/generate", "outputs/generated"], left

    run_cli([GENLOOP, "generate", *sets], ws.root, env, timeout=300)
    assert snapshot(ws.root, outputs[0]) == snapshot(reference.root, outputs[0])
    report, expected = (json.loads((w.root / outputs[1]).read_text()) for w in (ws, reference))
    assert {**report, "folder": None} == {**expected, "folder": None} and report["n"] == 2000
    assert temp_leftovers(ws.root) == []  # the killed run's temporary folder was swept
    print("\n[SIGKILL generate] killed mid-batch: previous batch untouched; rerun wrote the uninterrupted batch "
          "(2000 images, byte-identical), the killed run's temp folder swept")
