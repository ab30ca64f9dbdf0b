"""Data-parallel training over several processes: torchrun, DDP, and who is rank 0.

`train.gpus: N` (or `genloop train --gpus N`) makes the train stage launch itself under
`torchrun --standalone --nproc_per_node N`; each process trains on its own slice of every
global batch through DistributedDataParallel (NCCL on GPUs, gloo on CPU), and only rank 0
talks to MLflow and writes checkpoints, grids, reports and the generator.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genloop.core.errors import GenloopError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current() -> World:
    """The world torchrun describes in the environment (a single process when it does not)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("WORLD_SIZE", 1)))


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the process group for the duration of training (nothing to do for one process)."""
    if not world.distributed:
        yield
        return
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def wrap_modules(trainer: Any, device: torch.device) -> None:
    """Replace each of the trainer's modules (attribute named as in `trainer.modules()`) with a
    DistributedDataParallel wrapper; rank 0's initial weights are broadcast to all."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    for name, module in trainer.modules().items():
        if getattr(trainer, name, None) is not module:
            raise GenloopError(f"{type(trainer).__name__}.modules() key {name!r} is not the attribute holding it")
        device_ids = [device.index] if device.type == "cuda" else None
        setattr(trainer, name, DDP(module, device_ids=device_ids))


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module


def launch(nproc: int, params_file: Path, workspace: Path) -> None:
    """Run `genloop train` under torchrun with `nproc` processes and wait for it.

    Raises GenloopError with the tail of the output when any process fails.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "genloop.cli.main", "train", "--params", str(params_file), "--workspace", str(workspace)]
    log.info("train: launching %d processes: %s", nproc, " ".join(cmd))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(cmd, cwd=workspace, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-4000:]
        raise GenloopError(f"distributed training ({nproc} processes under torchrun) failed:\n{tail}")
