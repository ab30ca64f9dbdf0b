"""Freed heap memory goes back to the system when the judges' phases end."""

from __future__ import annotations

import gc
import sys

import psutil
import pytest

from genloop.core.heap import release_free_heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_blocks_between_live_ones_are_returned_to_the_system():
    process = psutil.Process()
    blocks = [bytearray(100_000) for _ in range(3000)]  # heap blocks, below glibc's mmap threshold
    for block in blocks:
        block[::4096] = b"\x01" * len(block[::4096])  # touched: resident
    kept = blocks[1::2]  # every other block stays alive, so the freed ones are holes, not the heap's top
    del blocks
    gc.collect()
    held = process.memory_info().rss
    assert release_free_heap()
    assert held - process.memory_info().rss > 100e6  # about 150 MB of holes
    assert len(kept) == 1500


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_arrows_pool_gives_back_what_a_dropped_table_held():
    """The manifest's Arrow strings come from Arrow's own pool, which otherwise keeps the pages."""
    import pyarrow as pa

    process = psutil.Process()
    before = process.memory_info().rss
    column = pa.array([f"{i:064x}" for i in range(1_000_000)])  # about 70 MB, like 1M image ids
    assert pa.total_allocated_bytes() > 60e6
    del column
    gc.collect()
    held = process.memory_info().rss
    assert release_free_heap()
    assert held - process.memory_info().rss > 50e6
    assert process.memory_info().rss - before < 30e6
