"""autotune: human feedback and the gate's metric steer the next iteration's training params.

Every loop iteration is one trial of a persistent Optuna study (`optimize.tune`): its params
are the training params actually used (epochs, the learning rate, latent size, the VAE's
beta; the search space is in config), its objective (lower is better) is

    metric / first trial's metric + w x (1 - 2 x acceptance rate) + v x (1 - 2 x agreement)

with `metric` the gate's metric (reports/eval.json), the acceptance rate the reviewers' share
of accepted images made by that iteration's model version (w =
`optimize.tune.acceptance_weight`; no feedback counts as an acceptance of 1/2, i.e. the metric
alone) and the agreement the ROC AUC of that version's curation scores against the reviewers'
accept/reject decisions (v = `optimize.tune.agreement_weight`; see genloop.feedback.agreement).
An iteration whose curation score ranks its batch the other way round from its reviewers costs
up to v more; one whose score orders what people keep earns up to v; no reviews, or only
accepts or only rejects, count as chance (AUC 1/2, nothing added). Reviewers judge a model's
images after its iteration ended, so a trial stays open until feedback on its version arrives
or the next iteration is recorded (then the metric alone decides, and the report says so). The
end of optimize then asks the study (TPE, fixed seed) for the next params and writes them to
reports/next_params.yaml: a complete params file with a header naming the study, the trial and
the reason. `loop.autotune: true` makes the next `genloop loop` apply it; `genloop loop
--params reports/next_params.yaml` does too.

The study lives in a journal file under the workspace (.genloop/optuna/study.log) by
default, in an RDB (sqlite:///...), or in an s3:// journal object that is downloaded,
used and uploaded back only if nobody changed it meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from genloop.core.config import Params
from genloop.core.errors import GenloopError, Unreachable
from genloop.core.storage import (
    describe_s3_failure,
    parse_s3_uri,
    read_json,
    s3_client,
    transient_s3,
    write_bytes_atomic,
    write_text_atomic,
)
from genloop.core.workspace import Workspace
from genloop.mlops import tracking

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

NEXT_PARAMS = "next_params.yaml"
PROPOSAL_LINE = "# genloop-proposal: "  # the machine-readable line of next_params.yaml's header
DEFAULT_JOURNAL = Path(".genloop") / "optuna" / "study.log"
ROLE, ITERATION, PROPOSAL = "genloop.role", "iteration", "proposal"


@dataclass(frozen=True)
class Reviews:
    """What reviewers said about one model version's curated images."""

    acceptance: float | None  # share of decided images accepted (None: no decision yet)
    agreement: float | None  # AUC of the curation score against the decisions (None: not measurable)


_ReviewsOf = Callable[[str], Reviews]  # model version -> its reviews


class TuneError(GenloopError):
    """The tuning study cannot be read or written."""


class TuneUnreachable(TuneError, Unreachable):
    """The study's S3 object did not answer; worth retrying."""


# --- the search space ---------------------------------------------------------------------


@dataclass(frozen=True)
class Dim:
    """One tuned param: its dotted key in params.yaml and its range."""

    key: str
    low: float
    high: float
    integer: bool
    log: bool

    def distribution(self, include: float | None = None) -> Any:
        """The Optuna distribution, widened to hold `include` (a value used outside the range)."""
        from optuna.distributions import FloatDistribution, IntDistribution

        low, high = self.low, self.high
        if include is not None:
            low, high = min(low, include), max(high, include)
        if self.integer:
            return IntDistribution(int(low), int(high), log=self.log)
        return FloatDistribution(float(low), float(high), log=self.log)


def lr_key(cfg: Params) -> str:
    """The learning rate a family trains with: its own `model.<family>.lr` when set, else train.lr."""
    family = cfg.model.family
    section = getattr(cfg.model, family)
    return f"model.{family}.lr" if getattr(section, "lr", None) is not None else "train.lr"


def space(cfg: Params) -> list[Dim]:
    """The tuned params of the configured family (a range set to null is not tuned)."""
    t, family = cfg.optimize.tune, cfg.model.family
    dims = []
    if t.epochs is not None:
        dims.append(Dim("train.epochs", t.epochs[0], t.epochs[1], integer=True, log=False))
    if t.lr is not None:
        dims.append(Dim(lr_key(cfg), t.lr[0], t.lr[1], integer=False, log=True))
    if t.latent_dim is not None and family in ("dcgan", "vae"):
        dims.append(Dim(f"model.{family}.latent_dim", t.latent_dim[0], t.latent_dim[1], integer=True, log=True))
    if t.beta is not None and family == "vae":
        dims.append(Dim("model.vae.beta", t.beta[0], t.beta[1], integer=False, log=True))
    return dims


def get_param(cfg: Params, key: str) -> Any:
    value: Any = cfg.model_dump(mode="json", by_alias=True)
    for part in key.split("."):
        value = value[part]
    return value


def with_params(cfg: Params, values: dict[str, Any]) -> Params:
    """`cfg` with dotted-key values set, validated."""
    data = cfg.model_dump(mode="json", by_alias=True)
    for key, value in values.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return Params.model_validate(data)


def _same(a: Any, b: Any) -> bool:
    """Equal params; floats to the 4 significant digits a proposal is written with."""
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-3)
    return bool(a == b)


def _readable(value: Any) -> Any:
    """A proposed float to 4 significant digits (0.0018009244 -> 0.001801): what a person would write."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def used_params(cfg: Params, train_run_id: str | None) -> tuple[dict[str, Any], str]:
    """The tuned params the evaluated generator was trained with: from its MLflow train run
    when there is one (a standalone `genloop optimize` may run with other params), else `cfg`."""
    logged: dict[str, str] = {}
    if train_run_id:
        try:
            logged = tracking.run_params(train_run_id)
        except Exception as exc:  # MLflow errors of many kinds: fall back to the params in hand
            log.warning("autotune: cannot read the params of train run %s (%s); using the current params",
                        train_run_id, exc)
    if logged:
        trained = cfg
        family = logged.get("model.family")
        if family and family != cfg.model.family:
            trained = with_params(cfg, {"model.family": family})
        values = {}
        for dim in space(trained):
            text = logged.get(dim.key)
            values[dim.key] = yaml.safe_load(text) if text is not None else get_param(trained, dim.key)
        return values, f"train run {train_run_id}"
    return {d.key: get_param(cfg, d.key) for d in space(cfg)}, "the current params"


def objective(metric: float, reference: float, acceptance: float | None, weight: float,
              agreement: float | None = None, agreement_weight: float = 0.0) -> float:
    """metric / |reference| + w x (1 - 2 x acceptance) + v x (1 - 2 x agreement AUC); a missing
    acceptance or agreement adds nothing (without feedback: the metric alone)."""
    value = metric / max(abs(reference), 1e-12)
    if acceptance is not None and weight > 0:
        value += weight * (1 - 2 * acceptance)
    if agreement is not None and agreement_weight > 0:
        value += agreement_weight * (1 - 2 * agreement)
    return value


# --- where the study lives ------------------------------------------------------------------


def storage_location(cfg: Params, ws: Workspace) -> str:
    """The study's storage as a user reads it: a journal file path, an RDB URL or an s3:// URI."""
    s = cfg.optimize.tune.storage
    if s is None:
        return str(ws.root / DEFAULT_JOURNAL)
    if s.startswith("s3://"):
        return s
    if s.startswith("sqlite:///"):
        path = Path(s.removeprefix("sqlite:///"))
        return s if path.is_absolute() or s == "sqlite:///:memory:" else f"sqlite:///{ws.root / path}"
    if "://" in s:
        return s
    path = Path(s).expanduser()
    return str(path if path.is_absolute() else ws.root / path)


def _journal(path: Path) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


@contextmanager
def _s3_journal(uri: str, ws: Workspace) -> Iterator[Path]:
    """A local copy of the journal object; uploaded back after the block if it changed, only
    when the object is still the one downloaded (S3 conditional write: no lost trials)."""
    bucket, key = parse_s3_uri(uri)
    local = ws.cache / "optuna" / f"s3-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.log"
    client = s3_client()
    etag: str | None = None
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
        before, etag = obj["Body"].read(), obj["ETag"]
    except Exception as exc:  # botocore raises many types; NoSuchKey is a study not started yet
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        if code not in ("NoSuchKey", "404"):
            error = TuneUnreachable if transient_s3(exc) else TuneError
            raise error(describe_s3_failure(uri, exc) + " (optimize.tune.storage)") from exc
        before = b""
    write_bytes_atomic(local, before)
    yield local
    after = local.read_bytes()
    if after == before:
        return
    condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    try:
        client.put_object(Bucket=bucket, Key=key, Body=after, ContentType="text/plain", **condition)
    except Exception as exc:
        if "PreconditionFailed" in str(exc) or "412" in str(exc):
            raise TuneError(
                f"the study {uri} changed while this optimize used it (another loop running?): this "
                "iteration's trial was not saved; rerun `genloop optimize`"
            ) from exc
        error = TuneUnreachable if transient_s3(exc) else TuneError
        raise error(describe_s3_failure(uri, exc, "write") + " (optimize.tune.storage)") from exc


@contextmanager
def open_storage(cfg: Params, ws: Workspace) -> Iterator[Any]:
    """The Optuna storage of `optimize.tune.storage` (an s3:// journal is written back after)."""
    location = storage_location(cfg, ws)
    if location.startswith("s3://"):
        with _s3_journal(location, ws) as local:
            yield _journal(local)
    elif "://" in location:
        from optuna.storages import RDBStorage

        yield RDBStorage(location)
    else:
        yield _journal(Path(location))


def load_study(cfg: Params, storage: Any) -> optuna.Study:
    """The study (created when absent); its TPE sampler is seeded with seed + number of trials,
    so every process proposes reproducibly yet no two proposals repeat the same random draw."""
    import optuna

    optuna.logging.disable_default_handler()  # library code never prints: optuna logs via logging
    optuna.logging.enable_propagation()
    t = cfg.optimize.tune
    study = optuna.create_study(storage=storage, study_name=t.study_name, direction="minimize",
                                load_if_exists=True)
    n = len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=t.seed + n, n_startup_trials=t.startup_trials,
                                               constant_liar=False)
    return study


# --- one iteration --------------------------------------------------------------------------


def _reviews(cfg: Params, ws: Workspace) -> tuple[_ReviewsOf, str | None]:
    """A function version -> its reviews (acceptance rate and curation agreement), and a problem if any."""
    from genloop.feedback.agreement import scored_reviews, version_auc
    from genloop.feedback.store import FeedbackError, FeedbackStore, acceptance_rate

    try:
        records = FeedbackStore.open(cfg.feedback.store, ws).records()
    except (FeedbackError, GenloopError) as exc:
        log.warning("autotune: feedback store unreadable, tuning on the metric alone: %s", exc)
        return (lambda version: Reviews(None, None)), str(exc)
    scored = scored_reviews(records, ws) if cfg.optimize.tune.agreement_weight > 0 else {}
    return (lambda version: Reviews(acceptance_rate(records, str(version)), version_auc(scored, str(version)))), None


def _tell(study: optuna.Study, trial: Any, metric: float, reference: float, reviews: Reviews,
          cfg: Params, basis: str) -> float:
    from optuna.trial import Trial

    t = cfg.optimize.tune
    value = objective(metric, reference, reviews.acceptance, t.acceptance_weight, reviews.agreement,
                      t.agreement_weight)
    handle = Trial(study, trial._trial_id)
    handle.set_user_attr("acceptance", reviews.acceptance)
    handle.set_user_attr("agreement", reviews.agreement)
    handle.set_user_attr("objective_basis", basis)
    study.tell(trial.number, value)
    return value


def _basis(reviews: Reviews, version: str, cfg: Params, why_none: str) -> str:
    weight, agreement_weight = cfg.optimize.tune.acceptance_weight, cfg.optimize.tune.agreement_weight
    if weight == 0 and agreement_weight == 0:
        return "metric only (optimize.tune.acceptance_weight and agreement_weight are 0)"
    if reviews.acceptance is None:
        return f"metric only: {why_none}"
    text = f"metric and human acceptance {reviews.acceptance:.1%} of version {version} (weight {weight})"
    if reviews.agreement is not None and agreement_weight > 0:
        text += (f" and the curation score's agreement with reviewers, AUC {reviews.agreement:.3f} "
                 f"(weight {agreement_weight})")
    return text


def _record(study: optuna.Study, dims: list[Dim], used: dict[str, Any], attrs: dict[str, Any]) -> Any:
    """This iteration's trial: the pending proposal it applied, else a new trial of the params used."""
    from optuna.trial import TrialState

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    proposals = [t for t in running if t.user_attrs.get(ROLE) == PROPOSAL]
    match = next((t for t in reversed(proposals)
                  if set(t.params) == set(used) and all(_same(t.params[k], v) for k, v in used.items())), None)
    for stale in proposals:
        if stale is not match:  # proposed but not applied: it tells nothing about its params
            study.tell(stale.number, state=TrialState.FAIL)
    if match is not None:
        trial = match
        handle = _handle(study, trial)
    else:
        study.enqueue_trial(used, user_attrs={ROLE: ITERATION})
        handle = study.ask()
        for dim in dims:
            suggest = handle.suggest_int if dim.integer else handle.suggest_float
            dist = dim.distribution(include=used[dim.key])
            suggest(dim.key, dist.low, dist.high, log=dim.log)
        trial = study.trials[handle.number]
    for key, value in {**attrs, ROLE: ITERATION, "applied_proposal": match is not None}.items():
        handle.set_user_attr(key, value)
    return study.get_trials(deepcopy=False)[trial.number]


def _handle(study: optuna.Study, frozen: Any) -> Any:
    from optuna.trial import Trial

    return Trial(study, frozen._trial_id)


def _propose(study: optuna.Study, dims: list[Dim], after: int) -> Any:
    """The pending proposal (one asked earlier for this same iteration), or a new one."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get(ROLE) == PROPOSAL and t.user_attrs.get("after_trial") == after:
            return t
    handle = study.ask()
    for dim in dims:
        dist = dim.distribution()
        if dim.integer:
            handle.suggest_int(dim.key, dist.low, dist.high, log=dim.log)
        else:
            handle.suggest_float(dim.key, dist.low, dist.high, log=dim.log)
    handle.set_user_attr(ROLE, PROPOSAL)
    handle.set_user_attr("after_trial", after)
    return study.get_trials(deepcopy=False)[handle.number]


def _why(study: optuna.Study, cfg: Params) -> str:
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    startup = cfg.optimize.tune.startup_trials
    if len(done) < startup:
        return (f"random exploration: {len(done)} completed trial(s), TPE models the results from "
                f"{startup} on (optimize.tune.startup_trials)")
    best = min(done, key=lambda t: t.value)
    return (f"TPE's pick after {len(done)} completed trials (best so far: trial {best.number}, "
            f"objective {best.value:.4f}: {best.user_attrs.get('objective_basis', '')})")


def write_next_params(path: Path, cfg: Params, proposal: dict[str, Any] | None, header: list[str]) -> None:
    """A complete params file: `cfg` with the proposal applied, under a comment header."""
    proposed = with_params(cfg, proposal or {})
    lines = ["# " + h if h else "#" for h in header]
    if proposal:
        lines.append(PROPOSAL_LINE + json.dumps(proposal, sort_keys=True))
    body = yaml.safe_dump(proposed.model_dump(mode="json", by_alias=True), sort_keys=False)
    write_text_atomic(path, "\n".join(lines) + "\n" + body)


def read_proposal(path: Path) -> dict[str, Any] | None:
    """The proposal recorded in a next_params.yaml header, or None (no file, or no proposal)."""
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith(PROPOSAL_LINE):
            return dict(json.loads(line[len(PROPOSAL_LINE):]))
        if line and not line.startswith("#"):
            break
    return None


@dataclass(frozen=True)
class _Iteration:
    """This iteration as its reports say: the gate's metric, the registered version, the params trained with."""

    evaluation: dict[str, Any]
    metric_name: str
    metric: float
    version: str
    generator: str
    used: dict[str, Any]
    used_from: str
    trained_cfg: Params
    dims: list[Dim]


@dataclass(frozen=True)
class _Outcome:
    """What the study holds after this iteration: its trial, the objective so far, the next proposal."""

    current: Any  # this iteration's trial (a FrozenTrial)
    reference: float
    reviews: Reviews
    provisional: float
    basis: str
    waiting: bool
    settled: list[dict[str, Any]]
    why: str
    proposed: Any  # the proposal's trial (a FrozenTrial)
    proposal: dict[str, Any]
    seed: int


def _write_unchanged(cfg: Params, out: Path) -> dict[str, Any]:
    """With autotune disabled: next_params.yaml holds this iteration's params, nothing proposed."""
    write_next_params(out, cfg, None, ["genloop autotune: optimize.tune.enabled is false, so nothing is proposed;",
                                       "these are this iteration's params unchanged."])
    return {"enabled": False, "file": str(out)}


def _read_iteration(cfg: Params, ws: Workspace) -> _Iteration:
    """This iteration's metric, version, generator and params, from reports/eval.json and register.json."""
    if not (ws.report("eval").exists() and ws.report("register").exists()):
        raise TuneError("autotune needs reports/eval.json and reports/register.json: run `genloop evaluate` "
                        "and `genloop register` first (or set optimize.tune.enabled=false)")
    evaluation, registered = read_json(ws.report("eval")), read_json(ws.report("register"))
    # the metric the gate decided on (register.metric may be "auto": register.json names the one chosen)
    metric_name = str(registered.get("metric") or (evaluation.get("gate_metric") or {}).get("name")
                      or cfg.registry.metric)
    if metric_name not in evaluation:
        raise TuneError(f"{ws.report('eval')} has no {metric_name!r} (the gate's metric, from "
                        f"{ws.report('register')}): rerun `genloop evaluate` and `genloop register`")
    metric = float(evaluation[metric_name])
    version = str(registered["version"])
    generator = str(evaluation["generator_sha256"])
    used, used_from = used_params(cfg, evaluation.get("train_run_id"))
    trained_cfg = with_params(cfg, used)
    return _Iteration(evaluation, metric_name, metric, version, generator, used, used_from, trained_cfg,
                      space(trained_cfg))


def _reference(study: optuna.Study, it: _Iteration) -> float:
    """The first trial's metric for this metric and extractor (this one's, stored, when it is the first)."""
    ref_key = f"reference.{it.metric_name}.{it.evaluation['extractor']['name']}"
    reference = study.user_attrs.get(ref_key)
    if reference is None:
        reference = it.metric
        study.set_user_attr(ref_key, reference)
    return reference


def _settled(trial: Any, version: str, reviews: Reviews, value: float) -> dict[str, Any]:
    """The report entry of a trial told its objective in this step."""
    return {"trial": trial.number, "model_version": version, "acceptance": reviews.acceptance,
            "agreement": reviews.agreement, "objective": round(value, 6)}


def _settle_waiting(study: optuna.Study, reviews_of: _ReviewsOf, generator: str,
                    cfg: Params) -> list[dict[str, Any]]:
    """Tell earlier iterations waiting for feedback: now if it arrived, or because a new generator is here."""
    from optuna.trial import TrialState

    settled: list[dict[str, Any]] = []
    for old in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if old.user_attrs.get(ROLE) != ITERATION:
            continue
        old_version = str(old.user_attrs["model_version"])
        reviews = reviews_of(old_version)
        if reviews.acceptance is None and old.user_attrs.get("generator_sha256") == generator:
            continue  # this very iteration (optimize rerun): keep waiting for its feedback
        why_none = f"no feedback on version {old_version} before the next iteration"
        value = _tell(study, old, float(old.user_attrs["metric"]), float(old.user_attrs["reference"]), reviews,
                      cfg, _basis(reviews, old_version, cfg, why_none))
        settled.append(_settled(old, old_version, reviews, value))
    return settled


def _this_trial(study: optuna.Study, it: _Iteration, reference: float) -> Any:
    """This iteration's trial: the one recorded already for the same generator, else a new one."""
    from optuna.trial import TrialState

    done = [tr for tr in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
            if tr.user_attrs.get(ROLE) == ITERATION and tr.user_attrs.get("generator_sha256") == it.generator]
    if done:  # optimize ran again for the same generator: the same trial, no second one
        return done[-1]
    return _record(study, it.dims, it.used, {
        "model_version": it.version, "generator_sha256": it.generator, "metric_name": it.metric_name,
        "metric": it.metric, "reference": reference, "data_version": it.evaluation.get("data_version"),
        "params_from": it.used_from})


def _run_study(cfg: Params, study: optuna.Study, it: _Iteration, reviews_of: _ReviewsOf) -> _Outcome:
    """Settle waiting trials, record and score this iteration's trial, ask for the next params."""
    from optuna.trial import TrialState

    t = cfg.optimize.tune
    reference = _reference(study, it)
    settled = _settle_waiting(study, reviews_of, it.generator, cfg)
    current = _this_trial(study, it, reference)
    reviews = reviews_of(it.version)
    provisional = objective(it.metric, reference, reviews.acceptance, t.acceptance_weight, reviews.agreement,
                            t.agreement_weight)
    basis = _basis(reviews, it.version, cfg, f"no feedback on version {it.version} yet")
    metric_only = t.acceptance_weight == 0 and t.agreement_weight == 0  # no feedback to wait for
    if current.state == TrialState.RUNNING and (reviews.acceptance is not None or metric_only):
        provisional = _tell(study, current, it.metric, reference, reviews, cfg, basis)
        settled.append(_settled(current, it.version, reviews, provisional))
    current = study.get_trials(deepcopy=False)[current.number]
    waiting = current.state == TrialState.RUNNING
    if not waiting:
        provisional = float(current.value) if current.value is not None else provisional
        basis = str(current.user_attrs.get("objective_basis", basis))
    why = _why(study, cfg)
    proposed = _propose(study, it.dims, after=current.number)
    proposal = {k: _readable(proposed.params[k]) for k in sorted(proposed.params)}
    return _Outcome(current, reference, reviews, provisional, basis, waiting, settled, why, proposed, proposal,
                    cfg.optimize.tune.seed + proposed.number)


def _status(it: _Iteration, o: _Outcome) -> str:
    """The objective so far and its basis, saying whether the trial still waits for feedback."""
    if o.waiting:
        return (f"objective {o.provisional:.4f} so far, {o.basis}; told when feedback on version {it.version} "
                "arrives or at the next iteration")
    return f"objective {o.provisional:.4f}, {o.basis}"


def _header(cfg: Params, it: _Iteration, o: _Outcome, location: str, status: str, changed_text: str) -> list[str]:
    """The comment header of next_params.yaml: who proposed it, why, and what it changes."""
    t = cfg.optimize.tune
    return [
        "genloop autotune: params for the next loop iteration (a complete params file).",
        f"Proposed by trial {o.proposed.number} of Optuna study {t.study_name!r} at {location}",
        f"(TPE sampler, seed {o.seed}). Why: {o.why}.",
        f"This iteration is trial {o.current.number}: model version {it.version}, {it.metric_name} {it.metric:.4f} "
        f"(first trial's {o.reference:.4f}); {status}.",
        f"Changed from this iteration's params: {changed_text}.",
        "Apply: `genloop loop` with loop.autotune: true, or `genloop loop --params reports/next_params.yaml`.",
        "",
    ]


def _summary(cfg: Params, it: _Iteration, o: _Outcome, location: str, changes: dict[str, tuple[Any, Any]],
             feedback_problem: str | None, out: Path) -> dict[str, Any]:
    """The step's result: the trial, its objective, the proposal and what it changes."""
    return {
        "enabled": True,
        "study": cfg.optimize.tune.study_name,
        "storage": location,
        "trial": o.current.number,
        "model_version": it.version,
        "metric": it.metric_name,
        "metric_value": it.metric,
        "reference": o.reference,
        "acceptance": o.reviews.acceptance,
        "agreement": o.reviews.agreement,
        "objective": round(o.provisional, 6),
        "objective_basis": o.basis,
        "awaiting_feedback": o.waiting,
        "settled": o.settled,
        "feedback_problem": feedback_problem,
        "proposal_trial": o.proposed.number,
        "proposal": o.proposal,
        "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()},
        "why": o.why,
        "file": str(out),
    }


def _log_to_mlflow(cfg: Params, o: _Outcome, out: Path) -> None:
    """Log the proposal, the objectives, the trials' tags and next_params.yaml to the current MLflow run."""
    tracking.log_params({f"proposal.{k}": v for k, v in o.proposal.items()})
    tracking.log_metrics({"tune.objective": o.provisional}
                         | ({"tune.acceptance": o.reviews.acceptance} if o.reviews.acceptance is not None else {})
                         | ({"tune.agreement": o.reviews.agreement} if o.reviews.agreement is not None else {}))
    for s in o.settled:
        tracking.log_metrics({"tune.trial_objective": s["objective"]}, step=s["trial"])
    tracking.tag_run({"genloop.tune.study": cfg.optimize.tune.study_name, "genloop.tune.trial": o.current.number,
                      "genloop.tune.proposal_trial": o.proposed.number,
                      "genloop.tune.objective_basis": o.basis[:4000], "genloop.tune.awaiting_feedback": o.waiting})
    tracking.log_artifact(out, "autotune")


def step(cfg: Params, ws: Workspace) -> dict[str, Any]:
    """Record this iteration as a trial, ask for the next params, write reports/next_params.yaml.

    Runs inside the optimize stage's MLflow run and logs there: params `proposal.*`, metric
    `tune.objective`, the file as an artifact and tags naming the trials.
    """
    out = ws.reports / NEXT_PARAMS
    if not cfg.optimize.tune.enabled:
        return _write_unchanged(cfg, out)
    it = _read_iteration(cfg, ws)
    reviews_of, feedback_problem = _reviews(cfg, ws)
    location = storage_location(cfg, ws)
    with open_storage(cfg, ws) as storage:
        o = _run_study(cfg, load_study(cfg, storage), it, reviews_of)
    changes = {k: (it.used.get(k), v) for k, v in o.proposal.items() if not _same(it.used.get(k), v)}
    changed_text = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()) or "nothing"
    status = _status(it, o)
    write_next_params(out, it.trained_cfg, o.proposal, _header(cfg, it, o, location, status, changed_text))
    summary = _summary(cfg, it, o, location, changes, feedback_problem, out)
    _log_to_mlflow(cfg, o, out)
    log.info("autotune: trial %d (%s); trial %d proposes %s", o.current.number, status, o.proposed.number,
             changed_text)
    return summary


# --- applying a proposal ---------------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    """A proposal applied to a loop run: the `--set` overrides and what they change."""

    file: str
    overrides: list[str]
    changes: dict[str, tuple[Any, Any]]

    def describe(self) -> str:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in self.changes.items()) or "no param changes"
        return f"applied {self.file}: {what}"


def apply_proposal(cfg: Params, ws: Workspace, overrides: list[str]) -> Applied | None:
    """The overrides that apply reports/next_params.yaml's proposal (its tuned keys only, so
    edits to params.yaml since stay in force); explicit `overrides` still win. None: no proposal."""
    path = ws.reports / NEXT_PARAMS
    try:
        proposal = read_proposal(path)
    except (ValueError, OSError) as exc:
        log.warning("autotune: ignoring %s: its proposal line is unreadable (%s)", path, exc)
        return None
    if not proposal:
        return None
    explicit = {o.partition("=")[0].strip() for o in overrides}
    applied = {k: v for k, v in proposal.items() if k not in explicit}
    changes = {k: (get_param(cfg, k), v) for k, v in applied.items() if not _same(get_param(cfg, k), v)}
    sets = [f"{k}={json.dumps(v)}" for k, v in applied.items()]
    result = Applied(str(path), [*sets, *overrides], changes)
    log.info("autotune: %s", result.describe())
    return result
