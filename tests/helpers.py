"""Small settings that make the real loop run in seconds, shared by the pipeline tests."""

from __future__ import annotations

TINY = [
    "collect.sources=[{uri: 'builtin:mnist', limit: 400}]",
    "validate.min_rows=50",
    "model.dcgan.latent_dim=16",
    "model.dcgan.g_width=8",
    "model.dcgan.d_width=8",
    "train.epochs=1",
    "train.batch_size=32",
    "train.log_every=2",
    "train.checkpoint_every=5",
    "train.grid_size=20",
    "evaluate.n_samples=60",
    "evaluate.extractor_epochs=1",
    "evaluate.kid_subset_size=20",
    "generate.n=24",
    "generate.batch_size=10",
    "optimize.keep=10",
]
