"""data/clean's shards: images read back exactly, in the manifest's order, in memory or per batch,
and a clear error naming the file when a shard is missing or damaged."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from genloop.core.errors import StageInputMissing
from genloop.core.shards import ShardedImages, read_images, shard_name, write_shard


def shards(folder: Path, channels: int = 3) -> tuple[np.ndarray, list[str], list[int]]:
    """Three shards of 5, 1 and 7 images; returns every image and its (shard, offset), shuffled."""
    rng = np.random.default_rng(0)
    images, names, offsets = [], [], []
    for k, n in enumerate((5, 1, 7)):
        block = rng.integers(0, 256, (n, 8, 8, channels), dtype=np.uint8)
        name = shard_name([f"chunk{k}-{i}" for i in range(n)])
        write_shard(folder / name, block)
        images += list(block)
        names += [name] * n
        offsets += list(range(n))
    order = rng.permutation(len(images))
    return np.stack(images)[order], [names[i] for i in order], [offsets[i] for i in order]


@pytest.mark.parametrize("channels", [1, 3])
def test_images_come_back_in_the_order_asked_for_in_memory_and_streamed(tmp_path: Path, channels: int) -> None:
    expected, names, offsets = shards(tmp_path, channels)
    assert np.array_equal(read_images(tmp_path, names, offsets), expected)
    streamed = ShardedImages(tmp_path, names, offsets)
    resident = torch.from_numpy(expected.transpose(0, 3, 1, 2).copy())
    assert streamed.shape == tuple(resident.shape) and len(streamed) == len(resident)
    idx = torch.tensor([12, 0, 5, 5, 3])
    assert torch.equal(streamed[idx], resident[idx])
    assert torch.equal(streamed[2:9], resident[2:9])
    assert streamed[idx].is_contiguous()


def test_a_shard_name_follows_its_chunk(tmp_path: Path) -> None:
    assert shard_name(["a", "b"]) == shard_name(["a", "b"]) != shard_name(["b", "a"])
    assert shard_name(["ab"]) != shard_name(["a", "b"])
    with pytest.raises(ValueError, match="uint8"):
        write_shard(tmp_path / "x.npy", np.zeros((2, 4, 4, 1), dtype=np.float32))


def test_a_missing_or_damaged_shard_is_named_with_what_to_do(tmp_path: Path) -> None:
    _, names, offsets = shards(tmp_path)
    (tmp_path / names[0]).unlink()
    with pytest.raises(StageInputMissing, match=f"{names[0]} is listed in the manifest but missing: run `dvc"):
        read_images(tmp_path, names, offsets)
    other = next(n for n in names if n != names[0] and names.count(n) == 7)
    data = (tmp_path / other).read_bytes()
    (tmp_path / other).write_bytes(b"not a shard" + data[200:])
    with pytest.raises(StageInputMissing, match=f"{other} is not a readable image shard"):
        read_images(tmp_path, [other], [0])
    (tmp_path / other).write_bytes(data)
    with pytest.raises(StageInputMissing, match=r"holds \d+ images, the manifest asks for image 99"):
        read_images(tmp_path, [other], [99])
    with pytest.raises(StageInputMissing, match=r"holds 7 images, the manifest asks for image 7"):
        ShardedImages(tmp_path, [other, other], [0, 7])
    streamed = ShardedImages(tmp_path, [other, other], [0, 6])
    (tmp_path / other).write_bytes(data[: len(data) - 8 * 8 * 3 * 2])  # truncated after it was opened
    assert streamed[torch.tensor([0])].shape == (1, 3, 8, 8)
    with pytest.raises(StageInputMissing, match="ends before image 6"):
        streamed[torch.tensor([0, 1])]


def test_the_perceptual_hash_is_imagehash_phash() -> None:
    """clean's own perceptual hash (a DCT matrix product, for speed) gives imagehash's bits and hex,
    on noise and on smooth pictures, at the size it is computed on and at others it resizes from."""
    import imagehash
    from PIL import Image, ImageDraw

    from genloop.core.images import perceptual_hash

    rng = np.random.default_rng(3)
    pictures = []
    for side in (28, 32, 64):
        for k in range(30):
            pictures.append(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))
            smooth = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(0, 256, 3)))
            draw = ImageDraw.Draw(smooth)
            box = sorted(rng.integers(0, side, 2).tolist()) + sorted(rng.integers(0, side, 2).tolist())
            draw.ellipse([box[0], box[2], box[1] + 1, box[3] + 1], fill=(k * 8, 255 - k * 8, 90))
            pictures.append(smooth)
            half = rng.integers(0, 256, (side, side // 2), dtype=np.uint8)  # mirrored: DCT coefficients tie
            pictures.append(Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)))
        pictures.append(Image.new("RGB", (side, side), (200, 10, 10)))  # flat: every AC coefficient is 0
    assert [perceptual_hash(p) for p in pictures] == [str(imagehash.phash(p)) for p in pictures]


def test_normalise_hashes_its_pixels_as_imagehash_and_pillow_would() -> None:
    """normalise takes grey levels and the perceptual hash straight from its pixel array: the same
    integers as Pillow's convert("L") and the same hash as imagehash on the clean image, in both
    modes, at the hash's own size and at another."""
    import imagehash
    from PIL import Image

    from genloop.core.images import grey_levels, normalise

    rng = np.random.default_rng(5)
    colours = rng.integers(0, 256, (40, 24, 24, 3), dtype=np.uint8)
    for rgb in colours:
        assert np.array_equal(grey_levels(rgb), np.asarray(Image.fromarray(rgb).convert("L")))
    for resolution in (32, 16):
        for mode in ("RGB", "L"):
            for k, rgb in enumerate(rng.integers(0, 256, (10, 48, 48, 3), dtype=np.uint8)):
                buf = io.BytesIO()
                Image.fromarray(rgb).save(buf, format="PNG")
                out = normalise(buf.getvalue(), mode=mode, resolution=resolution, max_pixels=10**6, min_side=8,
                                blank_std=1.0)
                clean = Image.fromarray(out.pixels[:, :, 0] if mode == "L" else out.pixels)
                assert out.phash == str(imagehash.phash(clean)), (mode, resolution, k)
                assert out.colour is True and out.pixels.shape == (resolution, resolution, 3 if mode == "RGB" else 1)


def test_a_chunk_judges_each_image_as_it_would_be_judged_alone(tmp_path: Path) -> None:
    """clean_chunk checks and hashes its images as array work over blocks: each image gets the
    colour flag, grey levels, blank verdict and hashes it gets through normalise on its own,
    whatever its neighbours (grey and colour sources, blanks, undecodable bytes), in both modes."""
    import hashlib

    from PIL import Image

    from genloop.core import images as images_module
    from genloop.core.images import RejectedImage, normalise
    from genloop.stages.clean_chunk import ChunkJob, clean_chunk

    rng = np.random.default_rng(9)
    raw = tmp_path / "raw"
    raw.mkdir()
    pictures = [Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)),  # grey source: not judged
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)),  # colour
                Image.fromarray(np.repeat(rng.integers(0, 256, (40, 40, 1), dtype=np.uint8), 3, axis=2)),  # grey RGB
                Image.new("RGB", (40, 40), (128, 128, 128)),  # blank
                Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).convert("RGBA")]
    blobs = []
    for img in pictures * 3:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    blobs.append(b"not an image")
    files = []
    for data in blobs:
        sha = hashlib.sha256(data).hexdigest()
        (raw / f"{sha}.png").write_bytes(data)
        files.append((sha, f"{sha}.png"))
    for mode in ("L", "RGB"):
        for resolution in (32, 16):
            images_module_block = images_module.FINISH_BLOCK_VALUES
            images_module.FINISH_BLOCK_VALUES = 4 * resolution * resolution * 3  # blocks of 4 images
            try:
                job = ChunkJob(raw, tmp_path / f"cache-{mode}-{resolution}", mode, resolution, 10**6, 8, 2.0, "#ffffff")
                rows = clean_chunk(job, files).to_pylist()
            finally:
                images_module.FINISH_BLOCK_VALUES = images_module_block
            shard = np.load(job.cache / "shards" / rows[0]["shard"])
            assert [r["raw_sha256"] for r in rows] == [sha for sha, _ in files]
            for row, data in zip(rows, blobs, strict=True):
                try:
                    alone = normalise(data, mode=mode, resolution=resolution, max_pixels=10**6, min_side=8,
                                      blank_std=2.0)
                except RejectedImage as exc:
                    assert row["reason"] == str(exc) and row["shard"] is None
                    continue
                assert row["reason"] is None
                assert (row["pixel_hash"], row["phash"], row["colour"]) == (alone.pixel_hash, alone.phash,
                                                                             alone.colour)
                assert np.array_equal(shard[row["offset"]], alone.pixels)
            assert [r["colour"] for r in rows[:5]] == [False, True, False, None, True]
            assert sum(r["reason"] is not None for r in rows) == 4  # three blanks and the bytes


def test_a_subsample_of_a_split_is_the_same_images_in_memory_and_streamed(tmp_path: Path) -> None:
    from genloop.core.dataset import ImageSet

    expected, names, offsets = shards(tmp_path)
    resident = torch.from_numpy(expected.transpose(0, 3, 1, 2).copy())
    labels, ids = torch.arange(len(expected)) % 3, [f"id{i}" for i in range(len(expected))]
    streamed = ShardedImages(tmp_path, names, offsets)
    sets = [ImageSet(images, labels, ["a", "b", "c"], ids) for images in (resident, streamed)]
    assert sets[0].subsample(len(expected), seed=1) is sets[0]  # nothing to leave out
    small = [s.subsample(6, seed=1) for s in sets]
    assert isinstance(small[1].images, ShardedImages) and len(small[1]) == 6
    assert torch.equal(small[0].images, small[1].images[torch.arange(6)])
    assert small[0].ids == small[1].ids and torch.equal(small[0].labels, small[1].labels)
    rows = [ids.index(i) for i in small[0].ids]
    assert rows == sorted(rows) and len(set(rows)) == 6  # kept in row order, no repeats
    assert torch.equal(small[0].images, resident[rows]) and small[0].ids != sets[0].subsample(6, seed=2).ids
