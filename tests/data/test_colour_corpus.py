"""A colour corpus (Noto Color Emoji) through the real `genloop collect` and `genloop clean`:
with data.mode=RGB the clean images stay RGB and keep their colour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from genloop.core.manifest import read_manifest
from genloop.core.workspace import Workspace
from tests.colour_corpus import emoji_folder
from tests.helpers import BIN, TINY, clean_images, cli_env, make_workspace, run_cli

N = 200


def channel_spread(images: np.ndarray) -> float:
    """Mean over pixels of max(R, G, B) - min(R, G, B): 0 for any grey image."""
    pixels = images.astype(np.int16)
    return float((pixels.max(axis=-1) - pixels.min(axis=-1)).mean())


def test_emoji_stay_rgb_with_colour_through_collect_and_clean(tmp_path: Path) -> None:
    folder = emoji_folder(tmp_path, n=N, size=32)
    originals = np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])
    assert originals.shape == (N, 32, 32, 3)
    ws_dir = tmp_path / "ws"
    ws_dir.mkdir()
    sources = f"collect.sources=[{{uri: '{folder}', labels: none}}]"
    overrides = [o for o in TINY if not o.startswith("collect.sources=")]
    make_workspace(ws_dir, [*overrides, sources, "data.mode=RGB", "data.resolution=32", "collect.dvc_add=false"])
    env = cli_env(ws_dir)
    for stage in ("collect", "clean"):
        run_cli([str(BIN / "genloop"), stage], ws_dir, env)

    ws = Workspace.at(ws_dir)
    manifest = read_manifest(ws.manifest)
    # every emoji is a distinct picture: clean drops only those whose perceptual hash equals another's
    assert 0.8 * N <= len(manifest) <= N
    cleaned = clean_images(ws)
    assert set(manifest["mode"]) == {"RGB"}
    assert {img.mode for img in cleaned} == {"RGB"}
    assert {img.size for img in cleaned} == {(32, 32)}
    spread = channel_spread(np.stack([np.asarray(img) for img in cleaned]))
    # the originals' spread is about 40 of 255 (white background included); grey would be 0
    assert spread > 20, f"clean images lost their colour: mean channel spread {spread:.1f}"
    assert abs(spread - channel_spread(originals)) < 5
