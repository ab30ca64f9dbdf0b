"""Small settings that make the real loop run in seconds, shared by the pipeline tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TINY = [
    "collect.sources=[{uri: 'builtin:mnist', limit: 400}]",
    "validate.min_rows=50",
    "model.vae.latent_dim=8",
    "model.vae.width=8",
    "train.epochs=1",
    "train.batch_size=32",
    "train.log_every=2",
    "train.checkpoint_every=5",
    "train.grid_size=20",
    "evaluate.n_samples=60",
    "evaluate.extractor_epochs=1",
    "evaluate.classifier_epochs=1",
    "evaluate.calibration.bootstrap=5",
    "evaluate.kid_subset_size=20",
    "generate.n=24",
    "generate.batch_size=10",
    "optimize.keep=10",
]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def cli_env(ws: Path, **extra: str) -> dict[str, str]:
    """The environment of a genloop/prefect/dvc subprocess: this venv first on PATH, analytics
    off, Prefect state inside the workspace, nothing inherited from an outer loop or server."""
    # mlflow.set_tracking_uri/set_registry_uri in this process export MLFLOW_*_URI: never pass them on
    inherited = ("PREFECT_", "GENLOOP_PARENT", "GENLOOP_WORKSPACE_LOCK", "MLFLOW_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(ws / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        DVC_NO_ANALYTICS="1",
        GX_ANALYTICS_ENABLED="false",
        NO_PROXY="127.0.0.1,localhost",
    )
    env.update(extra)
    return env


def run_cli(cmd: list[str], ws: Path, env: dict[str, str], timeout: int = 600,
            ok: bool = True) -> subprocess.CompletedProcess:
    """Run a command in the workspace; with ok=True, fail the test with its output unless it exits 0."""
    done = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)
    CLI_OUTPUTS.append((cmd, done.stdout, done.stderr))
    if ok:
        assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    return done


def make_workspace(ws: Path, overrides: list[str] = TINY) -> Path:
    """A git + DVC repository holding genloop's dvc.yaml, src/, flows/ and params.yaml with `overrides`."""
    import yaml

    from genloop.core.config import load_params

    shutil.copy(ROOT / "dvc.yaml", ws / "dvc.yaml")
    # dvc.yaml's stages depend on genloop's source files: the workspace carries a copy
    shutil.copytree(ROOT / "src", ws / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "flows", ws / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    cfg = load_params(ROOT / "params.yaml", overrides)
    (ws / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
    env = cli_env(ws)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=ws, check=True, env=env)
    return ws


def expected_extractor(cfg, ws) -> str:
    """The feature extractor evaluation must choose for this workspace's data and these params
    (the rule of genloop.eval.extractors): with evaluate.extractor=auto the first of DINOv2, CLIP and
    Inception whose weights (and library) are here; else the in-domain one, a classifier trained
    jointly with the contrastive loss when every training image has a label, and the contrastive
    extractor alone when not."""
    from genloop.core.manifest import read_manifest
    from genloop.eval.extractors import standard_unavailable

    choice = cfg.evaluate.extractor
    for kind in ("dinov2", "clip", "inception") if choice == "auto" else (choice,):
        if kind != "domain" and standard_unavailable(cfg, kind) is None:
            return "inception-v3" if kind == "inception" else kind
    train = read_manifest(ws.manifest).query("split == 'train'")
    return "domain-classifier" if len(train) and train["label"].notna().all() else "domain-contrastive"


def expected_steps(cfg, ws, world_size: int = 1) -> int:
    """The optimizer steps `genloop train` takes on this workspace's training split: train.epochs
    passes of whole global batches (train.batch_size per process; a last partial batch is left out)."""
    from genloop.core.manifest import read_manifest

    n = int((read_manifest(ws.manifest)["split"] == "train").sum())
    batch = min(cfg.train.batch_size, max(1, n // world_size))
    return cfg.train.epochs * max(1, n // (batch * world_size))


# what every run_cli call printed (stdout, stderr), for the secrets drill (tests/drills/secret_scan.py)
CLI_OUTPUTS: list[tuple[list[str], str, str]] = []


def clean_images(ws) -> list:
    """data/clean's images, one PIL image per manifest row, in the manifest's order."""
    from genloop.core.manifest import read_manifest
    from genloop.core.shards import manifest_images, to_pil

    return [to_pil(a) for a in manifest_images(ws.clean, read_manifest(ws.manifest))]


def export_clean_pngs(ws, dest: Path) -> dict[str, Path]:
    """Write data/clean's images as `<id>.png` files into `dest` (a folder a collect source can
    read); returns the files by image id."""
    from genloop.core.manifest import read_manifest

    dest.mkdir(parents=True, exist_ok=True)
    files = {}
    for img_id, img in zip(read_manifest(ws.manifest)["id"], clean_images(ws), strict=True):
        files[img_id] = dest / f"{img_id}.png"
        img.save(files[img_id])
    return files
