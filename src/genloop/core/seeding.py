"""Seeded blocks of code on torch's global generator, which is left as it was found."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global CPU generator seeded by `seed`, then restore its state.

    For code that draws from the global generator and cannot be handed a `torch.Generator`:
    module constructors (initial weights) and torchmetrics' subset sampling."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
