"""train: fit the generator on data/clean's train split and log it all to MLflow.

The whole train split sits on the training device as uint8 (no DataLoader) when it fits in
`train.memory_budget_gb`; a larger one streams from data/clean's shards, each batch read while
the step before runs (`genloop.core.shards.ShardedImages`). Either way batches are drawn from
the same seeded permutation, so both give the same model. EMA weights are kept and are what evaluation and generation
use. Checkpoints (models, optimizers, EMA, RNG states, step) are written every
`train.checkpoint_every` steps; with `train.resume: auto` a rerun continues from the last
one, so a killed run loses at most that many steps. With `train.max_minutes` training stops after
the step that spends that many wall-clock minutes (counted across resumed runs) and publishes as a
full run does; its checkpoints are kept apart from unbudgeted ones, so a budget-ended model is
never resumed as if it had finished `train.epochs`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from torch.optim.swa_utils import AveragedModel

from genloop.core.config import Params
from genloop.core.dataset import ImageSet, load_split, to_unit
from genloop.core.grids import make_grid
from genloop.core.manifest import corpus_mode
from genloop.core.progress import Progress
from genloop.core.provenance import data_version
from genloop.core.storage import atomic_path, read_json, sha256_bytes, write_json_atomic, write_text_atomic
from genloop.core.workspace import Workspace
from genloop.mlops import tracking
from genloop.models import GeneratorSpec, distributed, family, load_torch_file, sample, save_generator
from genloop.models.device import Runtime, runtime

log = logging.getLogger(__name__)
GRID_SEED = 7


def _spec(cfg: Params, data: ImageSet, mode: str) -> GeneratorSpec:
    """The generator to train; `mode`: the corpus mode clean resolved (not data.mode, which may be auto)."""
    conditional = cfg.model.conditional == "yes" or (
        cfg.model.conditional == "auto" and data.labels is not None
    )
    if cfg.model.conditional == "yes" and data.labels is None:
        from genloop.core.errors import ConfigError

        raise ConfigError("model.conditional=yes but the dataset has no labels on every image")
    hparams = getattr(cfg.model, cfg.model.family).model_dump()
    return GeneratorSpec(
        family=cfg.model.family,
        resolution=cfg.data.resolution,
        channels=1 if mode == "L" else 3,
        classes=data.classes if conditional else [],
        hparams=hparams,
    )


class EmaUpdater:
    """Updates an AveragedModel (whose state dict the checkpoints hold) as an EMA of the model's
    weights and buffers, with a decay that ramps up as min(decay, (1 + n) / (10 + n)) so a short
    run's EMA is not mostly the random initialisation.

    Cheaper than AveragedModel.update_parameters: the tensor lists are built once and updated
    with one foreach lerp, and the update count is read from the device once (a resumed run
    continues the same ramp)."""

    def __init__(self, ema: AveragedModel, decay: float) -> None:
        self.ema = ema
        self.decay = decay
        self._n: int | None = None
        self._float: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._other: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> None:
        if self._n is None:
            mine = [*self.ema.module.parameters(), *self.ema.module.buffers()]
            theirs = [*model.parameters(), *model.buffers()]
            pairs = list(zip(mine, theirs, strict=True))
            self._float = ([e.detach() for e, m in pairs if e.is_floating_point()],
                           [m.detach() for e, m in pairs if e.is_floating_point()])
            self._other = [(e.detach(), m.detach()) for e, m in pairs if not e.is_floating_point()]
            self._n = int(self.ema.n_averaged)
        n = self._n
        d = 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))  # the first update copies
        torch._foreach_lerp_(self._float[0], self._float[1], 1.0 - d)
        for e, m in self._other:  # integer buffers (BatchNorm's batch counter)
            e.copy_(e * d + m * (1 - d))
        self.ema.n_averaged += 1
        self._n = n + 1


def checkpoint_dir(cfg: Params, ws: Workspace, world_size: int = 1) -> Path:
    """Checkpoints are shared only by runs with the same data and training settings (and, for a
    wall-clock budget, the same `train.max_minutes`: its checkpoint counts the minutes spent)."""
    t = cfg.train
    budget = "" if t.max_minutes is None else f"|max_minutes={t.max_minutes}"
    key = sha256_bytes(
        f"{data_version(ws)}|{cfg.section_hash('data', 'model')}|{corpus_mode(ws.manifest)}|"
        f"{t.batch_size}|{t.lr}|{t.beta1}|{t.ema_decay}|{t.seed}|{t.precision}|{world_size}{budget}".encode()
    )[:16]
    return ws.cache / "checkpoints" / key


def _save_checkpoint(path: Path, trainer: Any, ema: AveragedModel, state: dict[str, Any]) -> None:
    payload = {
        "modules": {k: distributed.unwrap(m).state_dict() for k, m in trainer.modules().items()},
        "optimizers": {k: o.state_dict() for k, o in trainer.optimizers().items()},
        "ema": ema.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **state,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


CHECKPOINT_KEYS = ("modules", "optimizers", "ema", "torch_rng", "cuda_rng", "step", "epoch_rng_state")


def _load_checkpoint(path: Path, trainer: Any, ema: AveragedModel) -> dict[str, Any]:
    payload = load_torch_file(path, "training checkpoint", keys=CHECKPOINT_KEYS,
                              fix="Delete it to train from step 0 (or set train.resume=never).")
    for k, m in trainer.modules().items():
        distributed.unwrap(m).load_state_dict(payload["modules"][k])
    for k, o in trainer.optimizers().items():
        o.load_state_dict(payload["optimizers"][k])
    ema.load_state_dict(payload["ema"])
    torch.set_rng_state(payload["torch_rng"])
    if payload["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    return payload


def _grid(ema: AveragedModel, spec: GeneratorSpec, n: int) -> Any:
    images = sample(ema.module, spec, n, seed=GRID_SEED)
    return make_grid(images, columns=spec.num_classes or None, scale=2)


def _launch_distributed(cfg: Params, ws: Workspace) -> dict[str, Any]:
    """Run this stage under torchrun with `train.gpus` processes; their rank 0 writes the report."""
    params_file = ws.cache / "torchrun" / "params.yaml"
    write_text_atomic(params_file, yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
    distributed.launch(cfg.train.gpus, params_file, ws.root)
    return read_json(ws.report("train"))


def run(cfg: Params, ws: Workspace) -> dict[str, Any]:
    """Train the configured family; write models/generator.pt(+.json) and reports/train.*

    With `train.gpus` > 1 (and not yet under torchrun) the stage relaunches itself as that
    many DDP processes and returns rank 0's summary.
    """
    world = distributed.current()
    if cfg.train.gpus > 1 and not world.distributed:
        return _launch_distributed(cfg, ws)
    rt = runtime(cfg.train.device, cfg.train.precision, cfg.train.channels_last, cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    with distributed.process_group(world, rt.device):
        return _train(cfg, ws, rt, world)


@dataclass
class _Session:
    """Everything one training run works with, built once by `_prepare`."""

    cfg: Params
    ws: Workspace
    rt: Runtime
    world: distributed.World
    data: ImageSet
    spec: GeneratorSpec
    trainer: Any
    step_fn: Any
    ema: AveragedModel
    update_ema: EmaUpdater
    batch: int  # per process; a global batch is world.size x batch
    steps_per_epoch: int
    total_steps: int
    last: Path  # the checkpoint file
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    data_rng: torch.Generator = field(default_factory=torch.Generator)
    epoch_rng_state: torch.Tensor | None = None
    trained_before: float = 0.0  # seconds of training steps before this run's clock (resumed runs)
    clock: float | None = None  # perf_counter when this run's steps started; None when stopped
    budget_ended: bool = False  # train.max_minutes stopped training before total_steps
    finished: dict[str, Any] = field(default_factory=dict)  # what the family's `finish` fitted (VAE: its prior)

    @property
    def labels_on(self) -> bool:
        return bool(self.spec.classes)

    def seconds_trained(self) -> float:
        """Wall-clock seconds of training steps, this run's and those of the runs it resumed."""
        return self.trained_before + (time.perf_counter() - self.clock if self.clock is not None else 0.0)

    def stop_clock(self) -> None:
        self.trained_before, self.clock = self.seconds_trained(), None

    def check_budget(self) -> None:
        """Set `budget_ended` once train.max_minutes is spent (rank 0's clock decides for every rank)."""
        budget = self.cfg.train.max_minutes
        if budget is None or self.step >= self.total_steps:
            return
        spent = self.seconds_trained() >= 60.0 * budget
        if self.world.distributed:  # every rank must stop after the same step
            import torch.distributed as dist

            flag = torch.tensor([int(spent)], device=self.rt.device)
            dist.broadcast(flag, src=0)
            spent = bool(flag.item())
        self.budget_ended = spent

    def checkpoint(self) -> None:
        _save_checkpoint(self.last, self.trainer, self.ema, {
            "step": self.step, "epoch_rng_state": self.epoch_rng_state, "history_rows": self.history,
            "trained_seconds": self.seconds_trained(), "budget_ended": self.budget_ended})


def _prepare(cfg: Params, ws: Workspace, rt: Runtime, world: distributed.World) -> _Session:
    """Data on the device, the family's trainer, the EMA copy and the step budget."""
    t = cfg.train
    torch.manual_seed(t.seed)
    data = load_split(ws, "train", memory_budget_gb=t.memory_budget_gb)
    if not isinstance(data.images, torch.Tensor):
        log.info("train: the train split (%.1f GB) is over train.memory_budget_gb=%s: streaming it from "
                 "data/clean's shards", data.nbytes / 1e9, t.memory_budget_gb)
    spec = _spec(cfg, data, corpus_mode(ws.manifest))
    data = data.to(rt.device)
    trainer = family(spec.family).Trainer(spec, t.lr, t.beta1, rt.device)
    if rt.channels_last:
        for m in trainer.modules().values():
            m.to(memory_format=torch.channels_last)
    step_fn = torch.compile(trainer.step) if t.compile else trainer.step
    ema = AveragedModel(trainer.generator, use_buffers=True)
    ema.module.eval()
    if world.distributed:
        distributed.wrap_modules(trainer, rt.device)  # rank 0's initial weights go to every rank
        torch.manual_seed(t.seed + world.rank)  # each rank draws its own noise
    n = len(data)
    batch = min(t.batch_size, max(1, n // world.size))
    steps_per_epoch = max(1, n // (batch * world.size))
    data_rng = torch.Generator().manual_seed(t.seed + 1)
    return _Session(cfg, ws, rt, world, data, spec, trainer, step_fn, ema, EmaUpdater(ema, t.ema_decay), batch,
                    steps_per_epoch, steps_per_epoch * t.epochs, checkpoint_dir(cfg, ws, world.size) / "last.pt",
                    data_rng=data_rng, epoch_rng_state=data_rng.get_state())


def _resume(s: _Session) -> None:
    """Continue from the last checkpoint of the same settings, unless it is past the steps asked for.

    Checkpoints are shared by runs that differ only in `train.epochs`: a 3-epoch run must not
    return the 10-epoch model, so a checkpoint beyond the target is not resumed.
    """
    if s.cfg.train.resume != "auto" or not s.last.exists():
        return
    state = _load_checkpoint(s.last, s.trainer, s.ema)
    if int(state["step"]) > s.total_steps:
        log.info("train: the checkpoint %s is at step %d, past the %d steps asked for (train.epochs=%d): "
                 "training from step 0", s.last, int(state["step"]), s.total_steps, s.cfg.train.epochs)
        # the checkpoint's weights, optimizer state and RNG were loaded: start over from scratch
        fresh = _prepare(s.cfg, s.ws, s.rt, s.world)
        s.__dict__.update(fresh.__dict__)
        return
    s.step, s.history = int(state["step"]), list(state.get("history_rows", []))
    s.epoch_rng_state = state["epoch_rng_state"]
    s.trained_before = float(state.get("trained_seconds", 0.0))  # train.max_minutes counts these too
    log.info("train: resuming from %s at step %d (%.1f s trained)", s.last, s.step, s.trained_before)


def _step_values(s: _Session, losses: dict[str, torch.Tensor], resumed_from: int, start: float) -> dict[str, float]:
    values = {k: float(v) for k, v in losses.items()}
    # one family-neutral column for dvc plots: a GAN reports its players' sum
    values.setdefault("loss", sum(v for k, v in values.items() if k.startswith("loss_")))
    values["img_per_s"] = (s.step - resumed_from) * s.batch * s.world.size / (time.perf_counter() - start)
    return values


def _batches(s: _Session, perm: torch.Tensor, steps: range) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(row indices, uint8 images on the device) of each step of an epoch. Images streamed from
    data/clean's shards (`ShardedImages`) are read one batch ahead in a thread, while the step
    before runs; the batches are the same as from a resident tensor."""
    def rows(i: int) -> torch.Tensor:
        first = (i * s.world.size + s.world.rank) * s.batch  # this rank's slice of the global batch
        return perm[first : first + s.batch]

    if isinstance(s.data.images, torch.Tensor):
        for i in steps:
            idx = rows(i)
            yield idx, s.data.images[idx]
        return
    read = s.data.images.__getitem__
    with ThreadPoolExecutor(1, thread_name_prefix="shard-reader") as pool:
        ahead = pool.submit(read, rows(steps[0])) if len(steps) else None
        for k, i in enumerate(steps):
            assert ahead is not None
            images = ahead.result()
            if k + 1 < len(steps):
                ahead = pool.submit(read, rows(steps[k + 1]))
            yield rows(i), images.to(s.rt.device, non_blocking=True)


def _epochs(s: _Session, metrics: tracking.MetricBuffer | None, bar: Progress, resumed_from: int) -> None:
    """The training loop: epochs of seeded permutations, EMA updates, logs and checkpoints."""
    t, main = s.cfg.train, s.world.is_main
    s.clock = start = time.perf_counter()
    s.check_budget()  # a resumed run may have spent train.max_minutes already
    n = len(s.data)
    while s.step < s.total_steps and not s.budget_ended:
        epoch = s.step // s.steps_per_epoch
        s.data_rng.set_state(s.epoch_rng_state)
        perm = torch.randperm(n, generator=s.data_rng).to(s.rt.device)
        for idx, images in _batches(s, perm, range(s.step - epoch * s.steps_per_epoch, s.steps_per_epoch)):
            x = to_unit(images)
            if s.rt.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = s.data.labels[idx] if s.labels_on and s.data.labels is not None else None
            losses = s.step_fn(x, y, s.rt.autocast())
            s.update_ema(distributed.unwrap(s.trainer.generator))
            s.step += 1
            s.check_budget()
            if metrics is not None and (s.step % t.log_every == 0 or s.step == s.total_steps or s.budget_ended):
                values = _step_values(s, losses, resumed_from, start)
                metrics.add(s.step, values)
                s.history.append({"step": s.step, "epoch": epoch + 1, **values})
                # whatever the family reports (GAN: loss_d/loss_g, VAE: loss/recon/kl, DDPM: loss)
                bar.advance(0, **{k: v for k, v in values.items() if k != "img_per_s"},
                            img_s=round(values["img_per_s"]))
            bar.advance()
            if main and s.step % t.checkpoint_every == 0:
                s.checkpoint()
            if s.budget_ended:
                break
        if s.step < (epoch + 1) * s.steps_per_epoch:  # ended mid-epoch: a resumed run redraws this permutation
            break
        s.epoch_rng_state = s.data_rng.get_state()
        if metrics is not None:
            metrics.image(_grid(s.ema, s.spec, t.grid_size), f"samples/epoch_{epoch + 1:03d}.png")
    s.stop_clock()


def _publish(s: _Session) -> None:
    """Rank 0's outputs: the last checkpoint, the EMA generator, the final grid and the loss curve."""
    s.checkpoint()
    finish = getattr(family(s.spec.family), "finish", None)
    if finish is not None:
        labels = s.data.labels if s.labels_on else None
        s.finished = finish(s.trainer, s.ema.module, s.data.images, labels, seed=s.cfg.train.seed)
    save_generator(s.ema.module, s.spec, s.ws.generator)
    final_grid = _grid(s.ema, s.spec, s.cfg.train.grid_size)
    tracking.log_image(final_grid, "samples/final.png")
    s.ws.reports.mkdir(parents=True, exist_ok=True)
    with atomic_path(s.ws.reports / "train_samples.png") as tmp:
        final_grid.save(tmp, format="PNG")
    with atomic_path(s.ws.reports / "train.csv") as tmp:
        pd.DataFrame(s.history).to_csv(tmp, index=False)


def _summary(s: _Session, run_id: str, resumed_from: int, seconds: float) -> dict[str, Any]:
    trained = s.step - resumed_from
    return {
        "run_id": run_id,
        "family": s.spec.family,
        "conditional": s.labels_on,
        "classes": s.spec.classes,
        "images": len(s.data),
        "steps": s.step,
        "epochs": s.cfg.train.epochs,
        "epochs_done": round(s.step / s.steps_per_epoch, 3),
        "images_seen": s.step * s.batch * s.world.size,
        "max_minutes": s.cfg.train.max_minutes,
        "ended_by": "train.max_minutes" if s.budget_ended else "train.epochs",
        "seconds_trained_total": round(s.trained_before, 2),
        "resumed_from_step": resumed_from,
        "seconds": round(seconds, 2),
        "img_per_s": round(trained * s.batch * s.world.size / seconds, 1) if trained and seconds > 0 else None,
        "device": s.rt.describe(),
        "streamed": not isinstance(s.data.images, torch.Tensor),  # from data/clean's shards, per batch
        "world_size": s.world.size,
        "batch_per_process": s.batch,
        "final": {k: v for k, v in (s.history[-1] if s.history else {}).items()
                  if k not in ("step", "epoch", "img_per_s")},
        "finish": s.finished,
    }


def _train(cfg: Params, ws: Workspace, rt: Runtime, world: distributed.World) -> dict[str, Any]:
    s = _prepare(cfg, ws, rt, world)
    _resume(s)
    resumed_from = s.step
    main = world.is_main  # only rank 0 logs to MLflow and writes files
    with tracking.stage_run(ws, cfg, "train", log_params=True) if main else contextlib.nullcontext() as run:
        if main:
            tracking.tag_run({"genloop.device": rt.describe(), "genloop.resumed_from_step": resumed_from,
                              "genloop.world_size": world.size, "genloop.data_mode": corpus_mode(ws.manifest)})
        metrics = tracking.MetricBuffer(run.info.run_id, every=cfg.train.log_every) if main else None
        start = time.perf_counter()
        if not main:  # one progress report per run, not one per process
            logging.getLogger("genloop.core.progress").setLevel(logging.WARNING)
        with Progress("train", s.total_steps, "steps") as bar:
            bar.advance(s.step)
            _epochs(s, metrics, bar, resumed_from)
        if metrics is not None:
            metrics.flush()  # counted in the training time: the loop is done when its logs are sent
        seconds = time.perf_counter() - start
        distributed.barrier(world)
        if not main:
            return {"rank": world.rank, "steps": s.step, "seconds": round(seconds, 2)}
        _publish(s)
        summary = _summary(s, run.info.run_id, resumed_from, seconds)
        tracking.log_metrics({"train_seconds": seconds, "train_steps": s.step,
                              "train_epochs_done": summary["epochs_done"]})
        tracking.tag_run({"genloop.ended_by": summary["ended_by"]})
    write_json_atomic(ws.report("train"), summary)
    log.info("train: %d steps in %.1fs on %s", s.step, seconds, rt.describe())
    if s.budget_ended:
        log.info("train: train.max_minutes=%g ended training after step %d of %d (%.2f of %d epochs)",
                 cfg.train.max_minutes, s.step, s.total_steps, summary["epochs_done"], cfg.train.epochs)
    return summary
