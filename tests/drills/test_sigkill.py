"""SIGKILL mid-work: `genloop collect`, `genloop clean` and `genloop generate` are killed (the
whole process group, as a crashed machine or an OOM kill would) while they work, then rerun.
The rerun must end where an uninterrupted run ends, with nothing lost and nothing doubled:
every ledger row names a file that exists, every file under data/raw is in the ledger, no
sha256 twice; the same manifest and clean images; the same generated batch. (train has its
own kill-and-resume test in test_training.py.)"""

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

pytestmark = pytest.mark.integration


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
    on_disk = {p.relative_to(ws.raw).as_posix() for p in ws.raw.rglob("*") if p.is_file()} - {"ledger.parquet"}
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

    # 2. killed while `dvc add data/raw` runs (the files and the ledger are published)
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
    strip = lambda files: {k: v for k, v in files.items() if not k.endswith("ledger.parquet")}  # noqa: E731
    assert strip(snapshot(ws.root, "data/raw")) == strip(snapshot(reference.root, "data/raw"))
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "data.dvc"], cwd=ws.root,
                            env=env, capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout.strip() in ("{}", ""), status.stdout + status.stderr
    assert temp_leftovers(ws.raw) == []
    assert [p.name for p in staging.iterdir()] == []  # the killed runs' staging folders were removed


def kill_at_replace(target: Path) -> list[str]:
    """`genloop` that SIGKILLs itself just before it renames anything onto `target` (in-process
    fault injection at the OS boundary: the crash lands exactly in a commit window)."""
    prelude = (
        "import os, signal, sys\n"
        "real, target = os.replace, os.environ['KILL_AT_REPLACE_TO']\n"
        "def replace(src, dst, *a, **kw):\n"
        "    if os.fspath(dst) == target:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(src, dst, *a, **kw)\n"
        "os.replace = replace\n"
        "sys.argv[0] = 'genloop'\n"
        "from genloop.cli.main import main\n"
        "main()\n"
    )
    return [sys.executable, "-c", prelude]


def test_clean_killed_mid_decode_and_mid_swap_then_rerun(tmp_path: Path) -> None:
    overrides = ["collect.dvc_add=false", "collect.sources=[{uri: 'builtin:mnist', limit: 1200}]"]
    cfg = load_params(None, overrides)
    ws = Workspace.at(git_dvc_workspace(tmp_path / "ws", overrides))
    collect.run(cfg, ws)
    reference = Workspace.at(shutil.copytree(ws.root, tmp_path / "reference"))
    clean.run(cfg, reference)  # uninterrupted
    outputs = ("data/clean", "data/manifest.parquet")
    env = cli_env(ws.root)

    # 1. killed while decoding: nothing published
    log = tmp_path / "clean-1.log"
    proc = start([GENLOOP, "clean"], ws.root, env, log)
    kill_when(proc, lambda: files_in(ws.cache / "clean", "*.png") >= 50, log)
    assert snapshot(ws.root, *outputs, "reports/clean.json") == {}
    run_cli([GENLOOP, "clean"], ws.root, env, timeout=300)
    assert snapshot(ws.root, *outputs) == snapshot(reference.root, *outputs)
    before = snapshot(ws.root, *outputs, "reports/clean.json")

    # 2. killed between the two renames that swap data/clean (it is briefly absent), on a
    #    workspace with a previous output: the rerun restores and republishes it
    done = subprocess.run(kill_at_replace(ws.clean) + ["clean"], cwd=ws.root, capture_output=True, text=True,
                          env={**env, "KILL_AT_REPLACE_TO": str(ws.clean)}, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert not ws.clean.exists() and (ws.clean.parent / ".clean.old").is_dir()  # died mid-swap
    left = [Path(p).name.split(".")[1] if not p.endswith(".old") else "old" for p in temp_leftovers(ws.root)]
    assert sorted(left) == ["clean", "clean", "manifest", "old"]  # the staged outputs of the killed run
    with pytest.MonkeyPatch.context() as mp, pytest.raises(OSError):  # a rerun that fails too (disk full)...
        DiskFull(mp, ws.root, after=0)
        clean.run(cfg, ws)
    assert snapshot(ws.root, *outputs, "reports/clean.json") == before  # ...still leaves the previous output
    run_cli([GENLOOP, "clean"], ws.root, env, timeout=300)
    assert snapshot(ws.root, *outputs) == snapshot(reference.root, *outputs)
    after = snapshot(ws.root, *outputs, "reports/clean.json")
    assert after.keys() == before.keys() and {k: after[k] for k in outputs if k in after} == {
        k: before[k] for k in outputs if k in before}
    assert temp_leftovers(ws.root) == []
    n = len(pd.read_parquet(ws.manifest))
    print(f"\n[SIGKILL clean] killed mid-decode and mid-swap; reruns published the uninterrupted result "
          f"({n} images, manifest byte-identical), no temp files left")


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
    assert len(temp_leftovers(ws.root)) == 1  # the killed run's half-written batch, out of sight

    run_cli([GENLOOP, "generate", *sets], ws.root, env, timeout=300)
    assert snapshot(ws.root, outputs[0]) == snapshot(reference.root, outputs[0])
    report, expected = (json.loads((w.root / outputs[1]).read_text()) for w in (ws, reference))
    assert {**report, "folder": None} == {**expected, "folder": None} and report["n"] == 2000
    assert temp_leftovers(ws.root) == []  # the killed run's temporary folder was swept
    print("\n[SIGKILL generate] killed mid-batch: previous batch untouched; rerun wrote the uninterrupted batch "
          "(2000 images, byte-identical), the killed run's temp folder swept")
