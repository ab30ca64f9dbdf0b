"""The promotion gate: a challenger replaces the champion only when it is better by more
than the metric's noise, and never when it memorised training images.

Both generators are evaluated with the same extractor, reference images, sample count and
seed (the champion is re-evaluated when the data version changed since it was scored).
The noise comes from a paired bootstrap: each resample draws the same sample indices for
champion and challenger (same seeds, so the pairs are comparable) and its own real
reference indices; the interval of (champion score - challenger score) must lie above
`register.gate.min_improvement` at `register.gate.confidence`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

from genloop.core.config import Params
from genloop.core.progress import Progress
from genloop.core.provenance import data_version
from genloop.core.workspace import Workspace
from genloop.eval.extractors import Extractor
from genloop.eval.generator_eval import GeneratorEval, evaluate_generator
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


def _score(metric: str, real: torch.Tensor, fake: torch.Tensor, kid_subset: int, seed: int) -> float:
    if metric == "fid":
        return FidAgainst(real)(fake)
    return kid(real, fake, kid_subset, seed, subsets=20)[0]


def paired_bootstrap(
    metric: str, real: torch.Tensor, challenger: torch.Tensor, champion: torch.Tensor, *, resamples: int,
    confidence: float, seed: int, kid_subset: int = 100,
) -> Comparison:
    """Bootstrap interval of champion - challenger over paired resamples of the sample sets."""
    if len(challenger) != len(champion):
        raise ValueError(f"paired sets differ in size: {len(challenger)} vs {len(champion)}")
    gen = torch.Generator().manual_seed(seed)
    n_real, n_fake = len(real), len(challenger)
    chal, champ = [], []
    with Progress("gate bootstrap", resamples, "resamples") as bar:
        for _ in range(resamples):
            r = real[torch.randint(n_real, (n_real,), generator=gen)]
            f = torch.randint(n_fake, (n_fake,), generator=gen)
            if metric == "fid":
                fid = FidAgainst(r)  # one real statistic for both sides of the pair
                chal.append(fid(challenger[f]))
                champ.append(fid(champion[f]))
            else:
                chal.append(_score(metric, r, challenger[f], kid_subset, seed))
                champ.append(_score(metric, r, champion[f], kid_subset, seed))
            bar.advance()
    c, h = torch.tensor(chal, dtype=torch.float64), torch.tensor(champ, dtype=torch.float64)
    alpha = (1 - confidence) / 2
    qs = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    d_lo, d_hi = torch.quantile(h - c, qs).tolist()
    full_chal = _score(metric, real, challenger, kid_subset, seed)
    full_champ = _score(metric, real, champion, kid_subset, seed)
    return Comparison(
        metric, full_chal, full_champ, full_champ - full_chal, d_lo, d_hi,
        tuple(torch.quantile(c, qs).tolist()), tuple(torch.quantile(h, qs).tolist()), confidence, resamples,
    )


def decide(
    cfg: Params, challenger: GeneratorEval, comparison: Comparison | None
) -> tuple[bool, str]:
    """The gate's verdict and its reason, in words a person can act on."""
    g = cfg.registry.gate
    share = challenger.memorisation.share
    if share > g.max_memorised_share:
        return False, (f"memorisation: {share:.1%} of samples are within {cfg.evaluate.memorisation_threshold} novelty "
                       f"units of a training image (limit {g.max_memorised_share:.1%})")
    if comparison is None:
        return True, "no champion yet"
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

    def sampler(n: int, seed: int) -> Any:  # loads the model only on a cache miss
        model = tracking.load_model(name, version).unwrap_python_model()
        return sample(model.generator, model.spec, n, seed)

    result = evaluate_generator(cfg, ws, sampler, sha, extractor, ref)
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
) -> dict[str, Any]:
    """What reports/gate.json, the version tags and the MLflow run record of the decision."""
    g = cfg.registry.gate
    return {
        "passed": passed,
        "reason": reason,
        "metric": cfg.registry.metric,
        "lower_is_better": True,
        "challenger": {"generator_sha256": challenger.generator_sha256,
                       "score": challenger.metrics[cfg.registry.metric],
                       "memorised_share": round(challenger.memorisation.share, 6)},
        "champion": None if champion is None else {
            "version": champion_version, "generator_sha256": champion.generator_sha256,
            "score": champion.metrics[cfg.registry.metric],
            "memorised_share": round(champion.memorisation.share, 6), "evaluation": how},
        "comparison": None if comparison is None else asdict(comparison),
        "settings": {"extractor": extractor.kind, "extractor_fingerprint": extractor.fingerprint,
                     "reference": ref.key, "n_samples": cfg.evaluate.n_samples, "seed": cfg.evaluate.seed,
                     "bootstrap": g.bootstrap, "confidence": g.confidence, "min_improvement": g.min_improvement,
                     "max_memorised_share": g.max_memorised_share},
    }
