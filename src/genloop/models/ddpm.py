"""Diffusion (Ho et al. 2020) on Hugging Face diffusers, optionally class-conditional.

The generator is diffusers' `UNet2DModel`: `block_out_channels` gives one resolution level
each (every level but the last halves the side), `layers_per_block` residual blocks per
level, single-head self-attention at the lowest level and in the middle block when
`attention` is on. Training: diffusers' `DDPMScheduler` noises a real batch at uniformly
drawn timesteps of a cosine (Nichol & Dhariwal 2021, `squaredcos_cap_v2`) or linear
schedule; the UNet predicts the noise (`prediction: epsilon`) or the velocity
(`v_prediction`, Salimans & Ho 2022) under an MSE loss. Sampling: `sampling_steps` of
DPM-Solver++ (2nd order, Lu et al. 2022) or DDIM (eta=0, Song et al. 2021) over
"trailing" timesteps that start at the last one. Both are deterministic ODE solvers, so the
initial noise - the latent drawn by `genloop.models.sample` - is the only randomness; the
predicted clean image is clipped to [-1, 1] at every step.

Conditioning: the UNet's class embedding (`num_class_embeds` = classes + 1) is added to
the time embedding; the extra index is "no class". With `cond_dropout` > 0 some labels are
replaced by it in training, which enables classifier-free guidance (Ho & Salimans 2022) at
sampling time with `guidance` > 1 (two UNet evaluations per step, in one batch; 1: plain
conditional sampling). Adam uses `model.ddpm.lr` (train.lr when null) and train.beta1;
gradients are clipped to norm 1. The saved generator is the UNet's plain state dict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from genloop.models.spec import GeneratorSpec

DEFAULTS: dict[str, Any] = {
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "attention": True,
    "timesteps": 1000,
    "schedule": "cosine",
    "prediction": "v_prediction",
    "sampler": "dpm++",
    "sampling_steps": 10,
    "cond_dropout": 0.1,
    "guidance": 2.0,
    "lr": 1e-3,
}

# params.yaml's names -> diffusers' beta_schedule
_BETA_SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear"}


def _hp(spec: GeneratorSpec) -> dict[str, Any]:
    return {**DEFAULTS, **spec.hparams}


def latent_shape(spec: GeneratorSpec) -> tuple[int, ...]:
    """Sampling starts from pure noise of the image's shape."""
    return (spec.channels, spec.resolution, spec.resolution)


def _norm_groups(channels: list[int]) -> int:
    """GroupNorm groups for every level: the most (up to 32) leaving >= 4 channels per group.

    diffusers' default of 32 groups would normalise each channel of a 32-wide level alone."""
    return next((g for g in (32, 16, 8, 4, 2) if all(c % g == 0 and c // g >= 4 for c in channels)), 1)


def build_generator(spec: GeneratorSpec) -> nn.Module:
    """The UNet2DModel of the spec's hyper-parameters (random weights)."""
    from diffusers import UNet2DModel

    hp = _hp(spec)
    channels = [int(c) for c in hp["block_out_channels"]]
    levels, attention = len(channels), bool(hp["attention"])
    if spec.resolution % 2 ** (levels - 1) or spec.resolution // 2 ** (levels - 1) < 2:
        from genloop.core.errors import ConfigError

        raise ConfigError(
            f"model.ddpm.block_out_channels has {levels} levels, too many for {spec.resolution}x{spec.resolution} "
            f"images: each level but the last halves the side, which must stay even and end >= 2; use fewer levels")
    down = ["DownBlock2D"] * (levels - 1) + ["AttnDownBlock2D" if attention else "DownBlock2D"]
    up = ["AttnUpBlock2D" if attention else "UpBlock2D"] + ["UpBlock2D"] * (levels - 1)
    return UNet2DModel(
        sample_size=spec.resolution, in_channels=spec.channels, out_channels=spec.channels,
        block_out_channels=tuple(channels), layers_per_block=int(hp["layers_per_block"]),
        down_block_types=tuple(down), up_block_types=tuple(up), add_attention=attention,
        attention_head_dim=None,  # one head as wide as the level, as in the DDPM paper
        norm_num_groups=_norm_groups(channels),
        # one row more than there are classes: the "no class" token of classifier-free guidance
        num_class_embeds=spec.num_classes + 1 if spec.num_classes else None,
    )


def _schedule(hp: dict[str, Any]) -> dict[str, Any]:
    """The training noise schedule, as the keyword arguments every diffusers scheduler takes."""
    timesteps = int(hp["timesteps"])
    scale = 1000 / timesteps  # the linear schedule's DDPM range for 1,000 steps, stretched to fewer
    return {"num_train_timesteps": timesteps, "beta_schedule": _BETA_SCHEDULES[hp["schedule"]],
            "beta_start": scale * 1e-4, "beta_end": min(scale * 0.02, 0.999), "prediction_type": hp["prediction"]}


def sampler(spec: GeneratorSpec) -> Any:
    """A fresh deterministic scheduler (it keeps per-run state) set to the spec's sampling steps."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    hp = _hp(spec)
    common = {**_schedule(hp), "timestep_spacing": "trailing"}  # the first step is from pure noise
    if hp["sampler"] == "ddim":
        sched = DDIMScheduler(**common, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True)
    elif hp["sampler"] == "dpm++":
        # thresholding with sample_max_value 1: the predicted clean image is clipped to [-1, 1]
        sched = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                            thresholding=True, sample_max_value=1.0, final_sigmas_type="zero")
    else:
        from genloop.core.errors import ConfigError

        raise ConfigError(f"model.ddpm.sampler={hp['sampler']!r} is unknown; choose dpm++ or ddim")
    sched.set_timesteps(min(int(hp["sampling_steps"]), int(hp["timesteps"])))
    return sched


def _class_input(spec: GeneratorSpec, labels: torch.Tensor | None, n: int, device: torch.device) -> Any:
    """The UNet's class_labels: None for an unconditional model, the "no class" index for no label."""
    if not spec.num_classes:
        return None
    return labels if labels is not None else torch.full((n,), spec.num_classes, dtype=torch.long, device=device)


def generate(gen: nn.Module, spec: GeneratorSpec, latent: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Images in [-1, 1] from the noise `latent`, by the spec's deterministic sampler."""
    guidance = float(_hp(spec)["guidance"])
    guided = labels is not None and bool(spec.num_classes) and guidance != 1.0
    sched = sampler(spec)
    x = latent.float() * sched.init_noise_sigma
    n = x.shape[0]
    classes = _class_input(spec, labels, n, x.device)
    if guided:  # conditional and "no class" predictions in one batch
        classes = torch.cat([classes, torch.full_like(classes, spec.num_classes)])
    for t in sched.timesteps:
        inp = torch.cat([x, x]) if guided else x
        out = gen(inp, t.to(x.device).expand(inp.shape[0]), class_labels=classes, return_dict=False)[0].float()
        if guided:
            cond, uncond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        x = sched.step(out, t, x, return_dict=False)[0]
    return x.clamp(-1, 1)


class Trainer:
    """Noise- or velocity-prediction training; `step` takes one real batch."""

    def __init__(self, spec: GeneratorSpec, lr: float, beta1: float, device: torch.device):
        from diffusers import DDPMScheduler

        hp = _hp(spec)
        self.spec = spec
        self.schedule = DDPMScheduler(**_schedule(hp))
        self.cond_dropout = float(hp["cond_dropout"]) if spec.num_classes else 0.0
        self.generator = build_generator(spec).to(device)
        self.opt = torch.optim.Adam(self.generator.parameters(), lr=hp["lr"] or lr, betas=(beta1, 0.999))

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"opt": self.opt}

    def step(self, real: torch.Tensor, labels: torch.Tensor | None, autocast: Any) -> dict[str, torch.Tensor]:
        """One denoising update at uniformly drawn timesteps; returns the detached loss."""
        n = real.shape[0]
        t = torch.randint(0, self.schedule.config.num_train_timesteps, (n,), device=real.device)
        noise = torch.randn_like(real)
        x_t = self.schedule.add_noise(real, noise, t)
        target = noise if self.schedule.config.prediction_type == "epsilon" else self.schedule.get_velocity(
            real, noise, t)
        classes = _class_input(self.spec, labels, n, real.device)
        if classes is not None and self.cond_dropout > 0:
            drop = torch.rand(n, device=real.device) < self.cond_dropout
            classes = torch.where(drop, torch.full_like(classes, self.spec.num_classes), classes)
        with autocast():
            pred = self.generator(x_t, t, class_labels=classes, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.generator.parameters(), 1.0)
        self.opt.step()
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach()}
