"""Device choice and the performance switches that go with it (precision, memory format)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from genloop.core.config import ParallelParams


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    channels_last: bool

    def autocast(self) -> Callable[[], Any]:
        """A factory of autocast contexts: bf16 on CUDA when enabled, else a no-op."""
        if self.bf16:
            return lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        return f"{name} ({'bf16' if self.bf16 else 'fp32'}{', channels_last' if self.channels_last else ''})"


def pick_device(choice: str = "auto") -> torch.device:
    """CUDA if present, else Apple MPS, else CPU; an explicit choice must be available."""
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        from genloop.core.errors import ConfigError

        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto")
    return torch.device(choice)


def runtime(device: str, precision: str, channels_last: str, threads: int = 0) -> Runtime:
    """Resolve the `train.*` performance settings for this machine."""
    dev = pick_device(device)
    if dev.type == "cpu" and threads:
        torch.set_num_threads(threads)
    bf16 = precision == "bf16" or (precision == "auto" and dev.type == "cuda")
    cl = channels_last == "yes" or (channels_last == "auto" and dev.type == "cuda")
    return Runtime(dev, bf16, cl)



@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block, then put back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_per_chunk(settings: ParallelParams, n_chunks: int) -> int:
    """torch threads for each chunk of a chunk map: all of this process's when the chunks run here
    (serial, or a single chunk), one on Dask (a worker runs one chunk per thread; genloop's
    clusters give each worker one), else the cores shared out among the worker processes. The
    generators' samples were checked bit-identical at 1 and 2 threads (bench/README.md); the
    evaluation extractor's features agree to float rounding (tests/integration/test_embed_parallel.py)."""
    if settings.engine == "serial" or n_chunks <= 1:
        return torch.get_num_threads()
    if settings.engine == "dask":
        return 1
    return max(1, settings.worker_count() // min(settings.worker_count(), n_chunks))
