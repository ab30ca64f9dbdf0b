"""Convolutional VAE (Kingma & Welling 2014), optionally class-conditional (Sohn et al. 2015).

Encoder and decoder follow the image resolution like the DCGAN: one stride-2 block per
doubling from 4x4. Conditioning: a class embedding joins the encoder's features before the
posterior head and is concatenated to the latent for the decoder. The loss is per-pixel
Bernoulli cross-entropy on [0, 1] images (sharper MNIST samples than a unit-variance MSE,
which weighs the KL term far more) plus `beta` x KL, the KL weight optionally ramped up
over `kl_warmup_steps` so the decoder learns to use the latent first.

The generator that is saved and registered is the decoder. With `prior: normal` sampling is
decoder(z ~ N(0, I), y). With `prior: fitted` (the default) a Gaussian mixture is fitted, after
training, to the posterior means of the training images (per class when conditional), and
sampling draws z from it: ex-post density estimation (Ghosh et al. 2020, "From variational to
deterministic autoencoders"), which roughly halved a VAE's MNIST FID there, because N(0, I) puts
mass where no training image is encoded and the decoder draws blurred blends there. The mixture
lives in the decoder's buffers, so the registered state dict carries it.
Adam uses `model.vae.lr` (train.lr when null) and train.beta1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from genloop.models.blocks import UpsamplingDecoder
from genloop.models.spec import GeneratorSpec

DEFAULTS: dict[str, Any] = {"latent_dim": 32, "width": 32, "beta": 0.1, "kl_warmup_steps": 200, "lr": 1e-3,
                            "prior": "fitted", "prior_components": "auto", "prior_temperature": 1.0}
# prior_components=auto, by bench/recipe.py --family vae (bench/README.md): per class of the
# 5,000 digits 4 beat 1 and matched 10; for 3,533 unlabelled emoji 16 beat 4 (FID 5.1 vs 5.9)
AUTO_COMPONENTS_PER_CLASS = 4
AUTO_COMPONENTS_UNLABELLED = 16
# encodings the mixture is fitted to, at most (a random subset of a larger corpus)
PRIOR_FIT_MAX = 50_000


def _hp(spec: GeneratorSpec) -> dict[str, Any]:
    return {**DEFAULTS, **spec.hparams}


def _fitted(spec: GeneratorSpec) -> bool:
    # a spec without the key was saved before the fitted prior existed: its state dict has no
    # prior buffers and its latents were N(0, I)
    return spec.hparams.get("prior", "normal") == "fitted"


def latent_shape(spec: GeneratorSpec) -> tuple[int, ...]:
    """z's size, plus one coordinate that picks the mixture component when the prior is fitted."""
    return (_hp(spec)["latent_dim"] + (1 if _fitted(spec) else 0),)


class Encoder(nn.Module):
    """q(z | x, y): conv features (+ class embedding) -> mean and log-variance of z."""

    def __init__(self, latent_dim: int, width: int, channels: int, resolution: int, num_classes: int):
        super().__init__()
        blocks = int(math.log2(resolution)) - 2
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = width
        for _ in range(blocks - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2, True)]
            ch *= 2
        self.body = nn.Sequential(*layers)
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        self.head = nn.Linear(ch * 4 * 4 + (latent_dim if num_classes else 0), 2 * latent_dim)
        # optimizer steps taken, for the KL warm-up; a buffer so checkpoints carry it
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x).flatten(1)
        if self.embed is not None:
            if y is None:
                raise ValueError("this encoder is class-conditional: pass class labels")
            h = torch.cat([h, self.embed(y).to(h.dtype)], dim=1)
        mu, logvar = self.head(h).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)


class Decoder(UpsamplingDecoder):
    """p(x | z, y): the shared upsampling decoder (DCGAN's generator shape).

    With `components` > 0 it also holds the fitted prior: per group (class, or one for an
    unconditional model) the mixture's weights, means and covariance Cholesky factors. Until
    `finish` runs they describe N(0, I), so samples during training match `prior: normal`.
    """

    def __init__(self, latent_dim: int, width: int, channels: int, resolution: int, num_classes: int,
                 components: int = 0):
        super().__init__(latent_dim, width, channels, resolution, num_classes)
        if components:
            groups = max(num_classes, 1)
            weight = torch.zeros(groups, components)
            weight[:, 0] = 1.0
            self.register_buffer("prior_weight", weight)
            self.register_buffer("prior_mean", torch.zeros(groups, components, latent_dim))
            self.register_buffer("prior_scale", torch.eye(latent_dim).expand(groups, components, -1, -1).clone())

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, logits: bool = False) -> torch.Tensor:
        """Images in [-1, 1]; with `logits=True` the Bernoulli logits of pixels in [0, 1]."""
        out = self.decode(z, y)
        # 2 * sigmoid(l) - 1 == tanh(l / 2): the mean image mapped to [-1, 1]
        return out if logits else torch.tanh(0.5 * out)


def _components(spec: GeneratorSpec) -> int:
    """Mixture components per group: prior_components, or its auto value for this spec."""
    chosen = _hp(spec)["prior_components"]
    if chosen == "auto":
        return AUTO_COMPONENTS_PER_CLASS if spec.num_classes else AUTO_COMPONENTS_UNLABELLED
    return int(chosen)


def build_generator(spec: GeneratorSpec) -> Decoder:
    hp = _hp(spec)
    components = _components(spec) if _fitted(spec) else 0
    return Decoder(hp["latent_dim"], hp["width"], spec.channels, spec.resolution, spec.num_classes, components)


def generate(gen: nn.Module, spec: GeneratorSpec, latent: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Images in [-1, 1]: the latent mapped through the fitted prior (when there is one), then decoded.

    The last latent coordinate u ~ N(0, 1) picks the component (its normal CDF against the
    cumulative weights), the rest is scaled by the component's Cholesky factor and
    `prior_temperature`, and shifted by its mean: still a deterministic function of the latent.
    """
    if not _fitted(spec):
        return gen(latent, labels)
    z, u = latent[:, :-1].float(), latent[:, -1].float()
    groups = gen.prior_mean.shape[0]
    group = labels if labels is not None and groups > 1 else torch.zeros(len(z), dtype=torch.long, device=z.device)
    cdf = gen.prior_weight[group].cumsum(1)
    p = 0.5 * (1 + torch.erf(u / math.sqrt(2)))
    comp = (p[:, None] > cdf).sum(1).clamp(max=cdf.shape[1] - 1)
    scale = gen.prior_scale[group, comp] * float(_hp(spec)["prior_temperature"])
    z = gen.prior_mean[group, comp] + (scale @ z[:, :, None]).squeeze(-1)
    return gen(z, labels)


@torch.no_grad()
def _encode(encoder: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, batch: int = 512) -> torch.Tensor:
    """Posterior means of uint8 images, in eval mode (BatchNorm's running statistics)."""
    from genloop.core.dataset import to_unit

    was_training = encoder.training
    device = next(encoder.parameters()).device  # streamed images (ShardedImages) come from the shards on the CPU
    encoder.eval()
    try:
        out = [encoder(to_unit(images[i: i + batch].to(device)),
                       None if labels is None else labels[i: i + batch])[0].float()
               for i in range(0, len(images), batch)]
    finally:
        encoder.train(was_training)
    return torch.cat(out).cpu()


def finish(trainer: Trainer, generator: nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
           seed: int = 0) -> dict[str, Any]:
    """After training: fit `generator`'s prior buffers to the training images' encodings (uint8
    NCHW `images`, class `labels` or None); returns what was fitted ({} for `prior: normal`).

    A full-covariance Gaussian mixture (scikit-learn) per group, with as many components as
    `prior_components` allows and at least 2 x latent_dim encodings per component.
    """
    from sklearn.mixture import GaussianMixture

    spec = trainer.spec
    if not _fitted(spec):
        return {}
    g = torch.Generator().manual_seed(seed)
    if len(images) > PRIOR_FIT_MAX:
        keep = torch.randperm(len(images), generator=g)[:PRIOR_FIT_MAX].to(images.device)
        images, labels = images[keep], None if labels is None else labels[keep]
    conditional = spec.num_classes > 0 and labels is not None
    encoder = getattr(trainer.encoder, "module", trainer.encoder)
    mu = _encode(encoder, images, labels if conditional else None).double().numpy()
    group_of = labels.cpu().numpy() if conditional else None
    d = mu.shape[1]
    most = generator.prior_weight.shape[1]
    fitted: dict[str, Any] = {"encodings": len(mu), "components": []}
    for group in range(generator.prior_mean.shape[0]):
        points = mu if group_of is None else mu[group_of == group]
        weight = torch.zeros(most)
        mean, scale = torch.zeros(most, d), torch.eye(d).expand(most, -1, -1).clone()
        if len(points) == 0:  # a class without images keeps N(0, I)
            weight[0] = 1.0
        else:
            k = max(1, min(most, len(points) // (2 * d)))
            gmm = GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=seed).fit(points)
            weight[:k] = torch.from_numpy(gmm.weights_).float()
            mean[:k] = torch.from_numpy(gmm.means_).float()
            scale[:k] = torch.linalg.cholesky(torch.from_numpy(gmm.covariances_)).float()
        fitted["components"].append(int((weight > 0).sum()))
        generator.prior_weight[group].copy_(weight / weight.sum())
        generator.prior_mean[group].copy_(mean)
        generator.prior_scale[group].copy_(scale)
    return fitted


class Trainer:
    """Maximises the (beta-weighted) evidence lower bound; `step` takes one real batch."""

    def __init__(self, spec: GeneratorSpec, lr: float, beta1: float, device: torch.device):
        hp = _hp(spec)
        self.spec = spec
        self.beta = float(hp["beta"])
        self.warmup = int(hp["kl_warmup_steps"])
        self.encoder = Encoder(hp["latent_dim"], hp["width"], spec.channels, spec.resolution, spec.num_classes)
        self.encoder = self.encoder.to(device)
        self.generator = build_generator(spec).to(device)
        params = [*self.encoder.parameters(), *self.generator.parameters()]
        self.opt = torch.optim.Adam(params, lr=hp["lr"] or lr, betas=(beta1, 0.999))

    def modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "generator": self.generator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"opt": self.opt}

    def _kl_weight(self) -> torch.Tensor:
        steps = self._steps().float()
        ramp = (steps / self.warmup).clamp(max=1.0) if self.warmup else torch.ones_like(steps)
        return self.beta * ramp

    def _steps(self) -> torch.Tensor:
        return getattr(self.encoder, "module", self.encoder).steps  # through a DDP wrapper too

    def step(self, real: torch.Tensor, labels: torch.Tensor | None, autocast: Any) -> dict[str, torch.Tensor]:
        """One update of encoder and decoder on the negative ELBO; returns detached losses."""
        with autocast():
            mu, logvar = self.encoder(real, labels)
            mu, logvar = mu.float(), logvar.float()
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            logits = self.generator(z, labels, logits=True)
        target = (real.float() + 1) * 0.5
        recon = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").flatten(1).sum(1).mean()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
        weight = self._kl_weight()
        loss = recon + weight * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self._steps().add_(1)
        return {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach(), "kl_weight": weight.detach()}
