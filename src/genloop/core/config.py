"""One typed model of params.yaml, validated once at start.

`load_params(path, overrides)` reads the YAML file, applies `--set dotted.key=value`
overrides (values parsed as YAML, like `dvc exp run -S`) and validates everything into
`Params`. Any bad key or value raises `ConfigError` naming the dotted key, the value and
what is allowed, before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from genloop.core.errors import ConfigError
from genloop.core.logs import redact


def _yaml_boolean(v: Any) -> Any:
    """YAML 1.1 (and `--set key=yes`) reads a bare yes/no as a boolean: take it as meant."""
    return {True: "yes", False: "no"}.get(v, v) if isinstance(v, bool) else v


AutoYesNo = Annotated[Literal["auto", "yes", "no"], BeforeValidator(_yaml_boolean)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Source(_Section):
    """One place images are collected from."""

    uri: str = Field(description="builtin:mnist, a local directory, or s3://bucket/prefix")
    labels: Literal["none", "folder"] = Field(
        "none", description="'folder': the name of each file's parent folder is its label"
    )
    limit: int = Field(0, ge=0, description="collect at most this many files (0: all)")


class DataParams(_Section):
    resolution: int = Field(32, description="side of the square training images, a power of 2")
    mode: Literal["auto", "L", "RGB"] = Field(
        "auto", description="auto: RGB when any image has colour, L when every image is grey (clean decides)"
    )
    background: str = Field("#ffffff", description="transparency is composited on this colour: a name or #rrggbb")
    holdout_fraction: float = Field(0.1, ge=0.0, lt=0.9)

    @field_validator("resolution")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        allowed = [8, 16, 32, 64, 128, 256]
        if v not in allowed:
            raise ValueError(f"must be one of {allowed}")
        return v

    @field_validator("background", mode="before")
    @classmethod
    def _opaque_colour(cls, v: Any) -> str:
        """A colour name or hex code, stored as #rrggbb (so `white` and `#FFF` share a clean cache)."""
        from PIL import ImageColor

        if v is None:  # YAML reads an unquoted #ffffff as a comment: nothing
            raise ValueError("is empty: quote a hex colour in YAML ('#ffffff'), or give a name such as white")
        try:
            rgb = ImageColor.getrgb(str(v))
        except ValueError:
            raise ValueError("is not a colour: give a name (white, black, grey) or a hex code ('#ffffff')") from None
        if len(rgb) == 4 and rgb[3] != 255:
            raise ValueError("must be opaque (transparency is composited on it): drop the alpha part")
        return "#{:02x}{:02x}{:02x}".format(*rgb[:3])


class CollectParams(_Section):
    sources: list[Source] = Field(default_factory=lambda: [Source(uri="builtin:mnist")])
    dvc_add: bool = Field(True, description="run `dvc add data/raw` after collecting")
    dvc_push: AutoYesNo = Field(
        "auto",
        description="`dvc push data.dvc` after `dvc add`; auto: when the DVC repo has a default remote, "
        "yes: a missing default remote is an error",
    )
    max_synthetic_fraction: float = Field(
        0.2, ge=0, le=1,
        description="accepted generated images (a `feedback:` source) make up at most this share of the corpus",
    )

    @field_validator("sources", mode="before")
    @classmethod
    def _strings_are_uris(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"uri": s} if isinstance(s, str) else s for s in v]
        return v

    @model_validator(mode="after")
    def _push_needs_add(self) -> CollectParams:
        if self.dvc_push == "yes" and not self.dvc_add:
            raise ValueError("collect.dvc_push=yes needs collect.dvc_add=true (only an added version is pushed)")
        return self


def _check_sink(v: str | None) -> str | None:
    """None, or an s3://bucket[/prefix] URI."""
    if v is None:
        return None
    if not v.startswith("s3://"):
        raise ValueError("must be an s3://bucket/prefix URI (or null for no upload)")
    bucket = v[5:].split("/", 1)[0]
    if not bucket:
        raise ValueError("names no bucket; use s3://bucket/prefix")
    if "@" in bucket or ":" in bucket:
        raise ValueError("must not carry credentials (user:secret@): they come from the AWS environment or profile")
    return v


class CleanParams(_Section):
    near_duplicate_distance: int = Field(
        0, ge=-1, le=64, description="max perceptual-hash Hamming distance of near duplicates; -1 off"
    )
    blank_std: float = Field(2.0, ge=0.0, description="images whose pixel std is below are blank")
    max_pixels: int = Field(40_000_000, gt=0, description="larger images are decompression bombs")
    min_side: int = Field(8, ge=1, description="smaller images are dropped")


class ValidateParams(_Section):
    min_rows: int = Field(100, ge=1)
    max_rows: int = Field(10_000_000, ge=1)
    max_class_ratio: float = Field(
        3.0, ge=1.0, description="largest / smallest class count allowed when labels exist"
    )


DIFFAUGMENT_OPS = ("colour", "translation", "cutout")  # genloop.models.augment implements them


class DCGANParams(_Section):
    """DCGAN with a spectral-norm projection discriminator; recipe for small corpora (bench/recipe.py)."""

    latent_dim: int = Field(64, ge=2)
    g_width: int = Field(32, ge=4)
    d_width: int = Field(32, ge=4)
    loss: Literal["hinge", "nonsaturating"] = Field("nonsaturating", description="adversarial loss")
    augment: str = Field(
        "",
        description=f"DiffAugment policy: comma-separated ops of {', '.join(DIFFAUGMENT_OPS)} applied to real and "
                    "generated images before the discriminator ('': none; colour's saturation only on RGB)",
    )
    r1_gamma: float = Field(0.0, ge=0, description="weight of the R1 penalty on real images (0: off)")
    r1_every: int = Field(16, ge=1, description="lazy R1: the penalty is applied every this many steps")
    mode_seeking: float = Field(
        0.1, ge=0, description="weight of the mode-seeking term (Mao et al. 2019): same-class samples from "
                               "different latents must differ; counters one-image-per-class collapse (0: off)"
    )

    @field_validator("augment")
    @classmethod
    def _known_ops(cls, v: str) -> str:
        names = [p.strip() for p in v.split(",") if p.strip() and p.strip() != "none"]
        unknown = [n for n in names if n not in DIFFAUGMENT_OPS]
        if unknown:
            raise ValueError(f"unknown op(s) {', '.join(unknown)}; use a comma-separated subset of "
                             f"{', '.join(DIFFAUGMENT_OPS)}, or '' for none")
        return ",".join(names)


class VAEParams(_Section):
    """Convolutional VAE: Bernoulli reconstruction loss + beta x KL."""

    latent_dim: int = Field(32, ge=2, description="size of the Gaussian latent")
    width: int = Field(32, ge=4, description="channels of the first encoder block (doubling per block)")
    beta: float = Field(0.1, ge=0, description="weight of the KL term (1: the ELBO; below 1 sharper "
                        "reconstructions, whose latent holes the fitted prior avoids)")
    kl_warmup_steps: int = Field(200, ge=0, description="steps over which the KL weight ramps from 0 to beta")
    lr: float | None = Field(1e-3, gt=0, description="Adam learning rate of this family; null: train.lr")
    prior: Literal["fitted", "normal"] = Field(
        "fitted", description="latents sampled from: fitted, a Gaussian mixture fitted to the training images' "
        "encodings after training (per class when conditional); normal, N(0, I)")
    prior_components: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        "auto", description="mixture components per class (or for the whole corpus when unconditional); fewer "
        "when a class has too few images. auto: 4 per class, 16 for an unlabelled corpus")
    prior_temperature: float = Field(1.0, gt=0, le=2, description="scale of the fitted components' spread "
                                     "(<1: more typical, less varied samples)")


class DDPMParams(_Section):
    """Diffusion on diffusers: a UNet2DModel, a DDPMScheduler noise schedule, DPM-Solver++ or DDIM sampling."""

    block_out_channels: list[Annotated[int, Field(ge=4, le=1024)]] = Field(
        default_factory=lambda: [16, 32, 64], min_length=1, max_length=6,
        description="UNet channels per resolution level (each level but the last halves the side)",
    )
    layers_per_block: int = Field(1, ge=1, le=4, description="residual blocks per level")
    attention: bool = Field(True, description="self-attention at the lowest resolution")
    timesteps: int = Field(1000, ge=2, le=10_000, description="diffusion steps in training")
    schedule: Literal["cosine", "linear"] = Field("cosine", description="noise schedule")
    prediction: Literal["epsilon", "v_prediction"] = Field(
        "v_prediction", description="what the UNet predicts: the noise, or the velocity (Salimans & Ho 2022)"
    )
    sampler: Literal["dpm++", "ddim"] = Field(
        "dpm++", description="deterministic sampler: DPM-Solver++ (2nd order) or DDIM (eta=0)"
    )
    sampling_steps: int = Field(10, ge=1, description="sampler steps per sample (each one UNet call per image)")
    cond_dropout: float = Field(
        0.1, ge=0, lt=1, description="share of labels dropped in training (enables classifier-free guidance)"
    )
    guidance: float = Field(
        2.0, ge=0, description="classifier-free guidance scale at sampling; 1: none (>1 costs 2 UNet calls/step)"
    )
    lr: float | None = Field(1e-3, gt=0, description="Adam learning rate of this family; null: train.lr")

    @model_validator(mode="after")
    def _steps_fit(self) -> DDPMParams:
        if self.sampling_steps > self.timesteps:
            raise ValueError(f"sampling_steps ({self.sampling_steps}) must be <= timesteps ({self.timesteps})")
        return self


class ModelParams(_Section):
    family: Literal["auto", "dcgan", "vae", "ddpm"] = Field(
        "auto", description="generative family; its section holds its hyper-parameters. auto: vae on a CPU (best "
        "quality per CPU-minute), ddpm on a CUDA GPU (the quality family), resolved when params are loaded"
    )
    conditional: AutoYesNo = Field(
        "auto", description="auto: class-conditional when the dataset has labels"
    )
    dcgan: DCGANParams = Field(default_factory=DCGANParams)
    vae: VAEParams = Field(default_factory=VAEParams)
    ddpm: DDPMParams = Field(default_factory=DDPMParams)


class TrainParams(_Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(2e-4, gt=0)
    beta1: float = Field(0.5, ge=0, lt=1)
    ema_decay: float = Field(0.995, ge=0, lt=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on CUDA")
    channels_last: AutoYesNo = "auto"
    compile: bool = False
    threads: int = Field(0, ge=0, description="CPU threads for torch (0: all cores)")
    gpus: int = Field(
        0, ge=0, le=64,
        description="data-parallel processes under torchrun (DDP; NCCL on GPUs, gloo on CPU); 0 or 1: one process",
    )
    deterministic: bool = Field(False, description="torch deterministic algorithms: bit-exact resume on CPU")
    memory_budget_gb: float = Field(
        8.0, ge=0,
        description="the most memory the train split's images may take on the training device (GB, uint8); a "
                    "larger split streams from data/clean's shards batch by batch, to the same model",
    )
    log_every: int = Field(25, ge=1, description="steps between metric flushes")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    grid_size: int = Field(80, ge=1, description="images in each per-epoch sample grid")
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: continue from the last checkpoint of the same data and settings"
    )
    max_minutes: float | None = Field(
        None, gt=0,
        description="wall-clock budget of training steps in minutes (null: none): training stops after the step "
                    "that reaches it, with the same outputs as a full run; checkpoints are kept per budget",
    )


class CalibrationParams(_Section):
    """The calibration ladder (genloop.eval.calibration): real images under known degradations."""

    enabled: bool = Field(True, description="compute the ladder once per data version and extractor (cached)")
    bootstrap: int = Field(20, ge=5, description="resamples that measure each metric's noise on real images")
    max_images: int = Field(
        10_000, ge=100,
        description="real images per rung at most (the larger of the holdout and evaluate.n_samples below it): the "
                    "ladder embeds and judges them 16 times, and at 50,000 took 17 minutes on 2 cores",
    )
    seed: int = 0


class EvaluateParams(_Section):
    n_samples: int = Field(1000, ge=10, description="generated images compared with the holdout")
    seed: int = 1234
    extractor: Literal["auto", "dinov2", "clip", "inception", "domain"] = Field(
        "auto", description="auto: the first of dinov2, clip, inception whose weights are present locally, else domain"
    )
    dinov2_weights: str | None = Field(
        None, description="local Hugging Face directory of a DINOv2 model, e.g. facebook/dinov2-base (null: not used)"
    )
    clip_weights: str | None = Field(
        None,
        description="local Hugging Face directory of a CLIP model, e.g. openai/clip-vit-base-patch32 (null: not used)",
    )
    inception_weights: str | None = Field(
        None, description="local path of torch-fidelity's Inception weights (null: look in the torch hub cache)"
    )
    extractor_epochs: int = Field(3, ge=1)
    extractor_max_images: int = Field(
        20000, ge=2,
        description="the most training images the in-domain extractor learns from: a larger train split gives it "
                    "a seeded subsample of this many (training grows with the images, 11.5 min at 89k on 2 cores)",
    )
    realism_bank: int = Field(
        20000, ge=2,
        description="the most training features the k-NN realism manifold is built from (its radii cost grows "
                    "with the square): a larger train split gives it a seeded subsample of this many",
    )
    classifier_epochs: int = Field(
        6, ge=1, description="epochs of the independent real-image classifier that judges class consistency"
    )
    kid_subset_size: int = Field(100, ge=2)
    is_splits: int = Field(10, ge=1, description="Inception Score splits")
    pr_neighbourhood: int = Field(3, ge=1, description="k of the k-NN manifolds of precision/recall")
    memorisation_threshold: float = Field(
        0.15, ge=0, description="a sample nearer than this (in novelty units) to a training image counts as memorised"
    )
    memory_budget_gb: float = Field(
        1.0, ge=0,
        description="the most memory a split's images may take while the judges read them (GB, uint8); a larger "
                    "split streams from data/clean's shards batch by batch, to the same numbers",
    )
    calibration: CalibrationParams = Field(default_factory=CalibrationParams)


class GateParams(_Section):
    """When a challenger replaces the champion: better by more than the metric's noise."""

    bootstrap: int = Field(200, ge=20, description="bootstrap resamples of the sample sets")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="two-sided level of the bootstrap interval")
    min_improvement: float = Field(
        0.0, ge=0, description="the interval of (champion - challenger) must lie above this margin"
    )
    max_memorised_share: float = Field(
        0.05, ge=0, le=1, description="a challenger with more memorised samples than this is never promoted"
    )
    seed: int = 0


class RegisterParams(_Section):
    model_name: str = Field("genloop-generator", min_length=1)
    metric: Literal["auto", "fid", "kid_mean", "c2st_auc"] = Field(
        "auto", description="the gate's metric (lower is better); auto: the first of fid, c2st_auc, kid_mean that "
        "passes the calibration ladder's checks on this data")
    gate: GateParams = Field(default_factory=GateParams)


class GenerateParams(_Section):
    n: int = Field(256, ge=1)
    seed: int = 2024
    batch_size: int = Field(256, ge=1)
    label: int | str | None = Field(None, description="class to generate; None cycles through classes")
    sink: str | None = Field(
        None, description="s3://bucket/prefix: each batch is also uploaded to <sink>/<model version>/"
    )

    @field_validator("sink")
    @classmethod
    def _s3_sink(cls, v: str | None) -> str | None:
        return _check_sink(v)


def _check_range(v: tuple[float, float] | None) -> tuple[float, float] | None:
    if v is not None and v[0] > v[1]:
        raise ValueError(f"must be [low, high] with low <= high, got {list(v)}")
    return v


class TuneParams(_Section):
    """Feedback-driven tuning: an Optuna study with one trial per loop iteration (genloop.feedback.tuning).

    A range set to null is not tuned. The learning rate tuned is the model family's own
    (`model.<family>.lr`) when it has one, else `train.lr`.
    """

    enabled: bool = Field(True, description="record this iteration as a trial and write reports/next_params.yaml")
    storage: str | None = Field(
        None,
        description="null: a journal file .genloop/optuna/study.log in the workspace; a file path (journal, "
        "relative to the workspace); an RDB URL (sqlite:///study.db, relative paths in the workspace); or "
        "s3://bucket/key of a journal file (downloaded, used, uploaded back only if unchanged meanwhile)",
    )
    study_name: str = Field("genloop", min_length=1, max_length=200)
    acceptance_weight: float = Field(
        0.5, ge=0, le=1,
        description="objective = metric / first trial's metric + w x (1 - 2 x human acceptance rate), lower is better; "
        "0: the gate's metric alone",
    )
    agreement_weight: float = Field(
        0.25, ge=0, le=1,
        description="objective + w x (1 - 2 x AUC of the curation score against reviewers' accept/reject); "
        "no reviews or one kind of decision only: chance (AUC 1/2, adds nothing); 0: not used",
    )
    seed: int = Field(0, description="TPE seed (offset by the number of trials, so proposals differ)")
    startup_trials: int = Field(4, ge=0, description="random proposals before TPE models the results")
    epochs: tuple[int, int] | None = Field((2, 20), description="train.epochs range")
    lr: tuple[float, float] | None = Field((1e-4, 3e-3), description="learning rate range (log scale)")
    latent_dim: tuple[int, int] | None = Field(
        (8, 128), description="model.<family>.latent_dim range (log scale; dcgan and vae)"
    )
    beta: tuple[float, float] | None = Field((0.03, 1.0), description="model.vae.beta range (log scale)")

    @field_validator("epochs", "lr", "latent_dim", "beta")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        return _check_range(v)

    @field_validator("lr", "latent_dim", "beta")
    @classmethod
    def _positive(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and v[0] <= 0:
            raise ValueError("a log-scale range must be positive")
        return v

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and v[0] < 1:
            raise ValueError("epochs must be at least 1")
        return v

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is not None and v.startswith("s3://"):
            bucket, _, key = v[5:].partition("/")
            if not bucket or not key or key.endswith("/"):
                raise ValueError("an s3:// storage names the journal object: s3://bucket/path/study.log")
        return v


class OptimizeParams(_Section):
    keep: int = Field(64, ge=1, description="curated images kept (the best by score)")
    min_novelty: float = Field(
        0.15, ge=0, description="drop samples closer than this (relative distance) to a training image"
    )
    realism: Literal["knn", "c2st"] = Field(
        "knn", description="the curation score: knn (k-NN realism as a percentile of unseen real images) or c2st "
        "(each image's P(real) from a cross-fitted real-vs-generated discriminator)")
    realism_weight: float = Field(1.0, ge=0)
    novelty_weight: float = Field(0.5, ge=0)
    sink: str | None = Field(
        None, description="s3://bucket/prefix: each curated batch is also uploaded to <sink>/<model version>/"
    )
    tune: TuneParams = Field(default_factory=TuneParams)

    @field_validator("sink")
    @classmethod
    def _s3_sink(cls, v: str | None) -> str | None:
        return _check_sink(v)


class FeedbackParams(_Section):
    """Where reviewers' decisions on curated images are kept (append-only, one record per action)."""

    store: str = Field(
        "feedback", min_length=1,
        description="a folder (relative to the workspace) or s3://bucket/prefix holding the feedback records",
    )

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if v.startswith("s3://"):
            return _check_sink(v) or v
        if ":" in v.split("/")[0]:
            raise ValueError("must be a folder path or an s3://bucket/prefix URI")
        return v


class LoopParams(_Section):
    autotune: bool = Field(
        False, description="apply reports/next_params.yaml (the optimize stage's proposal) in the next loop run"
    )


class ParallelParams(_Section):
    """How the chunked stages (clean, generate) spread their work. Never part of a cache key or of dvc.yaml's
    params: every engine produces the same outputs."""

    engine: Literal["processes", "dask", "serial"] = Field(
        "processes",
        description="processes: one process per core on this machine; dask: the chunks as Dask tasks of a "
                    "Prefect flow run's DaskTaskRunner, on the cluster at parallel.address or a local cluster of "
                    "parallel.workers processes; serial: in this process",
    )
    workers: int | Literal["auto"] = Field(
        "auto", description="processes (or local Dask workers); auto: the cores this process may use"
    )
    address: str | None = Field(
        None, description="a running Dask scheduler, e.g. tcp://dask-scheduler:8786 (engine dask; null: start a "
                          "local cluster for the run)"
    )
    chunk_size: int = Field(
        512, ge=1,
        description="files per chunk (and clean shard), images per generate chunk (whole batches, at least one), "
                    "on every engine: the unit that is retried when a worker dies",
    )

    @field_validator("workers")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1, or auto")
        return v

    def worker_count(self) -> int:
        """`workers` resolved: auto is the number of cores this process may run on."""
        if self.workers != "auto":
            return int(self.workers)
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class TrackingParams(_Section):
    experiment: str = Field("genloop", min_length=1)


# model.family=auto. On a CPU, the family with the best quality per CPU-minute: the VAE
# (bench/README.md, family_quality.py: the best FID at the lowest CPU cost, ~14x cheaper to
# train than diffusion). On a CUDA GPU, the quality family: diffusion, whose samples at 5 epochs
# sat nearer real images on every judge than the VAE's at 10 (bench/README.md, "The ddpm family
# on diffusers") and whose cost, 14x on 2 CPU cores, is what a GPU removes. Apple MPS counts as
# a CPU here: the diffusion family has not been measured there. Written here rather than in
# models/device.py so that loading params does not make every stage depend on the models.
CPU_FAMILY = "vae"
GPU_FAMILY = "ddpm"


def cuda_possible() -> bool:
    """Whether CUDA could be available, decided without importing torch (4.6 s on 2 cores without
    bytecode caches, paid by every stage that loads params): torch's build must name a CUDA version
    (read from torch/version.py), an NVIDIA device must be present and CUDA_VISIBLE_DEVICES must
    not hide every GPU. Only then does the caller import torch to ask it. Hand-written: no library
    answers this without initialising CUDA."""
    import importlib.util
    import re
    import sys

    if "torch" in sys.modules:
        return True  # already paid for: ask torch itself
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    version = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        built_with_cuda = re.search(r"^cuda\b[^=]*=\s*['\"]", version.read_text(), re.MULTILINE) is not None
    except OSError:
        return True  # cannot tell: let torch answer
    return built_with_cuda and (Path("/proc/driver/nvidia/gpus").is_dir() or any(Path("/dev").glob("nvidia[0-9]*")))


def auto_family(device: str) -> str:
    """The family `model.family: auto` trains with `train.device` set to `device`."""
    if device == "auto":
        if not cuda_possible():
            return CPU_FAMILY
        import torch

        return GPU_FAMILY if torch.cuda.is_available() else CPU_FAMILY
    return GPU_FAMILY if device == "cuda" else CPU_FAMILY


class Params(_Section):
    """Everything that sets genloop's behaviour; endpoints and secrets come from the env."""

    data: DataParams = Field(default_factory=DataParams)
    collect: CollectParams = Field(default_factory=CollectParams)
    clean: CleanParams = Field(default_factory=CleanParams)
    # params.yaml keeps the stage names `validate:` and `register:`; the attributes say what the sections
    # configure (and do not shadow pydantic's BaseModel.validate)
    data_gate: ValidateParams = Field(default_factory=ValidateParams, alias="validate")
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    registry: RegisterParams = Field(default_factory=RegisterParams, alias="register")
    generate: GenerateParams = Field(default_factory=GenerateParams)
    optimize: OptimizeParams = Field(default_factory=OptimizeParams)
    feedback: FeedbackParams = Field(default_factory=FeedbackParams)
    loop: LoopParams = Field(default_factory=LoopParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    parallel: ParallelParams = Field(default_factory=ParallelParams)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _resolve_auto_family(self) -> Params:
        """`model.family: auto` becomes the family for the device train.device resolves to, so every
        stage, cache key and MLflow param sees the family that is actually trained."""
        if self.model.family == "auto":
            self.model.family = auto_family(self.train.device)
        return self

    def section_hash(self, *names: str) -> str:
        """A short stable hash of the named sections, for cache keys."""
        dumped = self.model_dump(mode="json", by_alias=True)
        payload = json.dumps({n: dumped[n] for n in names}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """Dotted-key view of every value, for MLflow params."""
        return _flatten(self.model_dump(mode="json", by_alias=True))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return sorted((f.alias or name) for name, f in model.model_fields.items())


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value, e.g. train.epochs=3")
    key, _, text = assignment.partition("=")
    parts = key.strip().split(".")
    model: type[BaseModel] | None = Params
    node = raw
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        if model is not None:
            names = {(f.alias or n): f for n, f in model.model_fields.items()}
            if part not in names:
                raise ConfigError(
                    f"--set {key}: unknown key {dotted!r}; valid keys here: {', '.join(_valid_keys(model))}"
                )
            ann = names[part].annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if i == len(parts) - 1:
            try:
                node[part] = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"--set {key}: value {text!r} is not valid YAML: {exc}") from exc
        else:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"{origin} is invalid:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent: Any = Params
            for p in err["loc"][:-1]:
                if isinstance(p, int):
                    continue  # an item of a list of sections (collect.sources.0): its model
                fields = {(f.alias or n): f for n, f in parent.model_fields.items()}
                ann = fields[str(p)].annotation if str(p) in fields else None
                if get_origin(ann) is list and get_args(ann):
                    ann = get_args(ann)[0]
                parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
                if parent is None:
                    break
            valid = f"; valid keys: {', '.join(_valid_keys(parent))}" if parent else ""
            lines.append(f"  {loc}: unknown key{valid}")
        else:
            lines.append(redact(f"  {loc} = {value!r}: {msg}"))  # a credential in a URI is never echoed
    return "\n".join(lines)


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override and validate params; raise ConfigError naming every bad key."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        origin = str(p)
        if not p.exists():
            raise ConfigError(f"params file {p} not found (pass --params FILE or create params.yaml)")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    for assignment in overrides or []:
        _apply_override(raw, assignment)
    if overrides:
        origin += " with --set " + " ".join(overrides)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(redact(_format_validation_error(exc, origin))) from None  # no credential echoed
