"""A small DDPM (Ho et al. 2020), optionally class-conditional, sampled with DDIM.

The generator is a compact UNet that predicts the noise added to an image: one residual
block per resolution level (GroupNorm, SiLU, a time + class embedding added in each block),
self-attention at the lowest level, skip connections between levels. Training: epsilon
prediction with an MSE loss on a cosine (Nichol & Dhariwal 2021) or linear noise schedule
of `timesteps` steps. Sampling: deterministic DDIM (Song et al. 2021, eta=0) over
`sampling_steps` evenly spaced timesteps starting at the last one, so the initial noise -
the latent drawn by `genloop.models.sample` - is the only randomness.

Conditioning: a learned class embedding; with `cond_dropout` > 0 some labels are replaced
by a "no class" token in training, which enables classifier-free guidance (Ho & Salimans
2022) at sampling time with `guidance` > 1 (1: plain conditional sampling, one UNet call
per step). Adam uses `model.ddpm.lr` (train.lr when null) and train.beta1; gradients are
clipped to norm 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from genloop.models.spec import GeneratorSpec

DEFAULTS: dict[str, Any] = {
    "width": 32,
    "channel_mult": [1, 2, 2],
    "attention": True,
    "timesteps": 1000,
    "schedule": "cosine",
    "sampling_steps": 25,
    "cond_dropout": 0.1,
    "guidance": 1.0,
    "lr": 5e-4,
}


def _hp(spec: GeneratorSpec) -> dict[str, Any]:
    return {**DEFAULTS, **spec.hparams}


def latent_shape(spec: GeneratorSpec) -> tuple[int, ...]:
    """DDIM starts from pure noise of the image's shape."""
    return (spec.channels, spec.resolution, spec.resolution)


def alphas_cumprod(timesteps: int, schedule: str) -> torch.Tensor:
    """The cumulative signal fraction alpha-bar_t for t = 0 .. timesteps - 1 (float64)."""
    if schedule == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    elif schedule == "linear":
        scale = 1000 / timesteps  # the DDPM paper's range for 1,000 steps, stretched to fewer
        betas = torch.linspace(scale * 1e-4, min(scale * 0.02, 0.999), timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown noise schedule {schedule!r}; choose cosine or linear")
    return torch.cumprod(1 - betas, dim=0)


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (integer) timesteps, as in the Transformer."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None].to(h.dtype)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the pixels of a (small) feature map."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # b x hw x c
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """eps(x_t, t, y): the noise in x_t; y = num_classes (or None) means "no class"."""

    def __init__(self, width: int, channel_mult: list[int], attention: bool, channels: int, resolution: int,
                 num_classes: int):
        super().__init__()
        if resolution < 2 ** len(channel_mult):
            from genloop.core.errors import ConfigError

            raise ConfigError(f"model.ddpm.channel_mult has {len(channel_mult)} levels, too many for "
                              f"{resolution}x{resolution} images (each level halves the side; the last must be >= 2)")
        self.width = width
        self.num_classes = num_classes
        emb_dim = 4 * width
        self.time_mlp = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # one extra row: the "no class" token of classifier-free guidance
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        chans = [width * m for m in channel_mult]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = width
        for i, out in enumerate(chans):
            self.down.append(ResBlock(ch, out, emb_dim))
            last = i == len(chans) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(out, out, 3, stride=2, padding=1))
            ch = out
        self.mid1 = ResBlock(ch, ch, emb_dim)
        self.attn = Attention(ch) if attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, emb_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, out in reversed(list(enumerate(chans))):
            self.up.append(ResBlock(ch + out, out, emb_dim))
            self.upsample.append(
                nn.Identity() if i == 0 else nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                                           nn.Conv2d(out, out, 3, padding=1)))
            ch = out
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.width))
        if self.class_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(y)
        h = self.conv_in(x)
        skips = []
        for block, down in zip(self.down, self.downsample, strict=True):
            h = block(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid2(self.attn(self.mid1(h, emb)), emb)
        for block, up in zip(self.up, self.upsample, strict=True):
            h = up(block(torch.cat([h, skips.pop()], dim=1), emb))
        return self.conv_out(F.silu(self.norm_out(h)))


def build_generator(spec: GeneratorSpec) -> UNet:
    hp = _hp(spec)
    return UNet(hp["width"], list(hp["channel_mult"]), bool(hp["attention"]), spec.channels, spec.resolution,
                spec.num_classes)


def ddim_timesteps(timesteps: int, sampling_steps: int) -> list[int]:
    """`sampling_steps` distinct timesteps from the last one down to 0, evenly spaced."""
    steps = min(sampling_steps, timesteps)
    return sorted({round(v) for v in torch.linspace(timesteps - 1, 0, steps).tolist()}, reverse=True)


def generate(gen: nn.Module, spec: GeneratorSpec, latent: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Deterministic DDIM (eta=0) from the noise `latent` to images in [-1, 1]."""
    hp = _hp(spec)
    abar = alphas_cumprod(hp["timesteps"], hp["schedule"])
    ts = ddim_timesteps(hp["timesteps"], hp["sampling_steps"])
    guidance = float(hp["guidance"])
    guided = labels is not None and guidance != 1.0
    x = latent.float()
    n = x.shape[0]
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, spec.num_classes)])
    for i, t in enumerate(ts):
        a_t = float(abar[t])
        a_prev = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        tt = torch.full((n * (2 if guided else 1),), t, dtype=torch.long, device=x.device)
        if guided:
            cond, uncond = gen(torch.cat([x, x]), tt, labels).float().chunk(2)
            eps = uncond + guidance * (cond - uncond)
        else:
            eps = gen(x, tt, labels).float()
        # x0 is clipped to the data range; eps stays the model's (recomputing it from the clipped x0,
        # diffusers' use_clipped_model_output, left visibly noisier samples from a briefly trained UNet)
        x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


class Trainer:
    """Epsilon-prediction training; `step` takes one real batch."""

    def __init__(self, spec: GeneratorSpec, lr: float, beta1: float, device: torch.device):
        hp = _hp(spec)
        self.spec = spec
        self.timesteps = int(hp["timesteps"])
        self.cond_dropout = float(hp["cond_dropout"]) if spec.num_classes else 0.0
        self.abar = alphas_cumprod(self.timesteps, hp["schedule"]).float().to(device)
        self.generator = build_generator(spec).to(device)
        self.opt = torch.optim.Adam(self.generator.parameters(), lr=hp["lr"] or lr, betas=(beta1, 0.999))

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"opt": self.opt}

    def step(self, real: torch.Tensor, labels: torch.Tensor | None, autocast: Any) -> dict[str, torch.Tensor]:
        """One denoising update at uniformly drawn timesteps; returns the detached loss."""
        n = real.shape[0]
        t = torch.randint(0, self.timesteps, (n,), device=real.device)
        noise = torch.randn_like(real)
        a = self.abar[t].view(n, 1, 1, 1)
        x_t = a.sqrt() * real + (1 - a).sqrt() * noise
        if labels is not None and self.cond_dropout > 0:
            drop = torch.rand(n, device=real.device) < self.cond_dropout
            labels = torch.where(drop, torch.full_like(labels, self.spec.num_classes), labels)
        with autocast():
            pred = self.generator(x_t, t, labels)
        loss = F.mse_loss(pred.float(), noise.float())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.generator.parameters(), 1.0)
        self.opt.step()
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach()}
