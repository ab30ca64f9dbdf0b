"""clean: a zoo of bad and awkward images, generated here, through collect + clean."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from genloop.core.config import Params, load_params
from genloop.core.errors import StageInputMissing
from genloop.core.images import normalise
from genloop.core.manifest import MANIFEST_COLUMNS, read_ledger, read_manifest
from genloop.core.shards import manifest_images, to_pil
from genloop.core.storage import sha256_bytes
from genloop.core.workspace import Workspace
from genloop.stages import clean, collect

RES = 32


# ---------------------------------------------------------------- image makers


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(seed: int, shape: tuple[int, ...], lo: int = 0, hi: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, shape, dtype=np.uint8)


def noise_png(seed: int, size: int = 64, mode: str = "L", **kw: object) -> bytes:
    shape = (size, size) if mode == "L" else (size, size, len(mode))
    return encode(Image.fromarray(noise(seed, shape), mode=mode), **kw)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR is patched to declare width x height (CRC fixed)."""
    data = encode(Image.new("L", (1, 1), 128))
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + data[24:29]  # depth, colour, compression...
    return data[:8] + png_chunk(b"IHDR", ihdr) + data[33:]


def cmyk_jpeg(seed: int) -> bytes:
    img = Image.fromarray(noise(seed, (64, 64, 3)), mode="RGB").convert("CMYK")
    return encode(img, "JPEG", quality=95)


def gray16_png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 65536, (64, 64)).astype(np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    return encode(img)


def palette_png_with_transparency(seed: int) -> bytes:
    """Left half: palette index 0 (black, fully transparent); right half: noise colours."""
    idx = noise(seed, (64, 64), lo=1)
    idx[:, :32] = 0
    img = Image.fromarray(idx, mode="L").convert("P")
    palette = [0, 0, 0] + noise(seed + 1, (255 * 3,)).tolist()
    img = Image.frombytes("P", (64, 64), idx.tobytes())
    img.putpalette(palette)
    img.info["transparency"] = 0
    return encode(img, transparency=0)


def la_png(seed: int) -> bytes:
    """Top half: black and fully transparent; bottom half: opaque noise."""
    lum = noise(seed, (64, 64))
    alpha = np.full((64, 64), 255, np.uint8)
    lum[:32], alpha[:32] = 0, 0
    return encode(Image.fromarray(np.dstack([lum, alpha]), mode="LA"))


def rgba_square_png() -> bytes:
    """Fully transparent (black) except an opaque black square in the middle."""
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(img).rectangle([16, 16, 47, 47], fill=(0, 0, 0, 255))
    return encode(img)


def exif_rotated_jpeg() -> bytes:
    """Stored with a dark top half; EXIF orientation 6 says: rotate 90 degrees clockwise."""
    arr = np.full((64, 64), 230, np.uint8)
    arr[:32] = 20
    arr = (arr.astype(int) + noise(7, (64, 64), 0, 20)).astype(np.uint8)  # distinct phash
    img = Image.fromarray(arr, mode="L")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    exif[0x010F] = "genloop-test-camera"  # Make: must not survive into the clean PNG
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD = {
    # original name -> expected reason keyword
    "empty.png": "empty",
    "truncated.png": "truncated or corrupt",
    "truncated.jpg": "truncated or corrupt",
    "notes.png": "not an image",
    "page.jpg": "not an image",
    "bomb.png": "decompression bomb",  # 30000 x 30000: Pillow's own limit
    "bomb_mid.png": "decompression bomb",  # 8000 x 8000: over clean.max_pixels only
    "blank.png": "blank",
    "tiny.png": "too small",
}
GOOD = [
    "cmyk.jpg",
    "gray16.png",
    "palette_transparent.png",
    "la.png",
    "rgba_square.png",
    "exif_rotated.jpg",
    "plain_rgb.png",
    "plain_gray.png",
]
EXACT_PAIR = ("dup_a.png", "dup_a_resaved.png")
NEAR_PAIR = ("near_b.png", "near_b_one_pixel.png")


def make_zoo(src: Path) -> None:
    src.mkdir(parents=True, exist_ok=True)
    files = {
        "empty.png": b"",
        "truncated.png": half(noise_png(1)),
        "truncated.jpg": half(encode(Image.fromarray(noise(2, (64, 64, 3))), "JPEG")),
        "notes.png": b"these are my notes, not a picture\n" * 4,
        "page.jpg": b"<!DOCTYPE html>\n<html><head><title>404</title></head><body>Not Found</body></html>\n",
        "bomb.png": bomb_png(30000, 30000),
        "bomb_mid.png": bomb_png(8000, 8000),
        "blank.png": encode(Image.new("L", (64, 64), 128)),
        "tiny.png": noise_png(3, size=4),
        "cmyk.jpg": cmyk_jpeg(4),
        "gray16.png": gray16_png(5),
        "palette_transparent.png": palette_png_with_transparency(6),
        "la.png": la_png(8),
        "rgba_square.png": rgba_square_png(),
        "exif_rotated.jpg": exif_rotated_jpeg(),
        "plain_rgb.png": noise_png(9, mode="RGB"),
        "plain_gray.png": noise_png(10),
    }
    dup = Image.fromarray(noise(11, (64, 64)), mode="L")
    files["dup_a.png"] = encode(dup, compress_level=9)
    files["dup_a_resaved.png"] = encode(dup, compress_level=1)
    assert files["dup_a.png"] != files["dup_a_resaved.png"]
    near = noise(12, (RES, RES))
    files["near_b.png"] = encode(Image.fromarray(near, mode="L"))
    near[10, 10] = near[10, 10] + 40 if near[10, 10] < 200 else near[10, 10] - 40
    files["near_b_one_pixel.png"] = encode(Image.fromarray(near, mode="L"))
    assert set(files) == set(BAD) | set(GOOD) | set(EXACT_PAIR) | set(NEAR_PAIR)
    for name, data in files.items():
        (src / name).write_bytes(data)


def params(src: Path, *overrides: str) -> Params:
    """Clean params for `src`; grey (data.mode=L) unless overridden: the zoo's checks are of grey
    conversion (data.mode=auto has its own tests in test_data_mode.py)."""
    return load_params(
        None,
        [
            "data.mode=L",
            "collect.dvc_add=false",
            f"collect.sources=['{src}']",
            f"data.resolution={RES}",
            "clean.near_duplicate_distance=4",
            *overrides,
        ],
    )


def report(ws: Workspace) -> dict[str, object]:
    return json.loads(ws.report("clean").read_text())


def clean_files(ws: Workspace) -> list[Path]:
    return sorted(p for p in ws.clean.rglob("*") if p.is_file())


def open_clean(ws: Workspace, manifest: pd.DataFrame, original: str) -> Image.Image:
    row = manifest.loc[manifest["original"] == original]
    assert len(row) == 1, f"{original} not kept"
    return to_pil(manifest_images(ws.clean, row)[0])


def assert_manifest_matches_folder(ws: Workspace, manifest: pd.DataFrame, cfg: Params) -> None:
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    files = clean_files(ws)
    # data/clean holds exactly the shards the manifest names, each image at its own (shard, offset)
    assert sorted(set(manifest["shard"])) == sorted(p.name for p in files)
    assert all(p.suffix == ".npy" for p in files)
    assert not manifest.duplicated(["shard", "offset"]).any()
    assert manifest["id"].is_unique
    assert manifest["id"].notna().all()
    assert set(manifest["split"]) <= {"train", "holdout"}
    assert (manifest["mode"] == cfg.data.mode).all()
    assert (manifest["width"] == RES).all() and (manifest["height"] == RES).all()
    images = manifest_images(ws.clean, manifest.reset_index(drop=True))
    assert images.shape == (len(manifest), RES, RES, 1 if cfg.data.mode == "L" else 3)
    for pixels, (_, row) in zip(images, manifest.iterrows(), strict=True):
        assert sha256_bytes(pixels.tobytes()) == row["sha256"]
        assert row["raw_sha256"].startswith(row["id"])
    # no temp or old folders left beside data/clean
    assert sorted(p.name for p in ws.clean.parent.iterdir() if p.name.startswith(".")) == []


# ---------------------------------------------------------------- tests


def test_clean_zoo(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_zoo(src)
    ws = Workspace.at(tmp_path / "ws")
    cfg = params(src)
    collected = collect.run(cfg, ws)
    n_raw = len(BAD) + len(GOOD) + 4
    assert collected["added"] == n_raw

    summary = clean.run(cfg, ws)
    rep = report(ws)
    assert rep["raw"] == n_raw and summary["raw"] == n_raw
    assert rep["decoded"] == n_raw and rep["reused"] == 0

    dropped = {d["original"]: d for d in rep["dropped_files"]}
    for d in rep["dropped_files"]:
        assert set(d) >= {"raw_sha256", "reason", "file", "original", "source"}
        assert d["file"].startswith("data/raw/") and d["source"] == str(src)
        assert (ws.root / d["file"]).exists()
    for name, keyword in BAD.items():
        assert name in dropped, f"{name} was not dropped"
        assert dropped[name]["reason"].startswith(keyword), (name, dropped[name]["reason"])
    assert "clean.max_pixels=" in dropped["bomb_mid.png"]["reason"]

    # exactly one of each duplicate pair is dropped, for the right reason
    for pair, keyword in ((EXACT_PAIR, "exact duplicate"), (NEAR_PAIR, "near duplicate")):
        gone = [n for n in pair if n in dropped]
        assert len(gone) == 1, (pair, gone)
        assert dropped[gone[0]]["reason"].startswith(keyword), dropped[gone[0]]["reason"]
    assert set(dropped) == set(BAD) | {n for n in EXACT_PAIR + NEAR_PAIR if n in dropped}

    assert rep["dropped"] == len(dropped) == len(BAD) + 2
    assert rep["kept"] == len(GOOD) + 2
    assert sum(rep["dropped_by_reason"].values()) == rep["dropped"]
    assert rep["dropped_by_reason"]["exact duplicate"] == 1
    assert rep["dropped_by_reason"]["near duplicate"] == 1
    assert rep["dropped_by_reason"]["decompression bomb"] == 2
    assert sum(rep["splits"].values()) == rep["kept"]

    manifest = read_manifest(ws.manifest)
    ledger = read_ledger(ws.ledger)
    manifest = manifest.merge(ledger[["sha256", "original"]].rename(columns={"sha256": "raw_sha256"}), on="raw_sha256")
    kept_names = set(manifest["original"])
    assert set(GOOD) <= kept_names
    assert kept_names.isdisjoint(BAD)
    assert_manifest_matches_folder(ws, manifest.drop(columns="original"), cfg)

    # transparency is composited on white
    rgba = np.asarray(open_clean(ws, manifest, "rgba_square.png"))
    assert rgba[:3, :3].min() >= 250 and rgba[-3:, -3:].min() >= 250  # corners: white
    assert rgba[12:20, 12:20].max() <= 5  # the opaque square stays black
    pal = np.asarray(open_clean(ws, manifest, "palette_transparent.png"))
    assert pal[:, :12].min() >= 250  # transparent left half: white, not the palette's black
    la = np.asarray(open_clean(ws, manifest, "la.png"))
    assert la[:12].min() >= 250  # transparent top half: white

    # EXIF orientation applied; no EXIF (or any metadata) in the output
    rot_img = open_clean(ws, manifest, "exif_rotated.jpg")
    assert len(rot_img.getexif()) == 0
    assert "exif" not in rot_img.info
    rot = np.asarray(rot_img).astype(float)
    assert rot[:, RES // 2 + 2 :].mean() < 80  # the stored top is now on the right
    assert rot[:, : RES // 2 - 2].mean() > 180
    assert abs(rot[: RES // 2].mean() - rot[RES // 2 :].mean()) < 30  # not left as stored

    # 16-bit grey is scaled into 8 bits (not clipped to white)
    g16 = np.asarray(open_clean(ws, manifest, "gray16.png"))
    assert g16.std() > 20 and g16.min() < 100 and g16.max() > 150

    # a second clean over unchanged data decodes nothing and publishes the same result
    before_manifest = ws.manifest.read_bytes()
    before_files = {p.name: p.read_bytes() for p in clean_files(ws)}
    again = clean.run(cfg, ws)
    assert again["decoded"] == 0 and again["reused"] == n_raw
    pd.testing.assert_frame_equal(read_manifest(ws.manifest), manifest.drop(columns="original"))
    assert ws.manifest.read_bytes() == before_manifest
    assert {p.name: p.read_bytes() for p in clean_files(ws)} == before_files
    rep2 = report(ws)
    assert rep2["dropped_files"] == rep["dropped_files"]
    assert rep2["kept"] == rep["kept"]

    # one new file: only it is decoded
    (src / "late.png").write_bytes(noise_png(13))
    assert collect.run(cfg, ws)["added"] == 1
    third = clean.run(cfg, ws)
    assert third["decoded"] == 1 and third["reused"] == n_raw
    assert third["kept"] == rep["kept"] + 1
    assert_manifest_matches_folder(ws, read_manifest(ws.manifest), cfg)

    # other normalisation params: a separate cache, everything decoded again
    other = clean.run(params(src, "data.resolution=16", "data.holdout_fraction=0.5"), ws)
    assert other["decoded"] == n_raw + 1


def animated_gif(seeds: tuple[int, ...]) -> tuple[bytes, list[Image.Image]]:
    """A looping GIF whose frames are distinct grey noise (GIF keeps 256 grey levels losslessly)."""
    frames = [Image.fromarray(noise(s, (64, 64)), mode="L") for s in seeds]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue(), frames


# odd but legal file names: collected and cleaned like any other, the name kept as it was
ODD_NAMES = ["my holiday photo (1).png", "café 猫 🐱.png", "nai\u0308ve-nfd.png", "-rf --no-preserve-root.png",
             "  leading and trailing spaces  .png", "tab\there.png"]
NON_UTF8 = b"latin1-\xe9t\xe9.png"  # not UTF-8: stored with \xNN escapes


def test_clean_zoo_awkward_names_links_animations_and_s3_traversal(tmp_path: Path, s3_env: str) -> None:
    import boto3

    src = tmp_path / "src"
    src.mkdir()
    gif, frames = animated_gif((21, 22, 23))
    (src / "anim.gif").write_bytes(gif)
    odd = {name: noise_png(40 + i) for i, name in enumerate(ODD_NAMES)}
    for name, data in odd.items():
        (src / name).write_bytes(data)
    non_utf8 = noise_png(60)
    with open(os.fsencode(src) + b"/" + NON_UTF8, "wb") as f:
        f.write(non_utf8)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = noise_png(61)
    (outside / "secret.png").write_bytes(secret)
    (src / "link-outside.png").symlink_to(outside / "secret.png")
    (src / "linked-folder").symlink_to(outside, target_is_directory=True)
    os.mkfifo(src / "pipe.png")  # reading it would block collect forever

    bucket = "clean-zoo"
    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.create_bucket(Bucket=bucket)
    s3_ok = {"zoo/ok.png": noise_png(62), "zoo/ünï cødé key.png": noise_png(63)}
    s3_escaping = {"zoo/../escape.png": noise_png(64), "zoo/sub/../../escape2.png": noise_png(65)}
    for key, data in {**s3_ok, **s3_escaping}.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    assert {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]} == set(s3_ok) | set(s3_escaping)

    ws = Workspace.at(tmp_path / "ws")
    s3_uri = f"s3://{bucket}/zoo"
    cfg = params(src, f"collect.sources=['{src}', '{s3_uri}']")
    collected = collect.run(cfg, ws)
    n_local = 1 + len(ODD_NAMES) + 1
    assert collected["sources"] == {str(src): {"offered": n_local, "added": n_local},
                                    s3_uri: {"offered": len(s3_ok), "added": len(s3_ok)}}

    # what was passed over is in reports/collect.json, each with its reason and source
    rep = json.loads(ws.report("collect").read_text())
    skipped = {d["item"]: d for d in rep["skipped"]}
    assert set(skipped) == {str(src / "link-outside.png"), str(src / "linked-folder"), str(src / "pipe.png"),
                            *(f"s3://{bucket}/{k}" for k in s3_escaping)}
    assert skipped[str(src / "link-outside.png")]["reason"].startswith("symlink pointing outside the source folder")
    assert str(outside / "secret.png") in skipped[str(src / "link-outside.png")]["reason"]
    assert skipped[str(src / "linked-folder")]["reason"].startswith("symlinked folder")
    assert skipped[str(src / "pipe.png")]["reason"].startswith("not a regular file")
    for key in s3_escaping:
        assert "escapes the prefix" in skipped[f"s3://{bucket}/{key}"]["reason"]
        assert skipped[f"s3://{bucket}/{key}"]["source"] == s3_uri
    assert all(skipped[str(src / n)]["source"] == str(src) for n in ("link-outside.png", "linked-folder", "pipe.png"))

    # nothing from outside the source folder or the prefix reached data/raw
    ledger = read_ledger(ws.ledger)
    raw_bytes = {p.read_bytes() for p in ws.raw.rglob("*") if p.is_file() and p.name != "ledger.parquet"}
    for data in (secret, *s3_escaping.values()):
        assert sha256_bytes(data) not in set(ledger["sha256"]) and data not in raw_bytes
    assert len(raw_bytes) == len(ledger) == n_local + len(s3_ok)

    # odd names are kept exactly (non-UTF-8 bytes as \xNN escapes), with their bytes
    original = dict(zip(ledger["original"], ledger["sha256"], strict=True))
    expected = {**{n: sha256_bytes(d) for n, d in odd.items()}, "anim.gif": sha256_bytes(gif),
                "latin1-\\xe9t\\xe9.png": sha256_bytes(non_utf8),
                **{f"s3://{bucket}/{k}": sha256_bytes(d) for k, d in s3_ok.items()}}
    assert original == expected

    summary = clean.run(cfg, ws)
    assert summary["kept"] == len(ledger) and summary["dropped"] == 0
    manifest = read_manifest(ws.manifest).merge(
        ledger[["sha256", "original"]].rename(columns={"sha256": "raw_sha256"}), on="raw_sha256")
    assert set(manifest["original"]) == set(expected)

    # an animated GIF: its first frame is the clean image, and the clean report says so
    def normalised(img: Image.Image) -> np.ndarray:
        out = normalise(encode(img), mode=cfg.data.mode, resolution=RES, max_pixels=cfg.clean.max_pixels,
                        min_side=cfg.clean.min_side, blank_std=cfg.clean.blank_std)
        return np.asarray(to_pil(out.pixels))

    got = np.asarray(open_clean(ws, manifest, "anim.gif"))
    assert np.array_equal(got, normalised(frames[0]))
    assert not np.array_equal(got, normalised(frames[1]))
    assert np.abs(got.astype(int) - normalised(frames[1])).mean() > 20
    notes = report(ws)["notes"]
    assert [(n["original"], n["note"]) for n in notes] == [("anim.gif", "animated: 3 frames, the first frame is used")]
    assert notes[0]["raw_sha256"] == sha256_bytes(gif) and summary["notes"] == 1


def test_clean_rgb_mode(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "rgba_square.png").write_bytes(rgba_square_png())
    (src / "cmyk.jpg").write_bytes(cmyk_jpeg(4))
    (src / "gray16.png").write_bytes(gray16_png(5))
    (src / "la.png").write_bytes(la_png(8))
    (src / "palette_transparent.png").write_bytes(palette_png_with_transparency(6))
    (src / "gray.png").write_bytes(noise_png(10))
    ws = Workspace.at(tmp_path / "ws")
    cfg = params(src, "data.mode=RGB")
    collect.run(cfg, ws)
    summary = clean.run(cfg, ws)
    assert summary["kept"] == 6 and summary["dropped"] == 0
    manifest = read_manifest(ws.manifest)
    assert_manifest_matches_folder(ws, manifest, cfg)
    ledger = read_ledger(ws.ledger)
    manifest = manifest.merge(ledger[["sha256", "original"]].rename(columns={"sha256": "raw_sha256"}), on="raw_sha256")
    rgba = np.asarray(open_clean(ws, manifest, "rgba_square.png"))
    assert rgba.shape == (RES, RES, 3)
    assert rgba[:3, :3].min() >= 250  # white background in every channel
    assert rgba[12:20, 12:20].max() <= 5
    cmyk = np.asarray(open_clean(ws, manifest, "cmyk.jpg"))
    assert cmyk.shape == (RES, RES, 3) and cmyk.std() > 20


def test_clean_keeps_every_split_stable(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for seed in range(40):
        (src / f"{seed}.png").write_bytes(noise_png(100 + seed, size=16))
    ws = Workspace.at(tmp_path / "ws")
    cfg = params(src, "data.holdout_fraction=0.3", "clean.near_duplicate_distance=-1")
    collect.run(cfg, ws)
    clean.run(cfg, ws)
    first = read_manifest(ws.manifest).set_index("raw_sha256")["split"]
    assert set(first) == {"train", "holdout"}
    (src / "extra.png").write_bytes(noise_png(999, size=16))
    collect.run(cfg, ws)
    clean.run(cfg, ws)
    second = read_manifest(ws.manifest).set_index("raw_sha256")["split"]
    assert len(second) == 41
    pd.testing.assert_series_equal(second.loc[first.index], first)


def test_clean_without_collect_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(StageInputMissing, match="genloop collect"):
        clean.run(load_params(None), Workspace.at(tmp_path))


def test_bomb_png_is_a_valid_png_header() -> None:
    """The bomb is a well-formed PNG that only lies about its size."""
    data = bomb_png(30000, 30000)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    assert struct.unpack(">II", data[16:24]) == (30000, 30000)
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    small = bomb_png(1, 1)
    with Image.open(io.BytesIO(small)) as img:
        img.load()
        assert img.size == (1, 1)


def test_exact_perceptual_duplicates_are_paired_with_the_first_of_their_group() -> None:
    """Distance 0 (the default) groups equal hashes in one pass; each later image of a group pairs
    with its first, so the dedupe keeps exactly the first of every group, as the all-pairs scan did."""
    rng = np.random.default_rng(0)
    hashes = [f"{int(v):016x}" for v in rng.integers(0, 50, 400)]  # 400 hashes, many repeated
    grouped = clean.near_duplicate_pairs(hashes, 0)
    brute = [(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes)) if hashes[i] == hashes[j]]
    assert {j for _, j in grouped} == {j for _, j in brute}  # the same images dropped
    assert all(hashes[i] == hashes[j] and i == hashes.index(hashes[j]) for i, j in grouped)
    assert clean.near_duplicate_pairs(hashes, 1) != [] and set(brute) <= set(clean.near_duplicate_pairs(hashes, 1))
