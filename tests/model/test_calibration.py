"""The judges on known answers, on grey digits (MNIST) and colour emoji (Noto Color Emoji):
the calibration ladder is monotone for the gate metric and the curation score, a light blur
is told from real beyond the noise, the C2ST reads 0.5 for real against real and ~1 for noise,
the gate refuses a champion's own samples blurred, and the collapse guard stops a loop that
feeds on its own curated output."""

from __future__ import annotations

import pytest
import torch

from genloop.core.config import load_params
from genloop.core.workspace import Workspace
from genloop.eval import calibration, degrade
from genloop.eval.c2st import c2st
from genloop.eval.extractors import embed, get_extractor
from genloop.eval.gate import decide, diversity_loss, paired_bootstrap
from genloop.eval.generator_eval import evaluate_generator
from genloop.eval.realism import RealismScorer
from genloop.eval.reference import load_reference
from genloop.stages import clean, collect
from tests.colour_corpus import emoji_folder

COMMON = ["collect.dvc_add=false", "evaluate.n_samples=300", "evaluate.kid_subset_size=50",
          "evaluate.calibration.bootstrap=10", "register.gate.bootstrap=40", "register.gate.max_memorised_share=1.0"]
CORPORA = {
    "mnist": ["collect.sources=[{uri: 'builtin:mnist', limit: 1200}]", "data.holdout_fraction=0.3"],
    "emoji": ["data.mode=RGB", "data.holdout_fraction=0.3"],
}


@pytest.fixture(scope="module", params=sorted(CORPORA))
def judged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A cleaned corpus, its extractor, reference statistics and calibration ladder."""
    root = tmp_path_factory.mktemp(f"cal-{request.param}")
    overrides = COMMON + CORPORA[request.param]
    if request.param == "emoji":
        folder = emoji_folder(root, n=900, size=32)
        overrides.append(f"collect.sources=[{{uri: '{folder}', labels: none}}]")
    ws = Workspace.at(root / "ws")
    cfg = load_params(None, overrides)
    collect.run(cfg, ws)
    clean.run(cfg, ws)
    extractor = get_extractor(cfg, ws)
    ref, train_set = load_reference(cfg, ws, extractor)
    cal = calibration.load_or_compute(cfg, ws, extractor, ref, train_set)
    return ws, cfg, extractor, ref, train_set, cal


def test_the_gate_metric_and_the_curation_score_are_monotone_along_the_ladders(judged):
    *_, cal = judged
    metric, why = calibration.choose_gate_metric(load_params(None, []), cal)
    assert cal.gate_ready(metric)[0], why  # some judge passes every check on this corpus
    for ladder in cal.ladders:
        assert "not monotone" not in cal.flags.get(metric, {}).get(ladder, ""), (metric, ladder, cal.flags)
    # the curation score orders real above light above heavy degradations (repeats stay realistic)
    for ladder in ("blur", "noise", "jpeg"):
        assert "not monotone" not in cal.flags.get("curation_score", {}).get(ladder, ""), cal.flags
    heavy = cal.ladders["blur"][-1]["values"]["curation_score"]
    assert cal.floor["curation_score"] - heavy > 2 * cal.noise["curation_score"]


def test_blur_radius_one_is_told_from_real_beyond_the_noise(judged):
    *_, cal = judged
    metric, _ = calibration.choose_gate_metric(load_params(None, []), cal)
    radius_one = next(r for r in cal.ladders["blur"] if r["level"] == 1.0)["values"][metric]
    assert cal.worse(metric, radius_one, cal.floor[metric]) > cal.noise[metric]
    place = cal.position(metric, radius_one)["blur"]
    assert place["level"] == pytest.approx(1.0, abs=0.01), place  # the ladder reads its own rung back


def test_c2st_reads_half_for_real_against_real_and_one_for_noise(judged):
    ws, cfg, extractor, ref, train_set, cal = judged
    n = cal.n
    real = c2st(ref.train[n:], ref.holdout, ref.train[:n], seed=0)
    assert real.auc_low < 0.5 < real.auc_high or abs(real.auc - 0.5) < 0.08, real.as_metrics()
    gen = torch.Generator().manual_seed(0)
    noise_images = torch.randint(0, 256, train_set.images[:n].shape, generator=gen, dtype=torch.uint8)
    noise = c2st(ref.train[n:], ref.holdout, embed(extractor.module, noise_images), seed=0)
    assert noise.auc > 0.95, noise.as_metrics()


def _real_sampler(images: torch.Tensor, blur_radius: float = 0.0, offset: int = 0):
    """A 'generator' that draws from a pool of real images with replacement (optionally blurred):
    uint8 NHWC. A small pool behaves like a collapsed generator: the same few images again."""
    def sampler(n: int, seed: int):
        idx = torch.randint(len(images), (n,), generator=torch.Generator().manual_seed(seed + offset))
        out = images[idx]
        out = degrade.blur(out, blur_radius) if blur_radius else out
        return out.permute(0, 2, 3, 1).numpy()
    return sampler


def test_the_gate_refuses_the_champion_with_blurred_outputs(judged):
    ws, cfg, extractor, ref, train_set, cal = judged
    metric, _ = calibration.choose_gate_metric(cfg, cal)
    champion = evaluate_generator(cfg, ws, _real_sampler(train_set.images), "real-champion", extractor, ref)
    blurred = evaluate_generator(cfg, ws, _real_sampler(train_set.images, 1.0), "blurred-champion", extractor, ref)
    g = cfg.registry.gate
    comparison = paired_bootstrap(metric, ref.holdout, blurred.features, champion.features, resamples=g.bootstrap,
                                  confidence=g.confidence, seed=0, kid_subset=50, bank=ref.train)
    assert comparison.delta_high < 0, comparison  # the whole interval says the blurred outputs are worse
    passed, reason = decide(cfg, blurred, comparison, champion, cal.noise)
    assert not passed, reason
    # and the other way round, the sharp images replace the blurred ones
    back = paired_bootstrap(metric, ref.holdout, champion.features, blurred.features, resamples=g.bootstrap,
                            confidence=g.confidence, seed=0, kid_subset=50, bank=ref.train)
    assert decide(cfg, champion, back, blurred, cal.noise)[0]


def test_collapse_guard_stops_a_loop_that_accepts_its_own_curated_batches(judged):
    """Each iteration 'trains' on what the last one accepted (a generator that redraws its accepted
    pool), curation keeps the quarter that scores best, reviewers accept all of it: diversity
    shrinks, and the gate refuses once recall or coverage falls by more than its noise."""
    ws, cfg, extractor, ref, train_set, cal = judged
    scorer = RealismScorer(ref.train, ref.holdout, k=cfg.evaluate.pr_neighbourhood)
    pool = train_set.images
    champion = first = evaluate_generator(cfg, ws, _real_sampler(pool), "pool-0", extractor, ref)
    decisions = []
    for iteration in range(1, 4):
        scores = scorer(embed(extractor.module, pool))
        pool = pool[torch.argsort(scores, descending=True)[: max(8, len(pool) // 4)]]
        challenger = evaluate_generator(cfg, ws, _real_sampler(pool), f"pool-{iteration}", extractor, ref)
        comparison = paired_bootstrap("fid", ref.holdout, challenger.features, champion.features, resamples=20,
                                      confidence=0.95, seed=0)
        decisions.append(decide(cfg, challenger, comparison, champion, cal.noise))
        if decisions[-1][0]:
            champion = challenger
    refused = [reason for passed, reason in decisions if not passed and reason.startswith("collapse guard")]
    assert refused, decisions
    # and a fresh draw from the same real pool is not mistaken for a collapse
    again = evaluate_generator(cfg, ws, _real_sampler(train_set.images, offset=1), "pool-0-again", extractor, ref)
    assert diversity_loss(again.metrics, first.metrics, cal.noise) is None
