"""genloop's train stage against a bare reference loop of the same DCGAN, in one process.

reference: the loop as the PyTorch DCGAN example writes it - float images in a
           TensorDataset, a shuffling DataLoader, fp32, BCE-with-logits, no EMA, no logging.
genloop:   `genloop.stages.train.run` - uint8 data resident on the device, EMA, bf16 autocast and
           channels_last on CUDA, MLflow step metrics, per-epoch sample grids and checkpoints.

Both train the same conditional DCGAN (genloop.models.dcgan) on the same clean MNIST digits
with the same batch size for the same number of epochs; img/s counts training images per
second of the training loop (genloop's figure is from reports/train.json, which excludes the
MLflow run set-up). Prints both and the ratio genloop / reference.

  .venv/bin/python bench/train_throughput.py [--epochs 2] [--batch-size 64] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from genloop.core.config import Params, load_params
from genloop.core.dataset import load_split
from genloop.core.workspace import Workspace
from genloop.models import GeneratorSpec, dcgan
from genloop.models.device import pick_device
from genloop.stages import clean, collect, train


def prepare(ws: Workspace, limit: int) -> None:
    """collect + clean the built-in corpus into `ws` (no DVC, embedded MLflow)."""
    cfg = load_params(None, ["collect.dvc_add=false", f"collect.sources=[{{uri: 'builtin:mnist', limit: {limit}}}]"])
    collect.run(cfg, ws)
    clean.run(cfg, ws)


def reference(ws: Workspace, cfg: Params, device: torch.device) -> float:
    """The PyTorch-DCGAN-example loop over the same model; returns training images per second."""
    data = load_split(ws, "train")
    spec = GeneratorSpec("dcgan", cfg.data.resolution, 1, data.classes, cfg.model.dcgan.model_dump())
    hp = cfg.model.dcgan
    netG = dcgan.build_generator(spec).to(device)
    netD = dcgan.Discriminator(hp.d_width, spec.channels, spec.resolution, spec.num_classes).to(device)
    netG.apply(dcgan._init)
    netD.apply(dcgan._init)
    criterion = nn.BCEWithLogitsLoss()
    opt_d = torch.optim.Adam(netD.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, 0.999))
    opt_g = torch.optim.Adam(netG.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, 0.999))
    images = data.images.float() / 127.5 - 1.0
    loader = DataLoader(TensorDataset(images, data.labels), batch_size=cfg.train.batch_size, shuffle=True,
                        drop_last=True)
    seen, start = 0, time.perf_counter()
    for _ in range(cfg.train.epochs):
        for real, labels in loader:
            real, labels = real.to(device), labels.to(device)
            b = real.size(0)
            ones, zeros = torch.ones(b, device=device), torch.zeros(b, device=device)
            netD.zero_grad()
            err_real = criterion(netD(real, labels), ones)
            noise = torch.randn(b, hp.latent_dim, device=device)
            fake = netG(noise, labels)
            err_fake = criterion(netD(fake.detach(), labels), zeros)
            (err_real + err_fake).backward()
            opt_d.step()
            netG.zero_grad()
            criterion(netD(fake, labels), ones).backward()
            opt_g.step()
            seen += b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=0, help="images collected (0: all 5,000)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="extra genloop param override for the genloop side, e.g. train.channels_last=yes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    ws = Workspace.at(tempfile.mkdtemp(prefix="genloop-throughput-"))
    prepare(ws, args.limit)
    cfg = load_params(None, [f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
                             f"train.device={args.device}", "train.resume=never",
                             f"train.checkpoint_every={args.checkpoint_every}", *args.sets])
    device = pick_device(args.device)
    torch.manual_seed(0)
    ref = reference(ws, cfg, device)
    summary = train.run(cfg, ws)
    ours = float(summary["img_per_s"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; {summary['images']} images, batch {args.batch_size}, {args.epochs} epochs")
    print(f"reference (DataLoader, fp32): {ref:9.1f} img/s")
    print(f"genloop train stage:          {ours:9.1f} img/s  ({summary['device']})")
    print(f"ratio genloop / reference:    {ours / ref:9.2f}")
    print(json.dumps({"reference_img_s": round(ref, 1), "genloop_img_s": ours, "ratio": round(ours / ref, 3),
                      "device": name, "workspace": str(Path(ws.root))}))


if __name__ == "__main__":
    main()
