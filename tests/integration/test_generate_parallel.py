"""generate's chunks on every engine: in this process, in a pool of processes and on Dask's real
scheduler and workers on 127.0.0.1 (a local cluster through Prefect's DaskTaskRunner), the same
PNG files and rows; and a chunk run twice (its worker died) leaves what one run leaves."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from genloop.core.chunk_map import chunk_map, chunked
from genloop.core.config import ParallelParams
from genloop.models import family, save_generator
from genloop.models.spec import GeneratorSpec
from genloop.stages.generate_chunk import GenerateJob, batch_starts, generate_chunk

pytest.importorskip("distributed")

N, BATCH = 50, 8  # 7 batches, the last one short


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small RGB generator with three classes, as the stage saves the champion for its workers."""
    spec = GeneratorSpec("vae", 16, 3, ["a", "b", "c"], {"latent_dim": 8, "width": 8})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("champion") / "generator.pt"
    save_generator(family("vae").build_generator(spec), spec, path)
    return path


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def run_engine(weights: Path, folder: Path, engine: str) -> list[dict[str, object]]:
    folder.mkdir()
    job = GenerateJob(weights=weights, folder=folder, n=N, batch_size=BATCH, seed=3, label=None, device="cpu",
                      threads=1)
    chunks = chunked(batch_starts(N, BATCH), 2)
    results = chunk_map(partial(generate_chunk, job), chunks, ParallelParams(engine=engine, workers=2))
    return [row for chunk in results for row in chunk]


def test_every_engine_writes_the_same_images_and_rows(weights: Path, tmp_path: Path) -> None:
    serial = run_engine(weights, tmp_path / "serial", "serial")
    assert [r["file"] for r in serial] == [f"{i:06d}.png" for i in range(N)]
    assert [r["seed"] for r in serial] == [3 + (i // BATCH) * BATCH for i in range(N)]  # one seed per batch
    assert [r["label"] for r in serial[:4]] == ["a", "b", "c", "a"]  # cycling through the classes
    reference = files(tmp_path / "serial")
    assert len(reference) == N and len(set(reference.values())) == N  # distinct images
    for engine in ("processes", "dask"):
        assert run_engine(weights, tmp_path / engine, engine) == serial, engine
        assert files(tmp_path / engine) == reference, engine


def test_a_chunk_run_twice_leaves_what_one_run_leaves(weights: Path, tmp_path: Path) -> None:
    job = GenerateJob(weights=weights, folder=tmp_path, n=N, batch_size=BATCH, seed=3, label="b", device="cpu",
                      threads=1)
    first = generate_chunk(job, [16, 24])
    written = files(tmp_path)
    (tmp_path / "000017.png").write_bytes(b"half a file")  # what a worker killed mid-write leaves
    assert generate_chunk(job, [16, 24]) == first
    assert files(tmp_path) == written and len(written) == 2 * BATCH
    assert {r["label"] for r in first} == {"b"}


def test_a_label_the_model_does_not_know_is_refused_naming_its_classes(weights: Path, tmp_path: Path) -> None:
    from genloop.core.errors import GenloopError

    job = GenerateJob(weights=weights, folder=tmp_path, n=N, batch_size=BATCH, seed=3, label="z", device="cpu",
                      threads=1)
    with pytest.raises(GenloopError, match=r"label 'z' is not a class of this model; classes: \['a', 'b', 'c'\]"):
        generate_chunk(job, [0])
    assert list(tmp_path.iterdir()) == []  # nothing written
