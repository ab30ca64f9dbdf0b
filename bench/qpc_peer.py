"""The peer of bench/quality_per_compute.py: lucidrains' denoising-diffusion-pytorch, its own code and recipe.

It runs under an interpreter that has the `denoising-diffusion-pytorch` package (bench/README.md:
a separate environment, because the package imports torchvision, and the published torchvision
wheels need the published CUDA build of torch, not the CPU build the project pins). It imports nothing from genloop:
it reads the clean train split as a uint8 array (N, C, H, W), trains for a wall-clock budget,
samples with the EMA model, and writes the samples as PNGs plus a JSON of what it did.

Recipe: the package's `Unet` and `GaussianDiffusion(model, image_size=..., timesteps=1000,
sampling_timesteps=S)` as its README shows them (S < 1000 turns on its DDIM sampler), with the
Unet scaled to 32 px: dim 32, dim_mults (1, 2, 4), i.e. 32 -> 16 -> 8 px like genloop's ddpm
(--dim, --dim-mults). The README's dim=64, dim_mults=(1, 2, 4, 8) is its 128-px example; at 32 px
it costs 3.6 GFLOP per image per UNet call against 0.85, and on the 2-core development machine
(under load) one training step took ~15 s and one sample ~7 s at 25 DDIM steps.
Training is a minimal loop that repeats its `Trainer`'s step with the Trainer's own defaults,
read from the Trainer's signature: batch 16 from a shuffled epoch, Adam (lr 1e-4, betas
(0.9, 0.99)), gradient norm clipped at 1.0, `ema_pytorch.EMA` (decay 0.995, updated every 10
steps), samples from the EMA model. Not the Trainer itself because its loop has no wall-clock
stop, its DataLoader reads image files through torchvision transforms, and by default it
computes FID with Inception weights downloaded at run time. Horizontal flips (the Trainer's
default augmentation) are off: genloop trains on the same images without flips, and a mirrored
digit is not a digit.

  <peer python> bench/qpc_peer.py --data train.npy --out DIR --minutes 2 --n-samples 1000
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the package's sampler wraps its timesteps in tqdm

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def trainer_defaults() -> dict[str, object]:
    """The Trainer's keyword defaults: the recipe this loop follows."""
    from denoising_diffusion_pytorch import Trainer

    return {k: p.default for k, p in inspect.signature(Trainer.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def build(channels: int, size: int, dim: int, mults: tuple[int, ...], sampling_steps: int,
          device: torch.device) -> torch.nn.Module:
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    unet = Unet(dim=dim, dim_mults=mults, channels=channels)
    return GaussianDiffusion(unet, image_size=size, timesteps=1000, sampling_timesteps=sampling_steps).to(device)


def train(diffusion: torch.nn.Module, data: torch.Tensor, minutes: float, recipe: dict, device: torch.device,
          seed: int) -> tuple[object, dict[str, float]]:
    """The Trainer's step until `minutes` of wall clock are spent (checked after each step)."""
    from ema_pytorch import EMA

    batch = int(recipe["train_batch_size"])
    opt = torch.optim.Adam(diffusion.parameters(), lr=float(recipe["train_lr"]), betas=tuple(recipe["adam_betas"]))
    ema = EMA(diffusion, beta=float(recipe["ema_decay"]), update_every=int(recipe["ema_update_every"])).to(device)
    rng = torch.Generator().manual_seed(seed)
    steps, seen, start = 0, 0, time.perf_counter()
    while True:
        perm = torch.randperm(len(data), generator=rng)
        for first in range(0, len(data), batch):  # the DataLoader's shuffle, last partial batch kept
            x = data[perm[first : first + batch]].to(device).float() / 255.0  # [0, 1]: it normalises itself
            loss = diffusion(x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(diffusion.parameters(), float(recipe["max_grad_norm"]))
            opt.step()
            opt.zero_grad()
            ema.update()
            steps, seen = steps + 1, seen + len(x)
            if time.perf_counter() - start >= 60.0 * minutes:
                seconds = time.perf_counter() - start
                return ema, {"steps": steps, "images_seen": seen, "epochs_done": round(seen / len(data), 3),
                             "train_seconds": round(seconds, 2), "final_loss": loss.item()}


@torch.inference_mode()
def sample(ema: object, n: int, batch: int, seed: int) -> tuple[np.ndarray, float]:
    """`n` uint8 NHWC samples from the EMA model, in batches of `batch`, and the seconds they took."""
    torch.manual_seed(seed)
    model = ema.ema_model
    model.eval()
    start, out = time.perf_counter(), []
    for first in range(0, n, batch):
        x = model.sample(batch_size=min(batch, n - first)).clamp(0, 1)
        out.append((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="uint8 .npy of the train split, N x C x H x W")
    parser.add_argument("--out", type=Path, required=True, help="folder for samples/*.png and peer.json")
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock training budget")
    parser.add_argument("--n-samples", type=int, required=True)
    parser.add_argument("--sampling-steps", type=int, default=25, help="DDIM steps (its sampling_timesteps)")
    parser.add_argument("--sample-batch", type=int, default=256, help="images per sample() call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dim", type=int, default=32, help="Unet dim (its 128-px README example: 64)")
    parser.add_argument("--dim-mults", default="1,2,4", help="Unet dim_mults (its default: 1,2,4,8)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    data = torch.from_numpy(np.load(args.data))
    channels, size = int(data.shape[1]), int(data.shape[2])
    recipe = trainer_defaults()
    mults = tuple(int(m) for m in args.dim_mults.split(","))
    diffusion = build(channels, size, args.dim, mults, args.sampling_steps, device)
    ema, done = train(diffusion, data, args.minutes, recipe, device, args.seed)
    images, sample_s = sample(ema, args.n_samples, args.sample_batch, args.seed + 1)
    folder = args.out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img[:, :, 0] if channels == 1 else img).save(folder / f"{i:05d}.png")
    from denoising_diffusion_pytorch.version import __version__

    report = {**done, "sampling_seconds": round(sample_s, 2), "sampling_s_per_image": sample_s / len(images),
              "n_samples": len(images), "device": str(device), "torch": torch.__version__,
              "package": f"denoising-diffusion-pytorch {__version__}",
              "parameters": sum(p.numel() for p in diffusion.model.parameters()),
              "recipe": {k: recipe[k] for k in ("train_batch_size", "train_lr", "adam_betas", "ema_decay",
                                                "ema_update_every", "max_grad_norm")}
              | {"unet": f"dim={args.dim}, dim_mults={mults}", "timesteps": 1000,
                 "sampling_timesteps": args.sampling_steps, "objective": diffusion.objective,
                 "augment_horizontal_flip": False}}
    (args.out / "peer.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
