"""Generative model families, one self-contained module each, chosen by `model.family`.

Every family module exposes:

- `DEFAULTS`: its hyper-parameters' defaults (the spec's `hparams` override them);
- `latent_shape(spec)`: the shape of one sample's latent, drawn from N(0, I) by `sample`;
- `build_generator(spec)`: the module that is saved, registered and sampled from;
- `Trainer(spec, lr, beta1, device)` with `.generator`, `.modules()`, `.optimizers()` and
  `.step(real, labels, autocast) -> {name: detached loss tensor}`;
- optionally `generate(gen, spec, latent, labels) -> images in [-1, 1]`, for families whose
  sampling is more than one call of the generator (DDPM's sampler loop); without it, sampling
  is `gen(latent, labels)`;
- optionally `finish(trainer, generator, images, labels, seed) -> dict`, run once after the last
  step on the generator that is saved (the VAE fits its latent prior there).

A `GeneratorSpec` (saved as JSON beside the weights) is all that is needed to rebuild a
generator from its state dict, in training, evaluation and the MLflow pyfunc model.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from genloop.core.errors import GenloopError
from genloop.models.spec import GeneratorSpec

FAMILIES = ("dcgan", "vae", "ddpm")


def family(name: str) -> ModuleType:
    """The module implementing a model family."""
    # explicit imports (not by name), so the code each stage depends on can be read from the source
    if name == "vae":
        from genloop.models import vae as module
    elif name == "dcgan":
        from genloop.models import dcgan as module
    elif name == "ddpm":
        from genloop.models import ddpm as module
    else:
        raise GenloopError(f"model.family={name!r} is unknown; choose one of {', '.join(FAMILIES)}")
    return module


def generate(
    gen: torch.nn.Module, spec: GeneratorSpec, latent: torch.Tensor, labels: torch.Tensor | None
) -> torch.Tensor:
    """Images in [-1, 1] from a batch of latents: the family's `generate`, else `gen(latent, labels)`."""
    custom = getattr(family(spec.family), "generate", None)
    return custom(gen, spec, latent, labels) if custom is not None else gen(latent, labels)


_GLOBAL = re.compile(r"GLOBAL (\S+)")


def _load_failure(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, without torch's advice to retry
    with weights_only=False (which would run whatever the file holds)."""
    text = str(exc)
    if found := _GLOBAL.search(text):
        return f"it references {found.group(1).rstrip('.,')}, which is not a tensor type"
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = text.split("Check the documentation of torch.load")[0]
    kept = [s for s in re.split(r"(?<=\.)\s+", " ".join(text.split())) if s and "weights_only" not in s
            and "trusted source" not in s and "file an issue" not in s]
    detail = " ".join(kept[:2])[:300].rstrip(".") or "the file is empty, truncated or not a torch file"
    return f"{exc.__class__.__name__}: {detail}"


def load_torch_file(path: Path, what: str, keys: tuple[str, ...] = (), fix: str = "") -> dict[str, Any]:
    """The dict of tensors (a state dict, a checkpoint, cached statistics) saved in `path`.

    Read with `torch.load(weights_only=True)`: tensors, numbers, strings and containers only,
    so a tampered file cannot run code. Anything else (a pickled object, a corrupt or empty
    file, a file without the `keys` genloop wrote) raises GenloopError naming the file and
    `what` it should hold; `fix` says what to do (e.g. delete the file and rerun a stage).
    """
    path = Path(path)
    hint = f" {fix}" if fix else ""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip), EOFError, ...
        why = _load_failure(exc)
        raise GenloopError(
            f"{path} ({what}) is not a plain tensor/state-dict file and was not loaded: {why}. genloop reads "
            f"only tensors from such files, never pickled Python objects (they could run code).{hint}"
        ) from None
    if not isinstance(obj, dict):
        raise GenloopError(
            f"{path} ({what}) is not a plain tensor/state-dict file: it holds a {type(obj).__name__}, "
            f"not a dict of tensors.{hint}"
        )
    missing = [k for k in keys if k not in obj]
    if missing:
        raise GenloopError(f"{path} ({what}) lacks {', '.join(missing)}: not a file genloop wrote.{hint}")
    return obj


def save_generator(module: torch.nn.Module, spec: GeneratorSpec, weights: Path) -> None:
    """Write the generator's state dict and spec (weights.with_suffix('.json')) atomically."""
    from genloop.core.storage import atomic_path, write_text_atomic

    with atomic_path(weights) as tmp:
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, tmp)
    write_text_atomic(weights.with_suffix(".json"), spec.to_json())


def load_generator(weights: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, GeneratorSpec]:
    """Rebuild a generator from its state dict (loaded with weights_only=True) and spec."""
    spec_path = Path(weights).with_suffix(".json")
    if not Path(weights).exists() or not spec_path.exists():
        raise GenloopError(f"generator {weights} (+ {spec_path.name}) not found: run `genloop train`")
    spec = GeneratorSpec.from_json(spec_path.read_text())
    gen = family(spec.family).build_generator(spec)
    state = load_torch_file(weights, "generator weights", fix="Retrain it with `genloop train`.")
    try:
        gen.load_state_dict(state)
    except RuntimeError as exc:
        raise GenloopError(
            f"{weights} (generator weights) does not fit the {spec.family} generator of {spec_path.name}: "
            f"{str(exc).splitlines()[0]}. Retrain it with `genloop train`."
        ) from None
    return gen.to(device).eval(), spec


def class_labels(spec: GeneratorSpec, n: int, label: str | int | None) -> torch.Tensor | None:
    """Class indices for `n` samples: all `label`, or cycling through the classes."""
    if not spec.classes:
        return None
    if label is None:
        return torch.arange(n) % spec.num_classes
    name = str(label)
    if name not in spec.classes:
        raise GenloopError(f"label {name!r} is not a class of this model; classes: {spec.classes}")
    return torch.full((n,), spec.classes.index(name), dtype=torch.long)


@torch.no_grad()
def sample(
    gen: torch.nn.Module,
    spec: GeneratorSpec,
    n: int,
    seed: int,
    label: str | int | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """`n` images as uint8 NHWC, the same for the same seed on any device.

    The latent is the only randomness: it is drawn on the CPU from `seed`, and every family
    turns it into images deterministically (DDPM: DPM-Solver++ or DDIM with eta=0).
    """
    device = next(gen.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    latent = family(spec.family).latent_shape(spec)
    z = torch.randn((n, *latent), generator=rng)
    labels = class_labels(spec, n, label)
    out = []
    for start in range(0, n, batch_size):
        zb = z[start : start + batch_size].to(device)
        yb = labels[start : start + batch_size].to(device) if labels is not None else None
        x = generate(gen, spec, zb, yb).float().clamp(-1, 1)
        out.append(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, spec.resolution, spec.resolution, spec.channels), np.uint8)
