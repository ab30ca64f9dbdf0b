"""DCGAN (Radford et al. 2015), optionally class-conditional, with a recipe for small corpora.

Conditioning: the generator concatenates a class embedding to the latent; the discriminator
uses a projection head (Miyato & Koyama 2018). Layers follow the image resolution: one stride-2
block per doubling from 4x4.

On small corpora the plain recipe collapses within each class: the generator learns the class
from its label and ignores its latent (on 5,000 MNIST digits, 10 epochs: one image per class,
class_diversity 0.08). Its options, each measured by bench/recipe.py --family dcgan (bench/README.md):

- `mode_seeking` (default 0.1): the mode-seeking term (Mao et al. 2019) on pairs of samples of
  the same class: what lifted class_diversity above 0.7 and halved FID at that budget;
- `loss`: nonsaturating (Goodfellow et al. 2014, the default: better FID) or hinge (Lim & Ye 2017);
- `augment`: DiffAugment (genloop.models.augment) on every discriminator input, real and fake
  (off by default: at 10 epochs it slowed the discriminator and cost class consistency);
- `r1_gamma`: the R1 penalty gamma/2 x E||grad_x D(x_real)||^2 (Mescheder et al. 2018), applied
  lazily every `r1_every` steps with its weight scaled by that interval (Karras et al. 2020)
  (off by default: more diversity but less class consistency at the same FID).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from genloop.models.augment import diff_augment, parse_policy
from genloop.models.blocks import UpsamplingDecoder
from genloop.models.distributed import unwrap
from genloop.models.spec import GeneratorSpec

# params.yaml's model.dcgan defaults (a test keeps them equal)
DEFAULTS: dict[str, Any] = {"latent_dim": 64, "g_width": 32, "d_width": 32, "loss": "nonsaturating",
                            "augment": "", "r1_gamma": 0.0, "r1_every": 16, "mode_seeking": 0.1}


def _hp(spec: GeneratorSpec) -> dict[str, Any]:
    return {**DEFAULTS, **spec.hparams}


def latent_shape(spec: GeneratorSpec) -> tuple[int, ...]:
    return (_hp(spec)["latent_dim"],)


class Generator(UpsamplingDecoder):
    """The DCGAN generator: the shared upsampling decoder with a tanh output in [-1, 1]."""

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(self.decode(z, y))


class Discriminator(nn.Module):
    """Spectrally normalised (Miyato et al. 2018) conv net with a projection head."""

    def __init__(self, width: int, channels: int, resolution: int, num_classes: int):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        blocks = int(math.log2(resolution)) - 2
        layers: list[nn.Module] = [sn(nn.Conv2d(channels, width, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
        ch = width
        for _ in range(blocks - 1):
            layers += [sn(nn.Conv2d(ch, ch * 2, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
            ch *= 2
        self.body = nn.Sequential(*layers)
        feat = (ch + 1) * 4 * 4
        self.head = sn(nn.Linear(feat, 1))
        self.embed = sn(nn.Embedding(num_classes, feat)) if num_classes else None
        # discriminator updates taken, for the lazy R1 schedule; a buffer so checkpoints carry it
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(x)
        # minibatch standard deviation (Karras et al. 2018): lets D see a collapsed batch
        spread = h.float().std(dim=0, unbiased=False).mean().to(h.dtype)
        h = torch.cat([h, spread.expand(h.shape[0], 1, *h.shape[2:])], dim=1).flatten(1)
        out = self.head(h).squeeze(1)
        if self.embed is not None and y is not None:
            out = out + (self.embed(y) * h).sum(dim=1)
        return out


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, 0.0, 0.02)


def build_generator(spec: GeneratorSpec) -> Generator:
    hp = _hp(spec)
    return Generator(hp["latent_dim"], hp["g_width"], spec.channels, spec.resolution, spec.num_classes)


def d_loss(kind: str, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss on its real and fake logits."""
    if kind == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


def g_loss(kind: str, d_fake: torch.Tensor) -> torch.Tensor:
    """The generator's loss on the discriminator's logits of its samples."""
    return -d_fake.mean() if kind == "hinge" else F.softplus(-d_fake).mean()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor, labels: torch.Tensor | None,
               augment: Any = None) -> torch.Tensor:
    """E ||grad_x D(x)||^2 over real images (through `augment`, when given), with a graph for backward."""
    x = real.detach().float().requires_grad_(True)
    out = discriminator(augment(x) if augment is not None else x, labels)
    (grad,) = torch.autograd.grad(out.float().sum(), x, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()


def paired(labels: torch.Tensor | None) -> torch.Tensor | None:
    """Labels whose second half repeats the first (an odd last one kept), so sample i and
    i + n//2 are of the same class: the pairs the mode-seeking term compares."""
    if labels is None:
        return None
    half = labels.shape[0] // 2
    return torch.cat([labels[:half], labels[:half], labels[2 * half:]])


def mode_seeking_term(fake: torch.Tensor, z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 / (mean |G(z1) - G(z2)| / mean |z1 - z2|) over the pairs (i, i + n//2) (Mao et al. 2019):
    small when different latents give different images, large when the generator ignores its latent."""
    half = fake.shape[0] // 2
    images = (fake[:half] - fake[half:2 * half]).abs().mean()
    latents = (z[:half] - z[half:2 * half]).abs().mean()
    return 1.0 / (images / latents + eps)


class Trainer:
    """Adversarial training; `step` takes one real batch (loss, augmentation, R1 and the
    mode-seeking term as the spec says)."""

    def __init__(self, spec: GeneratorSpec, lr: float, beta1: float, device: torch.device):
        hp = _hp(spec)
        self.spec = spec
        self.latent_dim = hp["latent_dim"]
        self.loss, self.r1_gamma, self.r1_every = hp["loss"], float(hp["r1_gamma"]), int(hp["r1_every"])
        self.ops = parse_policy(hp["augment"])
        self.mode_seeking = float(hp["mode_seeking"])
        self.generator = build_generator(spec).to(device)
        self.discriminator = Discriminator(hp["d_width"], spec.channels, spec.resolution, spec.num_classes).to(device)
        self.generator.apply(_init)
        self.discriminator.apply(_init)
        if self.generator.embed is not None:  # the class code should weigh like the latent
            nn.init.normal_(self.generator.embed.weight, 0.0, 1.0)
        betas = (beta1, 0.999)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=betas)
        self._steps: int | None = None  # discriminator updates so far (its `steps` buffer, read once)
        self._r1 = torch.zeros((), device=device)

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"opt_g": self.opt_g, "opt_d": self.opt_d}

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x, self.ops) if self.ops else x

    def _r1_due(self) -> bool:
        """Whether this discriminator update carries the lazy R1 term; counts the update."""
        steps = unwrap(self.discriminator).steps
        if self._steps is None:
            self._steps = int(steps)
        due = self.r1_gamma > 0 and self._steps % self.r1_every == 0
        self._steps += 1
        steps.add_(1)
        return due

    def _d_step(self, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor | None,
                fake_labels: torch.Tensor | None, autocast: Any) -> dict[str, torch.Tensor]:
        with autocast():
            d_real = self.discriminator(self.augment(real), labels)
            d_fake = self.discriminator(self.augment(fake.detach()), fake_labels)
            loss_d = d_loss(self.loss, d_real, d_fake)
        total = loss_d
        if self._r1_due():  # outside autocast: a gradient penalty wants fp32
            self._r1 = r1_penalty(unwrap(self.discriminator), real, labels, self.augment)
            total = total + self._r1 * (self.r1_gamma / 2 * self.r1_every)
        self.opt_d.zero_grad(set_to_none=True)
        total.backward()
        self.opt_d.step()
        out = {"loss_d": loss_d.detach(), "d_real": torch.sigmoid(d_real.detach().float()).mean(),
               "d_fake": torch.sigmoid(d_fake.detach().float()).mean()}
        return out | ({"r1": self._r1.detach()} if self.r1_gamma > 0 else {})

    def step(self, real: torch.Tensor, labels: torch.Tensor | None, autocast: Any) -> dict[str, torch.Tensor]:
        """One discriminator and one generator update; returns detached losses."""
        z = torch.randn(real.shape[0], self.latent_dim, device=real.device)
        fake_labels = paired(labels) if self.mode_seeking > 0 else labels
        with autocast():
            fake = self.generator(z, fake_labels)
        out = self._d_step(real, fake, labels, fake_labels, autocast)
        with autocast():
            loss_g = g_loss(self.loss, self.discriminator(self.augment(fake), fake_labels))
        total = loss_g
        if self.mode_seeking > 0:
            out["mode_seeking"] = mode_seeking_term(fake.float(), z)
            total = total + self.mode_seeking * out["mode_seeking"]
        self.opt_g.zero_grad(set_to_none=True)
        total.backward()
        self.opt_g.step()
        return {"loss_d": out.pop("loss_d"), "loss_g": loss_g.detach(),
                **{k: v.detach() for k, v in out.items()}}
