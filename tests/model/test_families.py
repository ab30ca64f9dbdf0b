"""Model family contracts: shapes, conditioning, determinism, checkpoint loading, and the
real train/evaluate/register stages for every family."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from genloop.core.config import ModelParams
from genloop.core.errors import GenloopError
from genloop.models import FAMILIES, GeneratorSpec, family, load_generator, sample, save_generator
from tests.helpers import expected_extractor, expected_steps

SMALL = {"latent_dim": 8, "g_width": 8, "d_width": 8}
TINY_HP = {
    "dcgan": SMALL,
    "vae": {"latent_dim": 8, "width": 8, "kl_warmup_steps": 2},
    "ddpm": {"block_out_channels": [8, 16], "timesteps": 50, "sampling_steps": 3},
}


@pytest.mark.parametrize("resolution,channels,classes", [(16, 1, []), (32, 3, ["a", "b", "c"]), (8, 1, ["x"])])
def test_dcgan_trains_a_step_and_samples_the_configured_shape(resolution, channels, classes):
    spec = GeneratorSpec("dcgan", resolution, channels, classes, SMALL)
    trainer = family("dcgan").Trainer(spec, lr=1e-3, beta1=0.5, device=torch.device("cpu"))
    real = torch.rand(4, channels, resolution, resolution) * 2 - 1
    labels = torch.tensor([i % len(classes) for i in range(4)]) if classes else None
    before = [p.clone() for p in trainer.generator.parameters()]
    losses = trainer.step(real, labels, contextlib.nullcontext)
    assert set(losses) >= {"loss_d", "loss_g"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.generator.parameters(), strict=True))
    images = sample(trainer.generator.eval(), spec, 5, seed=1)
    assert images.shape == (5, resolution, resolution, channels)
    assert images.dtype == np.uint8


def test_sampling_is_deterministic_per_seed_and_labels_pick_the_class():
    spec = GeneratorSpec("dcgan", 16, 1, ["0", "1"], SMALL)
    gen = family("dcgan").build_generator(spec).eval()
    a, b, c = sample(gen, spec, 6, seed=3), sample(gen, spec, 6, seed=3), sample(gen, spec, 6, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    only_one = sample(gen, spec, 4, seed=3, label="1")
    assert only_one.shape == (4, 16, 16, 1)
    with pytest.raises(GenloopError, match="not a class"):
        sample(gen, spec, 2, seed=0, label="7")


def test_generator_round_trips_through_a_state_dict(tmp_path):
    spec = GeneratorSpec("dcgan", 16, 1, [], SMALL)
    gen = family("dcgan").build_generator(spec).eval()
    save_generator(gen, spec, tmp_path / "g.pt")
    loaded, loaded_spec = load_generator(tmp_path / "g.pt")
    assert loaded_spec == spec
    assert np.array_equal(sample(gen, spec, 3, seed=9), sample(loaded, loaded_spec, 3, seed=9))
    # the weights file is a plain state dict: loadable with weights_only=True
    state = torch.load(tmp_path / "g.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_unknown_family_is_named():
    with pytest.raises(GenloopError, match="model.family='stylegan'"):
        family("stylegan")


# ---- every family: the same contract ------------------------------------------------------------


def _trained(name: str, spec: GeneratorSpec, steps: int = 2) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    trainer = family(name).Trainer(spec, lr=1e-3, beta1=0.5, device=torch.device("cpu"))
    real = torch.rand(4, spec.channels, spec.resolution, spec.resolution) * 2 - 1
    labels = torch.tensor([i % spec.num_classes for i in range(4)]) if spec.classes else None
    return trainer, [trainer.step(real, labels, contextlib.nullcontext) for _ in range(steps)]


def test_the_registry_lists_the_three_families_and_their_defaults_match_params():
    assert FAMILIES == ("dcgan", "vae", "ddpm")
    defaults = ModelParams()
    for name in FAMILIES:
        assert family(name).DEFAULTS == getattr(defaults, name).model_dump(), name


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("resolution,channels,classes", [(16, 1, []), (32, 3, ["a", "b", "c"])])
def test_every_family_trains_on_cpu_and_samples_the_configured_shape(name, resolution, channels, classes):
    spec = GeneratorSpec(name, resolution, channels, classes, TINY_HP[name])
    torch.manual_seed(0)
    trainer = family(name).Trainer(spec, lr=1e-3, beta1=0.5, device=torch.device("cpu"))
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in trainer.modules().items()}
    real = torch.rand(4, channels, resolution, resolution) * 2 - 1
    labels = torch.tensor([i % len(classes) for i in range(4)]) if classes else None
    for _ in range(2):
        losses = trainer.step(real, labels, contextlib.nullcontext)
        assert losses and all(v.ndim == 0 and torch.isfinite(v) and not v.requires_grad for v in losses.values())
    for key, module in trainer.modules().items():  # every trained module moved
        assert any(not torch.equal(a, b) for a, b in zip(before[key], module.parameters(), strict=True)), key
    for label in (None, classes[-1] if classes else None):
        images = sample(trainer.generator.eval(), spec, 5, seed=1, label=label)
        assert images.shape == (5, resolution, resolution, channels)
        assert images.dtype == np.uint8


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_samples_deterministically_per_seed(name):
    spec = GeneratorSpec(name, 16, 1, ["0", "1"], TINY_HP[name])
    trainer, _ = _trained(name, spec)
    gen = trainer.generator.eval()
    a, b, c = sample(gen, spec, 6, seed=3), sample(gen, spec, 6, seed=3), sample(gen, spec, 6, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # each image depends only on its own latent, not on its batch (up to float rounding)
    rebatched = sample(gen, spec, 6, seed=3, batch_size=4)
    assert np.abs(a.astype(int) - rebatched.astype(int)).max() <= 1
    assert not np.array_equal(sample(gen, spec, 4, seed=3, label="0"), sample(gen, spec, 4, seed=3, label="1"))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_round_trips_through_a_plain_state_dict(name, tmp_path):
    spec = GeneratorSpec(name, 16, 1, ["0", "1", "2"], TINY_HP[name])
    trainer, _ = _trained(name, spec)
    gen = trainer.generator.eval()
    save_generator(gen, spec, tmp_path / "g.pt")
    loaded, loaded_spec = load_generator(tmp_path / "g.pt")
    assert loaded_spec == spec
    assert np.array_equal(sample(gen, spec, 3, seed=9), sample(loaded, loaded_spec, 3, seed=9))
    state = torch.load(tmp_path / "g.pt", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())


def test_vae_kl_weight_warms_up_and_is_checkpointed():
    spec = GeneratorSpec("vae", 16, 1, [], {**TINY_HP["vae"], "kl_warmup_steps": 4, "beta": 2.0})
    trainer, history = _trained("vae", spec, steps=6)
    weights = [float(h["kl_weight"]) for h in history]
    assert weights == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.0])
    assert int(trainer.modules()["encoder"].state_dict()["steps"]) == 6


def _perturbed_ddpm(spec: GeneratorSpec) -> torch.nn.Module:
    torch.manual_seed(0)
    gen = family("ddpm").build_generator(spec).eval()
    with torch.no_grad():  # away from the initialisation, so class and "no class" predictions differ
        for p in gen.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return gen


@pytest.mark.parametrize("sampler,prediction", [("dpm++", "epsilon"), ("ddim", "v_prediction")])
def test_ddpm_samples_are_a_function_of_the_latent_and_guidance_steers_them(sampler, prediction):
    ddpm = family("ddpm")
    hp = {**TINY_HP["ddpm"], "sampler": sampler, "prediction": prediction}
    guided = GeneratorSpec("ddpm", 8, 1, ["0", "1"], {**hp, "guidance": 3.0})
    plain = GeneratorSpec("ddpm", 8, 1, ["0", "1"], {**hp, "guidance": 1.0})
    gen = _perturbed_ddpm(guided)
    batches: list[int] = []
    gen.register_forward_pre_hook(lambda _module, args: batches.append(args[0].shape[0]))
    z, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        first = ddpm.generate(gen, guided, z, y)
        assert batches == [8] * hp["sampling_steps"]  # guided: conditional + "no class" in one call per step
        again, other = ddpm.generate(gen, guided, z.clone(), y), ddpm.generate(gen, guided, z + 0.5, y)
        batches.clear()
        unguided = ddpm.generate(gen, plain, z, y)
        assert batches == [4] * hp["sampling_steps"]
        no_label, no_label_plain = ddpm.generate(gen, guided, z, None), ddpm.generate(gen, plain, z, None)
    assert first.shape == (4, 1, 8, 8) and float(first.abs().max()) <= 1.0
    assert torch.equal(first, again)  # the latent is the only randomness
    assert not torch.allclose(first, other, atol=1e-3)
    assert not torch.allclose(first, unguided, atol=1e-3)
    # without labels the model is asked for "no class" and guidance has nothing to steer
    assert torch.equal(no_label, no_label_plain) and not torch.allclose(no_label, unguided, atol=1e-3)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_training_lowers_the_denoising_loss_on_a_toy_batch_and_its_ema_samples(prediction):
    from torch.nn import functional as F
    from torch.optim.swa_utils import AveragedModel

    from genloop.stages.train import EmaUpdater

    spec = GeneratorSpec("ddpm", 8, 1, ["0", "1"], {**TINY_HP["ddpm"], "prediction": prediction, "lr": 3e-3})
    torch.manual_seed(0)
    trainer = family("ddpm").Trainer(spec, lr=1e-3, beta1=0.9, device=torch.device("cpu"))
    ema = AveragedModel(trainer.generator, use_buffers=True)
    bars = torch.full((2, 1, 8, 8), -1.0)
    bars[0, :, :, 3:5], bars[1, :, 3:5, :] = 1.0, 1.0  # class 0: a vertical bar, class 1: a horizontal one
    real, labels = bars.repeat(4, 1, 1, 1), torch.tensor([0, 1] * 4)
    rng = torch.Generator().manual_seed(5)
    t, noise = torch.randint(0, 50, (8,), generator=rng), torch.randn(8, 1, 8, 8, generator=rng)
    x_t = trainer.schedule.add_noise(real, noise, t)
    target = noise if prediction == "epsilon" else trainer.schedule.get_velocity(real, noise, t)

    def fixed_noise_loss() -> float:  # the same noised images and timesteps before and after
        with torch.no_grad():
            return float(F.mse_loss(trainer.generator(x_t, t, class_labels=labels, return_dict=False)[0], target))

    before = fixed_noise_loss()
    update_ema = EmaUpdater(ema, 0.9)
    for _ in range(20):  # 0.38-0.48 x the initial loss over seeds 0-2 and both predictions
        trainer.step(real, labels, contextlib.nullcontext)
        update_ema(trainer.generator)
    assert fixed_noise_loss() < 0.6 * before
    assert ema.module.state_dict().keys() == trainer.generator.state_dict().keys()
    images = sample(ema.module.eval(), spec, 4, seed=2)
    assert images.shape == (4, 8, 8, 1) and np.array_equal(images, sample(ema.module, spec, 4, seed=2))


def test_ddpm_refuses_more_levels_than_the_resolution_has():
    with pytest.raises(GenloopError, match="block_out_channels has 4 levels, too many for 8x8"):
        family("ddpm").build_generator(GeneratorSpec("ddpm", 8, 1, [], {"block_out_channels": [8, 8, 8, 8]}))


def test_a_ddpm_pyfunc_requires_diffusers_and_the_other_families_do_not():
    from importlib.metadata import version

    from genloop.stages.register import pip_requirements

    assert pip_requirements("ddpm") == [*pip_requirements("vae"), f"diffusers=={version('diffusers')}"]
    assert not any(r.startswith("diffusers") for r in pip_requirements("dcgan") + pip_requirements("vae"))


# ---- the real stages, per family -----------------------------------------------------------------

STAGE_TINY = [
    "collect.sources=[{uri: 'builtin:mnist', limit: 400}]",
    "collect.dvc_add=false",
    "train.epochs=1",
    "train.batch_size=32",
    "train.log_every=2",
    "train.checkpoint_every=5",
    "train.grid_size=20",
    "evaluate.n_samples=40",
    "evaluate.extractor_epochs=1",
    "evaluate.kid_subset_size=20",
]
FAMILY_TINY = {
    "vae": ["model.family=vae", "model.vae.width=8", "model.vae.latent_dim=8"],
    "ddpm": ["model.family=ddpm", "model.ddpm.block_out_channels=[8,16]", "model.ddpm.sampling_steps=4"],
}


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with 400 collected + cleaned MNIST digits and its in-domain extractor."""
    from genloop.core.config import load_params
    from genloop.core.workspace import Workspace
    from genloop.eval.extractors import get_extractor
    from genloop.stages import clean, collect

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("GENLOOP_PARENT_RUN_ID", None)
    ws = Workspace.at(tmp_path_factory.mktemp("clean"))
    cfg = load_params(None, STAGE_TINY)
    collect.run(cfg, ws)
    clean.run(cfg, ws)
    get_extractor(cfg, ws)
    return ws.root


@pytest.mark.parametrize("name", ["vae", "ddpm"])
def test_train_evaluate_register_run_for_the_family(name, clean_data, tmp_path, monkeypatch):
    from genloop.core.config import load_params
    from genloop.core.workspace import Workspace
    from genloop.stages import evaluate, register, train

    # mlflow.set_tracking_uri/set_registry_uri export these: unset them now and again afterwards
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "GENLOOP_PARENT_RUN_ID"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    ws = Workspace.at(tmp_path)
    shutil.copytree(clean_data / "data", ws.root / "data")
    # the extractor clean_data trained is found in the session's judge cache ($GENLOOP_JUDGE_CACHE)
    cfg = load_params(None, [*STAGE_TINY, *FAMILY_TINY[name]])

    summary = train.run(cfg, ws)
    assert summary["family"] == name and summary["conditional"] and summary["steps"] == expected_steps(cfg, ws)
    assert summary["final"]["loss"] > 0  # a reconstruction or noise-prediction error: never 0 on real data
    gen, spec = load_generator(ws.generator)
    assert spec.family == name and spec.classes == [str(i) for i in range(10)]
    assert spec.hparams == getattr(cfg.model, name).model_dump()
    curve = pd.read_csv(ws.reports / "train.csv")
    assert {"step", "loss", "img_per_s"} <= set(curve.columns)

    report = evaluate.run(cfg, ws)
    assert report["n_fake"] == 40 and np.isfinite(report["fid"]) and np.isfinite(report["kid_mean"])
    assert json.loads(ws.report("eval").read_text())["extractor"]["name"] == expected_extractor(cfg, ws)
    assert (ws.reports / "eval_samples.png").exists()

    reg = register.run(cfg, ws)
    assert reg["version"] == "1"
    mlflow.set_tracking_uri(f"sqlite:///{ws.mlflow_db}")
    mlflow.set_registry_uri(f"sqlite:///{ws.mlflow_db}")
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}/1")
    images = model.predict(pd.DataFrame({"n": [3, 2], "seed": [5, 6], "label": ["7", "7"]}))
    assert images.shape == (5, 32, 32, 1) and images.dtype == np.uint8
    assert np.array_equal(images[:3], sample(gen, spec, 3, seed=5, label="7"))
