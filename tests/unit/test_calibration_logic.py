"""The calibration ladder's reading of numbers: checks, positions, the gate metric's choice, and
the degradations themselves."""

from __future__ import annotations

import pytest
import torch

from genloop.core.config import load_params
from genloop.eval import degrade
from genloop.eval.calibration import (
    Calibration,
    at_ladder_size,
    calibration_key,
    choose_gate_metric,
    ladder_flags,
    ladder_size,
)
from genloop.eval.calibration_report import readable
from genloop.eval.metrics import FidAgainst
from genloop.eval.reference import Reference


def _cal(flags: dict[str, dict[str, str]] | None = None) -> Calibration:
    """A ladder where FID grows 1 -> 16 along blur, AUC saturates at 1.0, recall falls with mode drop."""
    values = {
        "blur": [(0.5, 2.0, 0.7, 0.9), (1.0, 4.0, 0.9, 0.8), (2.0, 8.0, 1.0, 0.6), (4.0, 16.0, 1.0, 0.5)],
        "mode_drop": [(0.5, 3.0, 0.6, 0.6), (0.9, 9.0, 0.8, 0.2)],
    }
    ladders = {name: [{"level": lvl, "values": {"fid": f, "c2st_auc": a, "recall": r, "kid_mean": f / 10}}
                      for lvl, f, a, r in rungs] for name, rungs in values.items()}
    return Calibration(key="k", extractor="test", n=100, floor={"fid": 1.0, "c2st_auc": 0.5, "recall": 1.0,
                                                                 "kid_mean": 0.1},
                       noise={"fid": 0.2, "c2st_auc": 0.05, "recall": 0.05, "kid_mean": 0.05}, ladders=ladders,
                       flags=flags or {}, memorisation={}, seconds=0.0)


def test_ladder_flags_accept_a_rising_ladder_and_name_what_is_wrong_otherwise():
    assert ladder_flags("fid", 1.0, [2.0, 4.0, 8.0], noise=0.5, higher_is_worse=True) is None
    assert ladder_flags("recall", 1.0, [0.8, 0.5, 0.1], noise=0.05, higher_is_worse=False) is None
    reversed_ = ladder_flags("fid", 1.0, [4.0, 2.0, 8.0], noise=0.5, higher_is_worse=True)
    assert reversed_ is not None and reversed_.startswith("not monotone: rung 2")
    flat = ladder_flags("fid", 1.0, [1.1, 1.2, 1.3], noise=0.5, higher_is_worse=True)
    assert flat is not None and flat.startswith("steps smaller than its noise: 0 of 3")
    # a small wobble within the noise is not a reversal
    assert ladder_flags("fid", 1.0, [3.0, 2.8, 6.0, 9.0], noise=0.5, higher_is_worse=True) is None


def test_positions_read_a_value_as_a_degradation_of_real_images():
    cal = _cal()
    assert cal.position("fid", 6.0)["blur"]["level"] == pytest.approx(1.5)  # halfway from 4 (r=1) to 8 (r=2)
    assert cal.headline("fid", 6.0) == "fid 6 ≈ real images blurred with radius 1.5"
    assert cal.position("fid", 1.1)["blur"]["text"].startswith("within the noise of real images")
    beyond = cal.position("fid", 40.0)["blur"]
    assert beyond["level"] is None and beyond["text"].startswith("beyond the end of the blur ladder")
    # lower-is-worse judges read the other way
    assert cal.position("recall", 0.4)["mode_drop"]["level"] == pytest.approx(0.5 + 0.4 * 0.5)
    # a judge at its ceiling says so instead of pretending to a level
    assert "saturates" in cal.position("c2st_auc", 1.0)["blur"]["text"]


def test_the_gate_metric_is_the_first_that_passes_and_a_refused_one_says_why():
    cfg = load_params(None, [])
    assert choose_gate_metric(cfg, _cal())[0] == "fid"
    cal = _cal({"fid": {"mode_drop": "not monotone: rung 2 reads better"}})
    metric, why = choose_gate_metric(cfg, cal)
    assert metric == "c2st_auc" and "first of fid, c2st_auc, kid_mean that passes" in why
    metric, why = choose_gate_metric(load_params(None, ["register.metric=fid"]), cal)
    assert metric == "c2st_auc" and why.startswith("register.metric=fid refused (mode_drop: not monotone")
    # a flag on a ladder generators do not fail along (JPEG) does not refuse a metric
    assert choose_gate_metric(cfg, _cal({"fid": {"jpeg": "steps smaller than its noise"}}))[0] == "fid"
    assert choose_gate_metric(load_params(None, ["register.metric=kid_mean"]), None)[0] == "kid_mean"


def test_the_ladder_is_capped_and_a_larger_evaluation_is_placed_on_it_at_the_ladders_size():
    gen = torch.Generator().manual_seed(0)
    holdout, train = torch.randn(300, 8, generator=gen), torch.randn(2000, 8, generator=gen)
    ref = Reference("r", holdout, train, torch.ones(300), [str(i) for i in range(2000)], 1.0, {}, cached=False)
    uncapped = load_params(None, ["evaluate.n_samples=1000"])
    cfg = load_params(None, ["evaluate.n_samples=1000", "evaluate.calibration.max_images=400"])
    assert ladder_size(uncapped, ref) == 1000  # the larger of the holdout (300) and the samples
    assert ladder_size(load_params(None, ["evaluate.n_samples=100"]), ref) == 300
    assert ladder_size(cfg, ref) == 400
    assert calibration_key(cfg, ref) != calibration_key(uncapped, ref)  # a capped ladder is another ladder
    cal = Calibration(**{**_cal().as_dict(), "n": 400})
    samples = torch.randn(1000, 8, generator=gen) + 0.5
    own = {"fid": FidAgainst(holdout)(samples)}
    assert at_ladder_size(cfg, cal, ref, samples[:400], own) == (own, 400)  # at most the ladder's size: as judged
    placed, judged = at_ladder_size(cfg, cal, ref, samples, own)
    assert judged == 400
    assert placed["fid"] == pytest.approx(FidAgainst(holdout)(samples[:400]))
    assert placed["fid"] != pytest.approx(own["fid"], rel=1e-3)
    assert set(placed) >= {"fid", "kid_mean", "c2st_auc", "recall", "coverage", "curation_score"}
    lines = readable(cal, placed, "fid", judged)
    assert lines and all(line.endswith("(on the first 400 samples, the ladder's size)") for line in lines)


def test_degradations_do_what_their_names_say():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 16, 16), generator=gen, dtype=torch.uint8)
    roughness = [float((degrade.blur(images, r).float().diff(dim=-1).abs()).mean()) for r in (0.5, 1, 2, 4)]
    assert roughness == sorted(roughness, reverse=True)  # more blur, smoother images
    errors = [float((degrade.jpeg(images, q).float() - images.float()).abs().mean()) for q in (50, 20, 5)]
    assert errors == sorted(errors)  # lower quality, further from the original
    greyed = degrade.grey(images, 1.0).float()
    assert float((greyed.max(dim=1).values - greyed.min(dim=1).values).max()) <= 1.0  # no colour left
    dropped = degrade.drop_modes(images, 0.5, seed=0)
    assert dropped.shape == images.shape and len(torch.unique(dropped.flatten(1), dim=0)) == 3
    assert torch.equal(degrade.apply(images, "noise", 0.0), images)
    with pytest.raises(ValueError, match="unknown ladder 'sharpen'"):
        degrade.apply(images, "sharpen", 1.0)
    assert "grey" not in degrade.ladders_for(1) and "grey" in degrade.ladders_for(3)


def test_the_c2st_can_gate_a_pair_and_the_collapse_guard_allows_for_two_noisy_sets():
    from genloop.eval.gate import diversity_loss, paired_bootstrap

    gen = torch.Generator().manual_seed(0)
    real, bank = torch.randn(200, 8, generator=gen), torch.randn(400, 8, generator=gen)
    close, off = torch.randn(200, 8, generator=gen), torch.randn(200, 8, generator=gen) * 1.6 + 0.5
    better = paired_bootstrap("c2st_auc", real, close, off, resamples=200, confidence=0.9, seed=0, bank=bank)
    assert better.resamples == 50 and better.delta_low > 0.1  # capped: each resample trains two discriminators
    assert 0.35 < better.challenger < 0.65 and better.champion > 0.8
    noise = {"recall": 0.05, "coverage": 0.05}
    assert diversity_loss({"recall": 0.82, "coverage": 0.8}, {"recall": 0.88, "coverage": 0.8}, noise) is None
    why = diversity_loss({"recall": 0.7, "coverage": 0.8}, {"recall": 0.88, "coverage": 0.8}, noise)
    assert why is not None and why.startswith("collapse guard: recall fell from 0.880 (champion) to 0.700")


def test_the_c2st_scores_each_image_with_a_discriminator_that_never_saw_it():
    from genloop.eval.c2st import cross_fitted_realism

    gen = torch.Generator().manual_seed(1)
    real = torch.randn(300, 6, generator=gen)
    batch = torch.cat([torch.randn(100, 6, generator=gen), torch.randn(100, 6, generator=gen) * 2.5 + 1.0])
    p_real = cross_fitted_realism(real, batch, seed=0)
    assert p_real.shape == (200,) and float(p_real.min()) >= 0 and float(p_real.max()) <= 1
    assert float(p_real[:100].mean()) > float(p_real[100:].mean()) + 0.3  # real-like images rank above the rest
    with pytest.raises(ValueError, match="at least 4 generated"):
        cross_fitted_realism(real, batch[:3], seed=0)


def test_precision_recall_density_coverage_match_prdc():
    from prdc import compute_prdc

    from genloop.eval.metrics import precision_recall

    gen = torch.Generator().manual_seed(2)
    real, fake = torch.randn(700, 5, generator=gen), torch.randn(700, 5, generator=gen) * 1.3 + 0.2
    ours = precision_recall(real, fake, 3, chunk=256)  # three chunks of real rows
    theirs = compute_prdc(real.numpy(), fake.numpy(), nearest_k=3)
    for name in ("precision", "recall", "density", "coverage"):
        assert ours[name] == pytest.approx(float(theirs[name]), abs=2e-3), name
    assert 0.3 < ours["precision"] < 0.95 and ours["pr_samples"] == 700


def test_noise_and_the_grey_shift_work_block_by_block_to_the_same_kind_of_result(monkeypatch):
    """A large rung is degraded BLOCK images at a time (at 50k RGB images the whole-set float copies
    took 2 GB): the grey shift gives the same pixels, the noise the same spread, drawn reproducibly."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(60, 196, (50, 3, 8, 8), generator=gen, dtype=torch.uint8)
    whole_grey, whole_noise = degrade.grey(images, 0.5), degrade.noise(images, 20.0, seed=4)
    monkeypatch.setattr(degrade, "BLOCK", 7)  # 8 blocks, the last one short
    assert torch.equal(degrade.grey(images, 0.5), whole_grey)
    blocked = degrade.noise(images, 20.0, seed=4)
    assert torch.equal(blocked, degrade.noise(images, 20.0, seed=4)) and not torch.equal(blocked, images)
    spread = [float((n.float() - images.float()).std()) for n in (blocked, whole_noise)]
    assert spread == pytest.approx([20.0, 20.0], rel=0.05)
