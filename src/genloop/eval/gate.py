"""The promotion gate: a challenger replaces the champion only when it is better by more
than the metric's noise, and never when it memorised training images.

Both generators are evaluated with the same extractor, reference images, sample count and
seed (the champion is re-evaluated when the data version changed since it was scored).
The gate's metric is the one the calibration ladder found trustworthy on this data
(`genloop.eval.calibration.choose_gate_metric`; fid, c2st_auc or kid_mean). A challenger is
also refused when its recall or coverage (diversity) falls below the champion's by more than
that judge's noise on real images: training on accepted generations can narrow a generator
from one iteration to the next (model collapse), and a better FID must not hide it.

The noise comes from a paired bootstrap: each resample draws the same sample indices for
champion and challenger (same seeds, so the pairs are comparable) and its own real
reference indices; the interval of (champion score - challenger score) must lie above
`register.gate.min_improvement` at `register.gate.confidence`.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from genloop.core.config import Params
from genloop.core.progress import Progress
from genloop.core.provenance import data_version
from genloop.core.workspace import Workspace
from genloop.eval.c2st import c2st
from genloop.eval.extractors import Extractor
from genloop.eval.generator_eval import GeneratorEval, asked_classes, evaluate_generator
from genloop.eval.metrics import FidAgainst, kid
from genloop.eval.reference import Reference
from genloop.mlops import tracking
from genloop.models import sample

log = logging.getLogger(__name__)

WEIGHTS_TAG = "genloop.generator_sha256"


@dataclass(frozen=True)
class Comparison:
    """Champion vs challenger on one metric (lower is better); delta > 0: challenger better."""

    metric: str
    challenger: float
    champion: float
    delta: float
    delta_low: float
    delta_high: float
    challenger_interval: tuple[float, float]
    champion_interval: tuple[float, float]
    confidence: float
    resamples: int


DIVERSITY = ("recall", "coverage")  # higher is better; the collapse guard's judges
C2ST_RESAMPLES = 50  # the C2ST gate's bootstrap: enough for a 95 % interval, in under a minute


def _score(metric: str, real: torch.Tensor, fake: torch.Tensor, kid_subset: int, seed: int,
           bank: torch.Tensor | None = None) -> float:
    if metric == "fid":
        return FidAgainst(real)(fake)
    if metric == "c2st_auc":
        if bank is None:
            raise ValueError("the C2ST needs the real training features (bank)")
        return c2st(bank, real, fake, seed=seed).auc
    return kid(real, fake, kid_subset, seed, subsets=20)[0]


def paired_bootstrap(
    metric: str, real: torch.Tensor, challenger: torch.Tensor, champion: torch.Tensor, *, resamples: int,
    confidence: float, seed: int, kid_subset: int = 100, bank: torch.Tensor | None = None,
) -> Comparison:
    """Bootstrap interval of champion - challenger over paired resamples of the sample sets."""
    if len(challenger) != len(champion):
        raise ValueError(f"paired sets differ in size: {len(challenger)} vs {len(champion)}")
    gen = torch.Generator().manual_seed(seed)
    n_real, n_fake = len(real), len(challenger)
    chal, champ = [], []
    if metric == "c2st_auc":  # each resample trains two discriminators (~0.5 s each on 2 cores)
        resamples = min(resamples, C2ST_RESAMPLES)
    with Progress("gate bootstrap", resamples, "resamples") as bar:
        for _ in range(resamples):
            r = real[torch.randint(n_real, (n_real,), generator=gen)]
            f = torch.randint(n_fake, (n_fake,), generator=gen)
            if metric == "fid":
                fid = FidAgainst(r)  # one real statistic for both sides of the pair
                chal.append(fid(challenger[f]))
                champ.append(fid(champion[f]))
            else:
                chal.append(_score(metric, r, challenger[f], kid_subset, seed, bank))
                champ.append(_score(metric, r, champion[f], kid_subset, seed, bank))
            bar.advance()
    c, h = torch.tensor(chal, dtype=torch.float64), torch.tensor(champ, dtype=torch.float64)
    alpha = (1 - confidence) / 2
    qs = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    d_lo, d_hi = torch.quantile(h - c, qs).tolist()
    full_chal = _score(metric, real, challenger, kid_subset, seed, bank)
    full_champ = _score(metric, real, champion, kid_subset, seed, bank)
    return Comparison(
        metric, full_chal, full_champ, full_champ - full_chal, d_lo, d_hi,
        tuple(torch.quantile(c, qs).tolist()), tuple(torch.quantile(h, qs).tolist()), confidence, resamples,
    )


def diversity_loss(challenger: dict[str, float | None], champion: dict[str, float | None],
                   noise: dict[str, float]) -> str | None:
    """Why the challenger is less diverse than the champion by more than the noise (None when it is not).

    `noise` is each judge's 95 % half-width on one set of real images; the difference of two
    independent sets is noisier by sqrt(2)."""
    for name in DIVERSITY:
        chal, champ = challenger.get(name), champion.get(name)
        if chal is None or champ is None or name not in noise:
            continue
        margin = math.sqrt(2) * noise[name]
        if champ - chal > margin:
            return (f"collapse guard: {name} fell from {champ:.3f} (champion) to {chal:.3f}, more than the noise of "
                    f"the difference (±{margin:.3f}): the challenger covers fewer of the real images' modes")
    return None


def decide(
    cfg: Params, challenger: GeneratorEval, comparison: Comparison | None, champion: GeneratorEval | None = None,
    diversity_noise: dict[str, float] | None = None,
) -> tuple[bool, str]:
    """The gate's verdict and its reason, in words a person can act on."""
    g = cfg.registry.gate
    share = challenger.memorisation.share
    if share > g.max_memorised_share:
        return False, (f"memorisation: {share:.1%} of samples are within {cfg.evaluate.memorisation_threshold} novelty "
                       f"units of a training image (limit {g.max_memorised_share:.1%})")
    if comparison is None:
        return True, "no champion yet"
    if champion is not None and diversity_noise is not None:
        collapsed = diversity_loss(challenger.metrics, champion.metrics, diversity_noise)
        if collapsed:
            return False, collapsed
    m, level = comparison.metric, f"{comparison.confidence:.0%}"
    interval = f"[{comparison.delta_low:.4f}, {comparison.delta_high:.4f}]"
    if comparison.delta_low > g.min_improvement:
        return True, (f"{m} {comparison.challenger:.4f} vs champion {comparison.champion:.4f}: improvement "
                      f"{comparison.delta:.4f}, {level} interval {interval} above the margin {g.min_improvement}")
    if comparison.delta <= 0:
        return False, (f"{m} {comparison.challenger:.4f} is not better than the champion's "
                       f"{comparison.champion:.4f} ({level} interval of the improvement {interval})")
    return False, (f"{m} {comparison.challenger:.4f} vs champion {comparison.champion:.4f}: improvement "
                   f"{comparison.delta:.4f} is within the noise ({level} interval {interval} reaches "
                   f"the margin {g.min_improvement})")


def evaluate_champion(
    cfg: Params, ws: Workspace, name: str, version: str, extractor: Extractor, ref: Reference
) -> tuple[GeneratorEval, str]:
    """The champion scored on the current reference, and how (cached, or why re-evaluated)."""
    tags = tracking.version_tags(name, version)
    sha = tags.get(WEIGHTS_TAG) or f"{name}-v{version}"

    @functools.cache
    def model() -> Any:  # loaded only on a cache miss, once
        return tracking.load_model(name, version).unwrap_python_model()

    def sampler(n: int, seed: int) -> Any:
        return sample(model().generator, model().spec, n, seed)

    result = evaluate_generator(cfg, ws, sampler, sha, extractor, ref, asked=lambda n: asked_classes(model().spec, n))
    recorded = tags.get("genloop.data_version")
    if result.cached:
        how = "cached evaluation on the current data version and extractor"
    elif recorded and recorded != data_version(ws):
        how = f"re-evaluated: it was scored on data version {recorded}"
    else:
        how = "re-evaluated: no evaluation with the current extractor and settings in this workspace"
    return result, how


def gate_report(
    cfg: Params, challenger: GeneratorEval, champion: GeneratorEval | None, champion_version: str | None,
    how: str | None, comparison: Comparison | None, passed: bool, reason: str, extractor: Extractor, ref: Reference,
    metric: tuple[str, str],
) -> dict[str, Any]:
    """What reports/gate.json, the version tags and the MLflow run record of the decision;
    `metric`: the gate's metric and why it was chosen."""
    g = cfg.registry.gate
    name = metric[0]
    return {
        "passed": passed,
        "reason": reason,
        "metric": name,
        "metric_why": metric[1],
        "lower_is_better": True,
        "challenger": {"generator_sha256": challenger.generator_sha256,
                       "score": challenger.metrics[name],
                       **{k: challenger.metrics.get(k) for k in DIVERSITY},
                       "memorised_share": round(challenger.memorisation.share, 6)},
        "champion": None if champion is None else {
            "version": champion_version, "generator_sha256": champion.generator_sha256,
            "score": champion.metrics[name], **{k: champion.metrics.get(k) for k in DIVERSITY},
            "memorised_share": round(champion.memorisation.share, 6), "evaluation": how},
        "comparison": None if comparison is None else asdict(comparison),
        "settings": {"extractor": extractor.kind, "extractor_fingerprint": extractor.fingerprint,
                     "reference": ref.key, "n_samples": cfg.evaluate.n_samples, "seed": cfg.evaluate.seed,
                     "bootstrap": g.bootstrap, "confidence": g.confidence, "min_improvement": g.min_improvement,
                     "max_memorised_share": g.max_memorised_share},
    }
