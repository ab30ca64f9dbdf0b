"""The calibration ladder: what each metric reads on real images under known degradations.

A metric value means little on its own ("FID 7.25"); it means a lot beside the values the same
metric gives real images blurred, noised, JPEG-compressed, greyed or stripped of their modes.
For every data version and extractor, genloop scores real training images degraded along
each ladder of `genloop.eval.degrade` against the holdout, with every judge (FID, KID, C2ST,
precision/recall/coverage, the curation score), once, and caches the result beside the
reference statistics. From it:

- each metric's noise: the half-width of its bootstrap interval on real images;
- checks: a metric that is not monotone along a ladder (a heavier rung reads better by more
  than the noise), or whose steps along it are mostly smaller than its noise, is flagged for
  that ladder, and a metric flagged on a ladder that matters to generators (blur, noise,
  mode dropping) is refused as the gate metric;
- positions: any evaluation's value placed on each ladder ("FID 7.25 ~ real images blurred
  with radius 4.1"), so a person can read it without knowing the extractor.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from genloop.core.config import Params
from genloop.core.dataset import ImageSet
from genloop.core.heap import release_free_heap, released
from genloop.core.progress import Progress
from genloop.core.storage import sha256_bytes, write_text_atomic
from genloop.core.workspace import Workspace
from genloop.eval import degrade
from genloop.eval.c2st import c2st
from genloop.eval.extractors import Extractor, embed
from genloop.eval.metrics import FidAgainst, kid, precision_recall
from genloop.eval.realism import RealismScorer
from genloop.eval.reference import Reference

log = logging.getLogger(__name__)

VERSION = 1  # bump when the ladders or judges change: cached calibrations are then recomputed
# Higher reads worse for these; lower reads worse for the others.
HIGHER_IS_WORSE = frozenset({"fid", "kid_mean", "c2st_auc"})
JUDGES = ("fid", "kid_mean", "c2st_auc", "precision", "recall", "coverage", "curation_score")
# The ladders a generator's failures look like: a metric flagged on one of these cannot gate.
GATE_LADDERS = ("blur", "noise", "mode_drop")
GATE_PREFERENCE = ("fid", "c2st_auc", "kid_mean")  # the gate's metric: the first that passes

KID_SUBSETS = 20  # as the gate's bootstrap: 100 subsets per rung would make KID most of the ladder's cost
MIN_BANK = 50  # fewer spare training images than this: the bank overlaps the judged set
Judge = Callable[[torch.Tensor], dict[str, float]]


@dataclass(frozen=True)
class Calibration:
    key: str
    extractor: str
    n: int  # real images per rung
    floor: dict[str, float]  # each judge on undegraded real training images
    noise: dict[str, float]  # half-width of each judge's bootstrap interval on real images
    ladders: dict[str, list[dict[str, Any]]]  # ladder -> rungs [{"level": l, "values": {judge: v}}]
    flags: dict[str, dict[str, str]]  # judge -> ladder -> why it is flagged
    memorisation: dict[str, float]  # memorised share of train copies and of unseen real images
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def worse(self, metric: str, a: float, b: float) -> float:
        """How much worse `a` reads than `b` on `metric` (positive: worse)."""
        return a - b if metric in HIGHER_IS_WORSE else b - a

    def gate_ready(self, metric: str) -> tuple[bool, str]:
        """Whether `metric` may gate, and why (or why not)."""
        if metric not in self.floor:
            return False, f"{metric} is not calibrated"
        bad = {ladder: why for ladder, why in self.flags.get(metric, {}).items() if ladder in GATE_LADDERS}
        if bad:
            return False, "; ".join(f"{ladder}: {why}" for ladder, why in bad.items())
        return True, (f"monotone along the {', '.join(GATE_LADDERS)} ladders with steps above its noise "
                      f"(±{self.noise[metric]:.4g})")

    def position(self, metric: str, value: float) -> dict[str, Any]:
        """Where `value` sits on each ladder: the interpolated level, and the sentence."""
        out: dict[str, Any] = {}
        for ladder, rungs in self.ladders.items():
            out[ladder] = _place(self, metric, value, ladder, rungs)
        return out

    def headline(self, metric: str, value: float) -> str:
        """The blur-ladder reading of `value`, e.g. "FID 7.25 ~ real images blurred with radius 4.1"."""
        return f"{metric} {value:.4g} {_place(self, metric, value, 'blur', self.ladders['blur'])['text']}"


def _place(cal: Calibration, metric: str, value: float, ladder: str, rungs: list[dict[str, Any]]) -> dict[str, Any]:
    """Linear interpolation of `value` between the two rungs of `ladder` that bracket it."""
    if metric not in cal.floor:
        return {"level": None, "text": f"({metric} is not calibrated)"}
    points = [(degrade.FLOOR_LEVEL[ladder], cal.floor[metric])] + [(r["level"], r["values"][metric]) for r in rungs]
    if cal.worse(metric, value, cal.floor[metric]) <= cal.noise[metric]:
        return {"level": points[0][0], "text": f"within the noise of real images (±{cal.noise[metric]:.3g})"}
    for i, ((lo_level, lo), (hi_level, hi)) in enumerate(itertools.pairwise(points)):
        if cal.worse(metric, value, lo) >= 0 and cal.worse(metric, hi, value) >= 0:
            if i + 2 < len(points) and value == hi == points[i + 2][1]:  # a judge at its ceiling, e.g. AUC 1.0
                return {"level": hi_level, "text": f"≥ {degrade.describe(ladder, hi_level)} (the judge saturates "
                                                   "there: heavier rungs read the same)"}
            span = cal.worse(metric, hi, lo)
            frac = cal.worse(metric, value, lo) / span if span > 0 else 1.0
            level = lo_level + frac * (hi_level - lo_level)
            return {"level": round(level, 3), "text": f"≈ {degrade.describe(ladder, round(level, 2))}"}
    last_level, last = points[-1]
    return {"level": None, "text": f"beyond the end of the {ladder} ladder (worse than "
                                   f"{degrade.describe(ladder, last_level)}: {last:.4g})"}


def _judges(cfg: Params, holdout: torch.Tensor, bank: torch.Tensor, scorer: RealismScorer) -> Judge:
    """Every judge of a set of features against the `holdout` features, in one call; `bank`: real
    training features that are not in the judged sets (the C2ST's and the curation score's real side)."""
    e = cfg.evaluate
    fid = FidAgainst(holdout)

    def judge(feats: torch.Tensor) -> dict[str, float]:
        # each judge's freed heap returned before the next: at 1M each works on the 99k-row holdout,
        # and the holes they left added up to 0.4-0.5 GB within one call
        pr = released(precision_recall(holdout, feats, e.pr_neighbourhood))
        return {
            "fid": released(fid(feats)),
            "kid_mean": released(kid(holdout, feats, e.kid_subset_size, e.seed, subsets=KID_SUBSETS)[0]),
            "c2st_auc": released(c2st(bank, holdout, feats, seed=e.seed).auc),
            "precision": pr["precision"], "recall": pr["recall"], "coverage": pr["coverage"],
            "curation_score": float(scorer(feats).mean()),
        }

    return judge


def _noise(cfg: Params, holdout: torch.Tensor, bank: torch.Tensor, scorer: RealismScorer, feats: torch.Tensor,
           resamples: int, seed: int) -> dict[str, float]:
    """Half-width of each judge's 95 % bootstrap interval over resamples of the real set and of the
    holdout (a small reference is a noisy one)."""
    gen = torch.Generator().manual_seed(seed)
    values: dict[str, list[float]] = {}
    with Progress("calibration noise", resamples, "resamples") as bar:
        for _ in range(resamples):
            idx = torch.randint(len(feats), (len(feats),), generator=gen)
            ref_idx = torch.randint(len(holdout), (len(holdout),), generator=gen)
            resampled = holdout[ref_idx]
            for k, v in _judges(cfg, resampled, bank, scorer.with_holdout(resampled))(feats[idx]).items():
                values.setdefault(k, []).append(v)
            release_free_heap()  # the resample's copies: at 1M the parent grew 0.3 GB over 20 resamples
            bar.advance()
    out = {}
    for k, vs in values.items():
        t = torch.tensor(vs, dtype=torch.float64)
        lo, hi = torch.quantile(t, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        out[k] = (hi - lo) / 2
    return out


def ladder_flags(metric: str, floor: float, values: list[float], noise: float,
                 higher_is_worse: bool) -> str | None:
    """Why `metric` fails a ladder (None when it passes): a heavier rung reads better than a lighter
    one by more than the noise, or fewer than half of the steps are larger than the noise."""
    sign = 1.0 if higher_is_worse else -1.0
    seq = [floor, *values]
    steps = [sign * (b - a) for a, b in itertools.pairwise(seq)]
    for i, step in enumerate(steps):
        if step < -noise:
            return (f"not monotone: rung {i + 1} reads better than the rung before it by {-step:.4g} "
                    f"(noise ±{noise:.3g})")
    resolved = sum(step > noise for step in steps)
    if resolved * 2 < len(steps):
        return f"steps smaller than its noise: {resolved} of {len(steps)} steps exceed ±{noise:.3g}"
    return None


def _ladder_judge(cfg: Params, ref: Reference, n: int) -> tuple[Judge, torch.Tensor, RealismScorer]:
    """The judge of a ladder of `n` real images, its bank and its realism scorer. The bank, the real side
    of the C2ST and of the curation score, is the training images outside the judged set."""
    bank = ref.train[n:] if len(ref.train) - n >= MIN_BANK else ref.train
    scorer = RealismScorer(bank, ref.holdout, k=cfg.evaluate.pr_neighbourhood, bank=cfg.evaluate.realism_bank,
                           seed=cfg.evaluate.seed)
    return _judges(cfg, ref.holdout, bank, scorer), bank, scorer


def at_ladder_size(cfg: Params, cal: Calibration, ref: Reference, features: torch.Tensor,
                   metrics: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The values to place on the ladder, and how many samples they judge: the evaluation's own
    `metrics` when it judged at most the ladder's `cal.n` images; else every judge again on the first
    `cal.n` samples' features, as the rungs were judged. Samples are independent draws, so the first
    `cal.n` are a fair subset; and C2ST's power and FID's bias move with the set's size (on the 100k
    corpus, a C2ST AUC of 0.949 from 50,000 samples reads blur radius 1.45 on a 50,000-image ladder
    and 1.72 on a 10,000-image one)."""
    if len(features) <= cal.n:
        return metrics, len(features)
    judge, _, _ = _ladder_judge(cfg, ref, cal.n)
    return judge(features[: cal.n]), cal.n


def _embed_rung(extractor: Extractor, images: torch.Tensor, ladder: str, level: float, seed: int) -> torch.Tensor:
    return embed(extractor.module, degrade.apply(images, ladder, level, seed))


def compute(cfg: Params, extractor: Extractor, ref: Reference, train_set: ImageSet, key: str) -> Calibration:
    """Score every rung of every ladder with every judge (see the module docstring)."""
    started = time.perf_counter()
    c = cfg.evaluate.calibration
    n = ladder_size(cfg, ref)
    images = train_set.images[:n]
    judge, bank, scorer = _ladder_judge(cfg, ref, n)
    floor = judge(ref.train[:n])
    noise = _noise(cfg, ref.holdout, bank, scorer, ref.train[:n], c.bootstrap, c.seed)
    ladders: dict[str, list[dict[str, Any]]] = {}
    plan = degrade.ladders_for(images.shape[1])
    with Progress("calibration", sum(len(v) for v in plan.values()), "rungs") as bar:
        for ladder, levels in plan.items():
            ladders[ladder] = []
            for level in levels:
                values = judge(_embed_rung(extractor, images, ladder, level, c.seed))
                ladders[ladder].append({"level": level, "values": {k: round(v, 6) for k, v in values.items()}})
                release_free_heap()  # the rung's degraded copy and its judges' temporaries
                bar.advance()
    flags: dict[str, dict[str, str]] = {}
    for metric in floor:
        for ladder, rungs in ladders.items():
            why = ladder_flags(metric, floor[metric], [r["values"][metric] for r in rungs], noise[metric],
                               metric in HIGHER_IS_WORSE)
            if why:
                flags.setdefault(metric, {})[ladder] = why
    return Calibration(key, extractor.kind, n, {k: round(v, 6) for k, v in floor.items()},
                       {k: round(v, 6) for k, v in noise.items()}, ladders, flags,
                       _memorisation_check(cfg, ref, n), round(time.perf_counter() - started, 2))


def _memorisation_check(cfg: Params, ref: Reference, n: int) -> dict[str, float]:
    """The memorisation detector on known answers: copies of training images, and unseen real ones."""
    from genloop.eval.metrics import memorisation

    threshold = cfg.evaluate.memorisation_threshold
    copies = memorisation(ref.train[:n], ref.train, ref.novelty_unit, threshold).share
    unseen = float((ref.holdout_nearest / ref.novelty_unit < threshold).float().mean())  # as Memorisation.share
    return {"train_copies_flagged": round(copies, 6), "unseen_real_flagged": round(unseen, 6)}


def ladder_size(cfg: Params, ref: Reference) -> int:
    """Real images per rung: as many as the larger of the holdout and the evaluation's samples, so the
    floor is read at the size the samples are judged at, but at most `evaluate.calibration.max_images`.

    The cap bounds the ladder's cost and memory on large corpora (at 1M images the holdout alone is
    100k; a 50,000-image ladder took 17 minutes and 1.9 GB on 2 cores). An evaluation with more samples
    than the ladder is placed on it by `at_ladder_size`."""
    return min(len(ref.train), max(len(ref.holdout), cfg.evaluate.n_samples), cfg.evaluate.calibration.max_images)


def calibration_key(cfg: Params, ref: Reference) -> str:
    c, e = cfg.evaluate.calibration, cfg.evaluate
    parts = [VERSION, ref.key, c.bootstrap, c.seed, e.kid_subset_size, e.pr_neighbourhood, e.seed,
             e.memorisation_threshold, sorted(degrade.LADDERS.items()), ladder_size(cfg, ref)]
    return sha256_bytes("|".join(map(str, parts)).encode())[:20]


def load_or_compute(cfg: Params, ws: Workspace, extractor: Extractor, ref: Reference,
                    train_set: ImageSet) -> Calibration:
    """The calibration of this data version and extractor: cached beside the reference statistics."""
    key = calibration_key(cfg, ref)
    path = ws.judge_cache / "reference" / f"calibration-{key}.json"
    if path.exists():
        try:
            cal = Calibration(**json.loads(path.read_text()))
            log.info("calibration: cached (%s)", key[:8])
            return cal
        except (TypeError, ValueError):
            log.warning("calibration: %s is unreadable; recomputing it", path)
    cal = compute(cfg, extractor, ref, train_set, key)
    write_text_atomic(path, json.dumps(cal.as_dict()))
    log.info("calibration: %d rungs on %d real images in %.1f s", sum(map(len, cal.ladders.values())), cal.n,
             cal.seconds)
    return cal


def table(cal: Calibration) -> list[dict[str, Any]]:
    """One row per (judge, ladder, rung), the floor as level 0: reports/calibration.csv and MLflow."""
    rows = []
    for metric in cal.floor:
        for ladder, rungs in cal.ladders.items():
            rows.append({"metric": metric, "ladder": ladder, "rung": 0, "level": 0.0, "value": cal.floor[metric],
                         "noise": cal.noise[metric]})
            for i, r in enumerate(rungs, 1):
                rows.append({"metric": metric, "ladder": ladder, "rung": i, "level": r["level"],
                             "value": r["values"][metric], "noise": cal.noise[metric]})
    return rows




def choose_gate_metric(cfg: Params, cal: Calibration | None) -> tuple[str, str]:
    """The gate's metric for this data and extractor, and why: the configured one when it passes
    the ladder checks, else (or with `auto`) the first of GATE_PREFERENCE that does."""
    wanted = cfg.registry.metric
    if cal is None:
        metric = "fid" if wanted == "auto" else wanted
        return metric, f"register.metric={wanted}; unchecked: evaluate.calibration.enabled is false"
    refused = ""
    if wanted != "auto":
        ready, why = cal.gate_ready(wanted)
        if ready:
            return wanted, f"register.metric={wanted}: {why}"
        refused = f"register.metric={wanted} refused ({why}); "
    for metric in GATE_PREFERENCE:
        ready, why = cal.gate_ready(metric)
        if ready:
            return metric, f"{refused}{metric}: the first of {', '.join(GATE_PREFERENCE)} that passes: {why}"
    def flagged(m: str) -> int:
        return sum(ladder in GATE_LADDERS for ladder in cal.flags.get(m, {}))

    metric = min(GATE_PREFERENCE, key=flagged)
    return metric, (f"{refused}no metric passes every ladder check on this data; {metric} fails the fewest "
                    f"({cal.gate_ready(metric)[1]})")
