"""Evaluation you can trust: metrics on controlled inputs, the reference-statistics cache,
memorisation detection, the noise-aware gate and rollback of the champion alias."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from genloop.core.config import load_params
from genloop.core.dataset import load_split, to_unit
from genloop.core.errors import GenloopError
from genloop.core.manifest import corpus_mode
from genloop.core.workspace import Workspace
from genloop.eval.diversity import diversity_metrics
from genloop.eval.extractors import embed, embed_with_logits, get_extractor, to_nchw_uint8
from genloop.eval.gate import decide, paired_bootstrap
from genloop.eval.generator_eval import GeneratorEval
from genloop.eval.metrics import FidAgainst, memorisation, suite
from genloop.eval.reference import load_reference
from genloop.mlops import aliases, tracking
from genloop.models import family, sample
from genloop.stages import clean, collect, train
from tests.helpers import BIN, ROOT, cli_env, run_cli

SETTINGS = [
    "collect.sources=[{uri: 'builtin:mnist', limit: 1200}]",
    "collect.dvc_add=false",
    "data.holdout_fraction=0.3",
    "evaluate.extractor_epochs=8",
    "evaluate.n_samples=300",
    "evaluate.kid_subset_size=50",
]


@pytest.fixture(scope="module")
def data_ws(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A workspace with 1,200 real digits collected and cleaned, and its trained extractor."""
    ws = Workspace.at(tmp_path_factory.mktemp("evalws"))
    cfg = load_params(None, SETTINGS)
    collect.run(cfg, ws)
    clean.run(cfg, ws)
    return ws, cfg, get_extractor(cfg, ws)


def _scores(cfg, real, fake_images, extractor):
    feats, logits = embed_with_logits(extractor.module, fake_images)
    return suite(real, feats, logits, kid_subset_size=50, is_splits=5, pr_neighbourhood=3, seed=0)


def test_metrics_rank_real_above_shifted_above_noise(data_ws):
    ws, cfg, extractor = data_ws
    holdout = load_split(ws, "holdout").images
    train = load_split(ws, "train").images
    real = embed(extractor.module, holdout)
    n = len(holdout)
    other_real = train[:n]
    shifted = torch.roll(other_real, shifts=(5, 5), dims=(2, 3))  # digits pushed off-centre
    noise = torch.randint(0, 256, other_real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    s_real, s_shift, s_noise = (_scores(cfg, real, x, extractor) for x in (other_real, shifted, noise))
    assert s_real["fid"] < s_shift["fid"] < s_noise["fid"]
    assert s_real["fid"] * 10 < s_noise["fid"]
    assert s_real["kid_mean"] < s_shift["kid_mean"] < s_noise["kid_mean"]
    assert s_real["precision"] > 0.5 and s_real["recall"] > 0.5
    # noise covers none of the real digits. Precision is not asserted for noise: all noise images
    # land on one point of feature space, and a real outlier's wide k-NN ball can swallow it (seen:
    # noise precision 0.0, 0.46 and 0.99 with extractors trained from the same seed), the weakness
    # of precision/recall that density/coverage (also reported) were designed to fix
    assert s_noise["recall"] < 0.05 and s_noise["coverage"] < 0.05
    assert s_real["precision"] > s_shift["precision"]
    assert s_real["coverage"] > s_shift["coverage"] > s_noise["coverage"]
    # the classifier is confident and spreads its classes over real digits only
    assert s_real["inception_score"] > s_shift["inception_score"] > s_noise["inception_score"]
    assert s_real["inception_score"] > 4 and s_noise["inception_score"] < 2


def test_reference_statistics_are_cached_by_data_version_not_by_path(data_ws, tmp_path):
    ws, cfg, extractor = data_ws
    first, _ = load_reference(cfg, ws, extractor)
    again, _ = load_reference(cfg, ws, extractor)
    assert again.cached and again.key == first.key
    assert torch.equal(again.holdout, first.holdout)
    # the same data somewhere else: the same key, a hit (the key names content, not paths)
    moved = Workspace.at(tmp_path / "moved")
    shutil.copytree(ws.root, moved.root)
    elsewhere, _ = load_reference(cfg, moved, extractor)
    assert elsewhere.cached and elsewhere.key == first.key
    # a new data version (data.dvc records another md5): a miss, a new key
    moved.data_dvc.write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data/raw\n")
    new_version, _ = load_reference(cfg, moved, extractor)
    assert not new_version.cached and new_version.key != first.key
    # and a different sample count is another entry too
    bigger, _ = load_reference(load_params(None, [*SETTINGS, "evaluate.n_samples=500"]), moved, extractor)
    assert not bigger.cached and bigger.key != new_version.key


def test_the_domain_extractor_trained_twice_on_one_data_version_is_the_same(data_ws, tmp_path):
    ws, _, _ = data_ws
    cfg = load_params(None, [*SETTINGS, "evaluate.extractor=domain", "evaluate.extractor_epochs=1"])
    holdout = load_split(ws, "holdout").images[:64]
    features = []
    for attempt, process_state in (("first", 1), ("second", 2)):  # fresh workspaces: no cached extractor
        copy_ws = Workspace.at(tmp_path / attempt)
        shutil.copytree(ws.root, copy_ws.root)
        shutil.rmtree(copy_ws.judge_cache, ignore_errors=True)
        torch.manual_seed(process_state)  # as two processes would start: whatever ran before differs
        features.append(embed(get_extractor(cfg, copy_ws).module, holdout))
    assert torch.equal(features[0], features[1])


def test_the_domain_extractor_learns_from_at_most_extractor_max_images_in_memory_or_streamed(data_ws, tmp_path):
    """evaluate.extractor_max_images: a larger train split gives the extractor a seeded subsample
    (its training time stays flat as the corpus grows); streamed from the shards, the same one."""
    ws, _, _ = data_ws
    capped = [*SETTINGS, "evaluate.extractor=domain", "evaluate.extractor_epochs=1",
              "evaluate.extractor_max_images=100"]
    holdout = load_split(ws, "holdout").images[:64]
    runs = []
    for name, budget in (("memory", "1"), ("streamed", "0")):
        copy_ws = Workspace.at(tmp_path / name)
        shutil.copytree(ws.root, copy_ws.root)
        shutil.rmtree(copy_ws.judge_cache, ignore_errors=True)
        extractor = get_extractor(load_params(None, [*capped, f"evaluate.memory_budget_gb={budget}"]), copy_ws)
        meta = json.loads(extractor.path.with_suffix(".json").read_text())
        runs.append((meta["train_images"], embed(extractor.module, holdout)))
    assert runs[0][0] == runs[1][0] == 100 < len(load_split(ws, "train"))
    assert torch.equal(runs[0][1], runs[1][1])  # the same extractor (its file hash names the temp file it was saved as)


def test_judges_reading_the_splits_from_their_shards_give_the_numbers_they_give_in_memory(data_ws, tmp_path,
                                                                                         monkeypatch):
    """evaluate.memory_budget_gb=0: the judges read every split batch by batch from data/clean's
    shards instead of holding it, and their numbers are the same."""
    ws, cfg, _ = data_ws
    # in this process: the same torch threads as the resident run, so the same bits (the other
    # engines embed to float rounding alike: tests/integration/test_embed_parallel.py)
    streamed_cfg = load_params(None, [*SETTINGS, "evaluate.memory_budget_gb=0", "parallel.engine=serial"])
    assert not isinstance(load_split(ws, "train", memory_budget_gb=0).images, torch.Tensor)
    runs = {}
    for name, settings in (("resident", cfg), ("streamed", streamed_cfg)):
        monkeypatch.setenv("GENLOOP_JUDGE_CACHE", str(tmp_path / name))  # nothing cached: every judge computed
        extractor = get_extractor(settings, ws)
        ref, train_set = load_reference(settings, ws, extractor)
        fake = load_split(ws, "holdout").images[:100]
        fake_feats = embed(extractor.module, fake)
        classes = (torch.arange(100) % 10, [str(c) for c in range(10)])
        runs[name] = (ref, diversity_metrics(ws, ref.train, fake_feats, fake, classes,
                                             memory_budget_gb=settings.evaluate.memory_budget_gb), train_set)
    (ref_a, div_a, set_a), (ref_b, div_b, set_b) = runs["resident"], runs["streamed"]
    assert isinstance(set_a.images, torch.Tensor) and not isinstance(set_b.images, torch.Tensor)
    assert torch.equal(ref_a.holdout, ref_b.holdout) and torch.equal(ref_a.train, ref_b.train)
    assert ref_a.floor == ref_b.floor and ref_a.novelty_unit == ref_b.novelty_unit
    assert div_a == div_b and div_a["class_diversity"] is not None
    idx = torch.tensor([3, 0, 7])  # the memorisation grid indexes the train split this way
    assert torch.equal(set_a.images[idx], set_b.images[idx])


def test_memorisation_flags_copied_training_images(data_ws):
    ws, cfg, extractor = data_ws
    ref, train_set = load_reference(cfg, ws, extractor)
    holdout = load_split(ws, "holdout").images
    copies = train_set.images[:30]
    fake = torch.cat([copies, holdout[:120]])  # 30 copies among 150 samples = 20%
    mem = memorisation(embed(extractor.module, fake), ref.train, ref.novelty_unit, 0.15)
    assert mem.memorised[:30].all()
    assert mem.nearest_index[:30].tolist() == list(range(30))  # each copy found its original
    assert 0.2 <= mem.share < 0.3  # fresh real digits are (almost) never flagged
    # and the gate refuses such a challenger even with no champion to beat
    fake_eval = GeneratorEval("x", fake, embed(extractor.module, fake), None, {}, mem, 0, cached=False)
    passed, reason = decide(cfg, fake_eval, None)
    assert not passed and "memorisation" in reason and "20.0%" in reason


def _gaussians(shift: float, n: int = 400, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)) + shift


def _eval(features: torch.Tensor) -> GeneratorEval:
    mem = memorisation(features, _gaussians(0.0, seed=99), 1.0, 0.0)  # threshold 0: nothing memorised
    return GeneratorEval("x", torch.zeros(0), features, None, {}, mem, 0, cached=False)


@pytest.mark.parametrize(("challenger_shift", "promoted"), [(0.05, True), (0.6, False), (0.5, False)])
def test_gate_promotes_only_a_clear_improvement(challenger_shift, promoted):
    cfg = load_params(None, ["register.gate.bootstrap=60"])
    real, champion = _gaussians(0.0, seed=1), _gaussians(0.5, seed=2)
    # the same noise moved by another shift: a paired sample set, like two models fed the same seeds
    challenger = _gaussians(challenger_shift, seed=2)
    comparison = paired_bootstrap("fid", real, challenger, champion, resamples=60, confidence=0.95, seed=0)
    passed, reason = decide(cfg, _eval(challenger), comparison)
    assert passed is promoted, reason


def test_gate_sees_no_improvement_in_a_challenger_identical_to_the_champion():
    cfg = load_params(None, ["register.gate.bootstrap=60"])
    real, champion = _gaussians(0.0, seed=1), _gaussians(0.5, seed=2)
    comparison = paired_bootstrap("fid", real, _gaussians(0.5, seed=2), champion, resamples=60, confidence=0.95,
                                  seed=0)
    assert comparison.delta == pytest.approx(0.0, abs=1e-9)
    assert comparison.delta_low <= 0 <= comparison.delta_high
    passed, reason = decide(cfg, _eval(champion), comparison)
    assert not passed and "is not better than the champion's" in reason


def test_gate_keeps_the_margin_the_user_asked_for():
    """A clear improvement (its whole interval above 0) that does not clear register.gate.min_improvement."""
    real, champion = _gaussians(0.0, seed=1), _gaussians(0.3, seed=2)
    challenger = _gaussians(0.25, seed=2)
    comparison = paired_bootstrap("fid", real, challenger, champion, resamples=60, confidence=0.95, seed=0)
    assert 0 < comparison.delta_low < comparison.delta < comparison.delta_high
    assert decide(load_params(None, []), _eval(challenger), comparison)[0] is True  # no margin: promoted
    margin = load_params(None, [f"register.gate.min_improvement={comparison.delta_high + 0.01}"])
    passed, reason = decide(margin, _eval(challenger), comparison)
    assert not passed and "within the noise" in reason


@pytest.fixture(scope="module")
def noisy_pair(data_ws) -> tuple:
    """Two generators whose FIDs differ by sampling noise alone: a small VAE trained for two epochs
    on the digits, and the same weights with the sign of the latent input flipped. G(-z) draws the
    same images in law as G(z) (z ~ N(0, I) is symmetric) but another image from every seed, as a
    second model of equal quality does. Returns the gate's view of each: features of
    evaluate.n_samples images drawn from evaluate.seed, and their memorisation."""
    ws, cfg, extractor = data_ws
    ref, _ = load_reference(cfg, ws, extractor)
    data = load_split(ws, "train")
    vae = load_params(None, [*SETTINGS, "model.family=vae", "model.vae.latent_dim=8", "model.vae.width=8"])
    spec = train._spec(vae, data, corpus_mode(ws.manifest))
    torch.manual_seed(0)
    trainer = family("vae").Trainer(spec, vae.train.lr, vae.train.beta1, torch.device("cpu"))
    order = torch.Generator().manual_seed(0)
    for _ in range(2):
        perm = torch.randperm(len(data), generator=order)
        for i in range(0, len(data) - 31, 32):
            idx = perm[i: i + 32]
            trainer.step(to_unit(data.images[idx]), data.labels[idx], contextlib.nullcontext)
    generator = trainer.generator.eval()
    flipped = copy.deepcopy(generator)
    with torch.no_grad():  # the projection's first latent_dim input channels take z; the rest, the class code
        flipped.project[0].weight[: spec.hparams["latent_dim"]].neg_()
    e = cfg.evaluate
    evals = []
    for gen in (generator, flipped):
        features = embed(extractor.module, to_nchw_uint8(sample(gen, spec, e.n_samples, e.seed)))
        mem = memorisation(features, ref.train, ref.novelty_unit, e.memorisation_threshold)
        evals.append(GeneratorEval("x", torch.zeros(0), features, None, {}, mem, e.seed, cached=False))
    return ref, evals


def test_gate_holds_back_a_challenger_whose_lead_is_within_the_noise(data_ws, noisy_pair):
    """The better-scoring of the noisy pair, as the challenger against the other, with the default
    gate (no margin): its lead is a sliver of either FID's own bootstrap spread, the interval of the
    improvement reaches below 0, and the gate says it is within the noise."""
    _, cfg, _ = data_ws
    ref, evals = noisy_pair
    g = cfg.registry.gate
    assert g.min_improvement == 0
    fid = FidAgainst(ref.holdout)
    champion, challenger = sorted(evals, key=lambda ev: fid(ev.features), reverse=True)
    comparison = paired_bootstrap("fid", ref.holdout, challenger.features, champion.features, resamples=g.bootstrap,
                                  confidence=g.confidence, seed=g.seed)
    assert comparison.challenger < comparison.champion
    spread = min(hi - lo for lo, hi in (comparison.challenger_interval, comparison.champion_interval))
    assert 0 < comparison.delta < 0.25 * spread  # the FIDs differ by far less than their own noise
    assert comparison.delta_low < 0 < comparison.delta < comparison.delta_high
    assert challenger.memorisation.share <= g.max_memorised_share  # not refused for memorising
    passed, reason = decide(cfg, challenger, comparison)
    assert not passed and "is within the noise" in reason, reason


def _alias(client: MlflowClient, name: str, alias: str) -> str:
    return str(client.get_model_version_by_alias(name, alias).version)


@pytest.fixture
def registry_with_history(tmp_path, monkeypatch):
    """A real MLflow registry (sqlite) with three versions: v1 and v2 passed the gate, v3 did not."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient()
    name = "gen"
    client.create_registered_model(name)
    for v, passed in ((1, True), (2, True), (3, False)):
        client.create_model_version(name, source=str(tmp_path / f"model{v}"))
        tracking.tag_version(name, v, {aliases.PASSED_TAG: passed, "genloop.gate.reason": f"decision {v}"})
        tracking.set_alias(name, "challenger", v)
        if passed:
            aliases.promote(name, str(v), f"gate passed for v{v}")
    yield name, client, uri
    os.environ.pop("MLFLOW_REGISTRY_URI", None)


def test_rollback_moves_champion_back_and_records_who_when_why(registry_with_history):
    name, client, _ = registry_with_history
    assert _alias(client, name, "champion") == "2"
    assert _alias(client, name, "previous-champion") == "1"
    out = aliases.rollback(name, reason="v2 draws smudges")
    assert out["champion_before"] == "2" and out["champion"] == "1"
    assert _alias(client, name, "champion") == "1"
    tags = client.get_model_version(name, "1").tags
    assert tags["genloop.rollback.why"] == "v2 draws smudges" and tags["genloop.rollback.from"] == "2"
    assert tags["genloop.rollback.by"] and tags["genloop.rollback.at"].endswith("Z")
    assert client.get_model_version(name, "2").tags["genloop.rolled_back_to"] == "1"
    history = aliases.champion_history(name)
    assert [h["version"] for h in history] == ["1", "2", "1"] and history[-1]["rolled_back_from"] == "2"
    # v1 replaced nobody: there is nothing further back
    with pytest.raises(GenloopError, match="no previous champion"):
        aliases.rollback(name)


def test_rollback_refuses_a_version_that_never_passed_the_gate(registry_with_history):
    name, client, _ = registry_with_history
    with pytest.raises(GenloopError, match="never passed the promotion gate.*decision 3.*--force"):
        aliases.rollback(name, to="3")
    assert _alias(client, name, "champion") == "2"
    with pytest.raises(GenloopError, match="no version 7; versions: 1, 2, 3"):
        aliases.rollback(name, to="7")
    out = aliases.rollback(name, to="3", reason="hotfix", force=True)
    assert out["champion"] == "3" and client.get_model_version(name, "3").tags["genloop.rollback.forced"] == "True"


def test_rollback_command(registry_with_history, tmp_path):
    name, client, uri = registry_with_history
    env = cli_env(tmp_path, MLFLOW_TRACKING_URI=uri)
    cmd = [str(BIN / "genloop"), "rollback", "--params", str(ROOT / "params.yaml"), "--set",
           f"register.model_name={name}"]
    refused = run_cli([*cmd, "--to", "3"], tmp_path, env=env, ok=False)
    assert refused.returncode == 2 and "never passed the promotion gate" in refused.stderr
    done = run_cli([*cmd, "--reason", "bad batch"], tmp_path, env=env)
    assert json.loads(done.stdout)["champion"] == "1"
    assert json.loads((tmp_path / "reports" / "rollback.json").read_text())["why"] == "bad batch"
    assert _alias(client, name, "champion") == "1"
