"""data.mode=auto: clean resolves L or RGB over the whole corpus, and data.background is what
transparency is composited on."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from genloop.core.config import Params, load_params
from genloop.core.dataset import load_split
from genloop.core.images import normalise
from genloop.core.manifest import corpus_mode, read_manifest
from genloop.core.workspace import Workspace
from genloop.stages import clean, collect, train
from tests.colour_corpus import emoji_folder
from tests.helpers import clean_images

RES = 32


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def grey_array(seed: int, size: int = 48) -> np.ndarray:
    """Grey noise: not blank, and no two seeds alike."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size), dtype=np.uint8)


def grey_rgb(seed: int) -> Image.Image:
    """RGB whose three channels repeat one grey level."""
    g = grey_array(seed)
    return Image.fromarray(np.dstack([g, g, g]), mode="RGB")


def colour_rgb(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8), mode="RGB")


def grey_on_transparent() -> Image.Image:
    """A grey square on a fully transparent (black) canvas."""
    img = Image.new("RGBA", (48, 48), (0, 0, 0, 0))
    ImageDraw.Draw(img).rectangle([12, 12, 35, 35], fill=(90, 90, 90, 255))
    return img


def palette(colours: list[tuple[int, int, int]], seed: int) -> Image.Image:
    idx = np.random.default_rng(seed).integers(0, len(colours), (48, 48), dtype=np.uint8)
    img = Image.frombytes("P", (48, 48), idx.tobytes())
    img.putpalette([c for rgb in colours for c in rgb])
    return img


def grey_with_patch(share: float) -> Image.Image:
    """Grey noise with a red square covering about `share` of the picture."""
    img = grey_rgb(5)
    side = round(48 * share**0.5)
    ImageDraw.Draw(img).rectangle([0, 0, side - 1, side - 1], fill=(220, 30, 30))
    return img


def has_colour(data: bytes, background: str = "#ffffff") -> bool:
    """normalise's colour flag, which must not depend on the mode the image is converted to."""
    flags = {normalise(data, mode=m, resolution=RES, max_pixels=10**7, min_side=8, blank_std=2.0,
                       background=background).colour for m in ("L", "RGB")}
    assert len(flags) == 1
    return flags.pop()


GREY_PALETTE = [(v, v, v) for v in range(0, 256, 16)]
COLOUR_PALETTE = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (250, 250, 0)]


@pytest.mark.parametrize(("name", "data", "expected"), [
    ("grey L", encode(Image.fromarray(grey_array(1), mode="L")), False),
    ("grey 16-bit", encode(Image.fromarray(grey_array(2).astype(np.uint16) * 257)), False),
    ("grey RGB", encode(grey_rgb(3)), False),
    ("grey RGB through JPEG", encode(grey_rgb(3), "JPEG", quality=75), False),
    ("grey on transparency (RGBA)", encode(grey_on_transparent()), False),
    ("grey LA", encode(grey_on_transparent().convert("LA")), False),
    ("grey palette", encode(palette(GREY_PALETTE, 4)), False),
    ("colour palette", encode(palette(COLOUR_PALETTE, 4)), True),
    ("colour RGB", encode(colour_rgb(6)), True),
    ("colour RGBA", encode(colour_rgb(6).convert("RGBA")), True),
    ("colour CMYK JPEG", encode(colour_rgb(6).convert("CMYK"), "JPEG", quality=95), True),
    ("grey with a 0.3% red patch", encode(grey_with_patch(0.003)), False),
    ("grey with a 5% red patch", encode(grey_with_patch(0.05)), True),
])
def test_colour_decision(name: str, data: bytes, expected: bool) -> None:
    assert has_colour(data) is expected, name


def test_transparency_on_a_coloured_background_is_colour() -> None:
    data = encode(grey_on_transparent())
    assert has_colour(data, background="#ffffff") is False
    assert has_colour(data, background="red") is True


def cfg_for(src: Path, *overrides: str) -> Params:
    return load_params(None, ["collect.dvc_add=false", f"collect.sources=['{src}']", f"data.resolution={RES}",
                              "clean.near_duplicate_distance=-1", *overrides])


def clean_folder(src: Path, ws: Workspace, *overrides: str) -> tuple[dict[str, object], dict[str, object]]:
    """collect + clean `src`; the summary and reports/clean.json."""
    cfg = cfg_for(src, *overrides)
    collect.run(cfg, ws)
    summary = clean.run(cfg, ws)
    return summary, json.loads(ws.report("clean").read_text())


def clean_arrays(ws: Workspace) -> list[np.ndarray]:
    return [np.asarray(img) for img in clean_images(ws)]


def write_grey_corpus(src: Path, n: int = 6) -> None:
    src.mkdir()
    for i in range(n):  # grey in three guises: L, RGB repeating the grey, a grey palette
        img = [Image.fromarray(grey_array(10 + i), mode="L"), grey_rgb(10 + i), palette(GREY_PALETTE, 10 + i)][i % 3]
        img.save(src / f"grey{i}.png")


def test_colour_pngs_resolve_rgb_and_clean_keeps_three_channels(tmp_path: Path) -> None:
    src = emoji_folder(tmp_path, n=24, size=32)
    ws = Workspace.at(tmp_path / "ws")
    summary, rep = clean_folder(src, ws)
    assert summary["mode"] == rep["mode"] == "RGB"
    assert rep["colour_images"] > 0.5 * rep["kept"]
    assert rep["mode_reason"] == f"{rep['colour_images']} of {rep['raw']} images have colour"
    assert rep["background"] == "#ffffff"
    assert set(read_manifest(ws.manifest)["mode"]) == {"RGB"} and corpus_mode(ws.manifest) == "RGB"
    assert {a.shape for a in clean_arrays(ws)} == {(RES, RES, 3)}
    # the generator follows the resolved mode, not data.mode (auto)
    cfg = cfg_for(src)
    assert train._spec(cfg, load_split(ws, "train"), corpus_mode(ws.manifest)).channels == 3

    # data.mode=L set explicitly still wins, and the report says how much colour was given up
    _, grey = clean_folder(src, ws, "data.mode=L")
    assert grey["mode"] == "L" and grey["mode_reason"].startswith("set by data.mode (")
    assert {a.shape for a in clean_arrays(ws)} == {(RES, RES)}


def test_grey_corpus_resolves_l_then_a_colour_image_recleans_everything_in_rgb(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_grey_corpus(src)
    ws = Workspace.at(tmp_path / "ws")
    summary, rep = clean_folder(src, ws)
    assert rep["mode"] == "L" and rep["mode_reason"] == "every image is grey (6 images)"
    assert rep["colour_images"] == 0 and rep["decoded"] == 6
    assert {a.shape for a in clean_arrays(ws)} == {(RES, RES)}
    again, _ = clean_folder(src, ws)
    assert again["decoded"] == 0 and again["mode"] == "L"

    colour_rgb(99).save(src / "colour.png")  # one colour image joins: every image is cleaned again in RGB
    summary, rep = clean_folder(src, ws)
    assert rep["mode"] == "RGB" and rep["mode_reason"] == "1 of 7 images have colour"
    assert rep["decoded"] == 1 + 7  # the newcomer in grey (where its colour shows), then all seven in RGB
    assert set(read_manifest(ws.manifest)["mode"]) == {"RGB"}
    arrays = clean_arrays(ws)
    assert len(arrays) == 7 and {a.shape for a in arrays} == {(RES, RES, 3)}
    again, _ = clean_folder(src, ws)  # the cached colour flag settles the mode: nothing decoded
    assert again["decoded"] == 0 and again["mode"] == "RGB"


def test_background_param_changes_the_composited_pixel(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    encoded = encode(grey_on_transparent())
    (src / "square.png").write_bytes(encoded)
    corners = {}
    for background in ("white", "#000000", "#0000ff"):
        ws = Workspace.at(tmp_path / f"ws-{background}")
        _, rep = clean_folder(src, ws, f"data.background='{background}'")
        [pixels] = clean_arrays(ws)
        corners[background] = (rep["mode"], pixels[0, 0].tolist(), pixels[RES // 2, RES // 2].tolist())
    assert corners["white"] == ("L", 255, 90)
    assert corners["#000000"] == ("L", 0, 90)
    assert corners["#0000ff"] == ("RGB", [0, 0, 255], [90, 90, 90])  # a blue background is colour
