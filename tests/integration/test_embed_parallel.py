"""The embedding pass of a streamed split on every engine (this process, a pool of processes,
Dask's real scheduler and workers on 127.0.0.1): the features one process computes from the
same images held in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from genloop.core.config import ParallelParams
from genloop.core.shards import ShardedImages, shard_name, write_shard
from genloop.eval.embed_chunk import embed_split
from genloop.eval.extractors import DomainExtractor, Extractor, embed

pytest.importorskip("distributed")


def test_a_streamed_split_embeds_alike_on_every_engine(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images, names, offsets = [], [], []
    for k, n in enumerate((300, 250, 150)):  # three shards, as clean writes them
        block = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
        name = shard_name([f"chunk{k}"])
        write_shard(tmp_path / name, block)
        images.append(block)
        names += [name] * n
        offsets += list(range(n))
    resident = torch.from_numpy(np.concatenate(images).transpose(0, 3, 1, 2).copy())
    torch.manual_seed(0)
    module = DomainExtractor(3, 16, 4).eval()
    weights = tmp_path / "extractor.pt"
    torch.save(module.state_dict(), weights)
    extractor = Extractor(module, "domain-classifier", weights, "v", None, "test", "f")
    expected = embed(module, resident)

    streamed = ShardedImages(tmp_path, names, offsets)
    for engine in ("serial", "processes", "dask"):
        settings = ParallelParams(engine=engine, workers=2, chunk_size=256)  # 3 chunks, the last one short
        features = embed_split(extractor, streamed, settings)
        assert features.shape == (700, DomainExtractor.num_features), engine
        assert torch.allclose(features, expected, atol=1e-5), engine
    assert torch.equal(embed_split(extractor, resident, ParallelParams(engine="processes")), expected)  # in memory
