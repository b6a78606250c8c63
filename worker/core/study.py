"""The search strategy (method.md §5): an Optuna study over family × hyperparameters.

Each trial samples the augmentation family (categorical) and then only that family's
hyperparameters (define-by-run, so the space is conditional), trains a detector through
:func:`worker.core.trial.run_trial` and returns the validation loss; the study minimises it.
The sampler is a seeded TPE. How the budget is spent is the strategy's
(:mod:`ssad_common.strategy`):

* ``staged`` (default): a short screen of every family at its defaults (and of more
  configurations of a small space's families), then full-length trials over the leading
  families only (each leader at its best screened configuration, one more of the best
  local family, then TPE over the leaders' hyperparameters under ``refine.``-prefixed
  names, so TPE never mixes short and full-length losses). Only full-length trials can be
  the best. The leaders are kept in the study (``refine_leaders``), so a resumed study
  refines the same families.
* ``tpe``: one full-length trial per family at its defaults (``warm_start``), then TPE.

Storage is whatever the caller passes (in memory, or an RDB URL so a restarted study keeps
its finished trials). Several runners may run one study's trials at once
(:func:`run_study_slot`, the service's parallel trials): they take turns at the budget
through a shared gate, so the plan is never overrun.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import warnings
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol, TypedDict, Unpack

import numpy as np
import optuna

from ssad_common.jobspec import (
    DEFAULT_CONTAMINATION,
    DEFAULT_N_TRIALS,
    DEFAULT_OBJECTIVE,
    DEFAULT_SEED,
)
from ssad_common.search_space import (
    CategoricalParam,
    FloatParam,
    ParamValue,
    SearchSpace,
)
from ssad_common.strategy import (
    DEFAULT_STRATEGY,
    FINISHING,
    LEADERS,
    REFINE,
    SCREEN,
    STRATEGIES,
    StudyPlan,
    plan_for,
    ranked,
    selectable,
)
from worker.core.data import PreparedData
from worker.core.device import out_of_memory_reason
from worker.core.objectives import get_objective
from worker.core.training import TrainSettings, TrialInterrupted, TrialPruned
from worker.core.trial import TrialResult, run_trial

AUGMENTATION_KEY = "augmentation"
FAILED_REASON = "error"  # the trial's user attribute naming why it failed
#: Refine-stage parameters carry this prefix: TPE models them apart from the screen's.
REFINE_PREFIX = "refine."
LEADERS_ATTR = "refine_leaders"  # the study's user attribute holding the refine families


@dataclass(frozen=True)
class StudySettings:
    n_trials: int = DEFAULT_N_TRIALS
    objective: str = DEFAULT_OBJECTIVE
    contamination: float = DEFAULT_CONTAMINATION
    seed: int = DEFAULT_SEED
    search_space: SearchSpace = field(default_factory=SearchSpace)
    train: TrainSettings = field(default_factory=TrainSettings)
    warm_start: bool = True  # the tpe strategy's one trial per family at its defaults
    pruning: bool = False
    strategy: str = DEFAULT_STRATEGY
    leaders: int = LEADERS
    #: Added to the sampler's seed: runners of one study at once must not draw the same
    #: points (0 for a study run by one runner, so it replays the same draws).
    sampler_offset: int = 0

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            raise ValueError("n_trials must be >= 1")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; known: {list(STRATEGIES)}")
        if self.leaders < 1:
            raise ValueError("leaders must be >= 1")
        get_objective(self.objective)
        if not 0.0 < self.contamination < 1.0:
            raise ValueError("contamination must be in (0, 1)")
        if self.pruning and not self.train.eval_every:
            raise ValueError("pruning needs train.eval_every > 0 (intermediate losses)")

    @property
    def plan(self) -> StudyPlan:
        return plan_for(self.strategy, self.n_trials, self.train.steps, self.search_space)


class TrialFailed(Exception):
    """One trial could not finish (device out of memory, a non-finite loss); the study marks
    it FAIL with this reason and goes on."""


@dataclass(frozen=True)
class TrialRecord:
    """One trial of the study as the caller sees it (scores only for trials run here)."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL
    augmentation: str | None
    params: dict[str, ParamValue]
    validation_loss: float | None
    duration_s: float | None
    result: TrialResult | None = None
    stage: str | None = None  # screen or refine (staged strategy); None for tpe
    train_steps: int | None = None
    #: Every objective's loss (stored with the trial, so also for trials run elsewhere).
    losses: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "number": self.number, "state": self.state, "augmentation": self.augmentation,
            "params": self.params, "validation_loss": self.validation_loss,
            "duration_s": self.duration_s, "stage": self.stage,
            "train_steps": self.train_steps,
        }
        if self.losses:
            out["losses"] = self.losses
        if self.result is not None:
            out["timings"] = self.result.timings
        return out


@dataclass(frozen=True)
class StudyResult:
    best: TrialRecord
    trials: list[TrialRecord]
    study_name: str
    plan: StudyPlan
    leaders: list[str] = field(default_factory=list)  # the refine stage's families

    @property
    def eligible(self) -> list[tuple[float, TrialRecord]]:
        """The completed trials the best was chosen among (full-length ones), best first,
        with their selection scores (ssad_common.strategy.ranked)."""
        return ranked(t for t in self.trials if t.state == "COMPLETE")

    @property
    def best_scores(self) -> np.ndarray | None:
        return None if self.best.result is None else self.best.result.scores


def sample_configuration(
    trial: optuna.trial.BaseTrial, space: SearchSpace, families: Sequence[str] | None = None,
    prefix: str = "",
) -> tuple[str, dict[str, ParamValue]]:
    """Define-by-run: the family first, then only that family's searched hyperparameters.

    Parameter names are prefixed with the family (``cutout.patch_size``) so TPE keeps a
    separate model of each family's ranges; ``families`` (default: the space's) and
    ``prefix`` serve the refine stage (``refine.augmentation`` over the leaders).
    """
    choices = list(space.augmentations if families is None else families)
    family = str(trial.suggest_categorical(prefix + AUGMENTATION_KEY, choices))
    sampled: dict[str, ParamValue] = {}
    params = space.searched_params(family)
    # One read of the study's trials per configuration, and only for a family with choices.
    recorded = (recorded_choices(trial)
                if any(isinstance(p, CategoricalParam) for p in params) else {})
    for p in params:
        key = f"{prefix}{family}.{p.name}"
        if isinstance(p, FloatParam):
            sampled[p.name] = trial.suggest_float(key, p.low, p.high, log=p.log)
        elif isinstance(p, CategoricalParam):
            sampled[p.name] = str(trial.suggest_categorical(
                key, recorded.get(key) or list(p.choices)))
    return family, space.complete(family, sampled)


def recorded_choices(trial: optuna.trial.BaseTrial) -> dict[str, list[Any]]:
    """The choices ``trial``'s study already sampled each categorical parameter from: a
    study started before a family gained a choice (CutOut's white fill, 2026-12-02) keeps
    the choices it began with, as Optuna requires of a categorical parameter, instead of
    failing when it is resumed."""
    study = getattr(trial, "study", None)
    out: dict[str, list[Any]] = {}
    for t in study.get_trials(deepcopy=False) if study is not None else ():
        for key, d in t.distributions.items():
            if isinstance(d, optuna.distributions.CategoricalDistribution):
                out.setdefault(key, list(d.choices))
    return out


def default_configuration(space: SearchSpace, family: str, prefix: str = "") -> dict[str, Any]:
    """One family at its defaults (clipped into the searched range), as Optuna parameters."""
    params: dict[str, Any] = {prefix + AUGMENTATION_KEY: family}
    for p in space.searched_params(family):
        value = p.default
        if isinstance(p, FloatParam):
            value = min(max(float(value), p.low), p.high)
        params[f"{prefix}{family}.{p.name}"] = value
    return params


def screen_configurations(space: SearchSpace, plan: StudyPlan) -> list[dict[str, Any]]:
    """The staged screen's trials, as Optuna parameters: each screened family at its
    defaults, then each of ``plan.screen_extra`` with its next combination of searched
    choices (fill, direction), its numbers (patch size...) left to the sampler, which
    draws them at random during the screen."""
    configs = [default_configuration(space, f) for f in plan.screen_families]
    turns = {f: itertools.cycle(space.variants(f) or [{}]) for f in set(plan.screen_extra)}
    for family in plan.screen_extra:
        combo = next(turns[family])
        configs.append({AUGMENTATION_KEY: family,
                        **{f"{family}.{k}": v for k, v in combo.items()}})
    return configs


def _enqueue_missing(study: optuna.Study, configs: Sequence[dict[str, Any]]) -> None:
    """Queue each of ``configs`` that the study does not hold yet, counting repeats (two
    screen trials of one family may both leave its patch size to the sampler, which
    Optuna's ``skip_if_exists`` would take for one)."""
    held = [t.system_attrs.get("fixed_params") for t in study.get_trials(deepcopy=False)]
    for params in configs:
        if params in held:
            held.remove(params)
        else:
            study.enqueue_trial(params)


def warm_start_configurations(space: SearchSpace) -> list[dict[str, Any]]:
    """One Optuna parameter dict per family: its defaults, clipped into the searched range."""
    return [default_configuration(space, family) for family in space.augmentations]


def make_sampler(settings: StudySettings) -> optuna.samplers.BaseSampler:
    if settings.strategy == "staged":
        # Queued screen, anchor and probe trials first (the probe's patch size drawn at
        # random, not next to the anchor's); TPE proper right after them.
        plan = settings.plan
        n_startup = min(plan.n_screen + settings.leaders + 2, max(1, plan.total_trials - 1))
    else:
        n_startup = min(len(settings.search_space.augmentations) if settings.warm_start
                        else 10, max(1, settings.n_trials - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: trials running elsewhere count as bad points, so runners of one
        # study at once (parallel trials) do not all sample next to the same good one.
        return optuna.samplers.TPESampler(
            seed=settings.seed + settings.sampler_offset, multivariate=True, group=True,
            n_startup_trials=n_startup, constant_liar=True,
        )


def create_study(
    settings: StudySettings, storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
) -> optuna.Study:
    """Create, or load if it exists in ``storage``, the study (minimising the loss)."""
    pruner: optuna.pruners.BasePruner = (
        # n_min_trials: a staged study's screen trials report nothing, so counting them
        # towards the start-up would prune against a single full-length trial.
        optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0, n_min_trials=4)
        if settings.pruning else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        storage=storage, study_name=study_name, direction="minimize",
        sampler=make_sampler(settings), pruner=pruner, load_if_exists=True,
    )
    return study


QUEUED_ATTR = "start_queued"  # the study's user attribute: its first trials are queued


def queue_start(study: optuna.Study, settings: StudySettings) -> None:
    """Queue the strategy's first trials (staged: the screen; tpe: the warm start), once.
    Called inside a turn of the gate, so runners starting the study at once never queue
    them twice (``skip_if_exists`` alone is not safe across processes); the attribute is
    set last, so a runner that died while queueing leaves the rest to the next turn."""
    if study.user_attrs.get(QUEUED_ATTR):
        return
    if settings.strategy == "staged":
        _enqueue_missing(study, screen_configurations(settings.search_space, settings.plan))
    elif not study.trials and settings.warm_start:
        for params in warm_start_configurations(settings.search_space)[: settings.n_trials]:
            study.enqueue_trial(params, skip_if_exists=True)
    study.set_user_attr(QUEUED_ATTR, True)


def _stage(t: optuna.trial.FrozenTrial, strategy: str) -> str | None:
    """screen or refine for the staged strategy, else None: screen trials have an
    unprefixed family (queued or sampled), refine trials a ``refine.`` one."""
    if strategy != "staged":
        return None
    params = t.params or t.system_attrs.get("fixed_params") or {}
    return SCREEN if AUGMENTATION_KEY in params else REFINE


def _counted(t: optuna.trial.FrozenTrial) -> bool:
    """Does this trial use up budget? Finished or pruned ones, and ones that failed while
    running (out of memory, a non-finite loss); not those interrupted with their process,
    which are rerun."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return t.state in states or (t.state == optuna.trial.TrialState.FAIL
                                 and FAILED_REASON in t.user_attrs)


def choose_leaders(ranked: Sequence[str], settings: StudySettings) -> list[str]:
    """The refine stage's families, from the screened ones ranked best first: the
    ``settings.leaders`` first, then the best-screened local family with a searched patch
    size if none of them is (so the patch size is always searched). Without a completed
    screen trial (no screen, or every one failed), the space's first family."""
    space = settings.search_space
    if not ranked:
        return [space.augmentations[0]]
    leaders = list(ranked[: settings.leaders])
    local = next((f for f in ranked if _searches_patch_size(space, f)), None)
    if local is not None and local not in leaders:
        leaders.append(local)
    return leaders


def _searches_patch_size(space: SearchSpace, family: str) -> bool:
    return any(p.name == "patch_size" for p in space.searched_params(family))


def _best_screened(study: optuna.Study, settings: StudySettings) -> dict[str, dict[str, Any]]:
    """Each screened family's best completed configuration (its Optuna parameters), the
    family with the lowest screen loss first."""
    best: dict[str, dict[str, Any]] = {}
    for t in sorted(
            (t for t in study.get_trials(deepcopy=False,
                                         states=(optuna.trial.TrialState.COMPLETE,))
             if _stage(t, settings.strategy) == SCREEN),
            key=lambda t: (t.value, t.number)):
        best.setdefault(str(t.params[AUGMENTATION_KEY]), dict(t.params))
    return best


def start_refine(study: optuna.Study, settings: StudySettings) -> list[str]:
    """Fix the leaders (once: a resumed study reads them back) and queue the refine stage's
    first trials: each leader at its best screened configuration (its defaults if none
    completed), then one trial of the best local leader with its hyperparameters left to
    the sampler. Idempotent."""
    best = _best_screened(study, settings)
    stored = study.user_attrs.get(LEADERS_ATTR)
    leaders = [str(f) for f in stored] if stored else choose_leaders(list(best), settings)
    if not stored:
        study.set_user_attr(LEADERS_ATTR, leaders)
    space, n_refine = settings.search_space, settings.plan.n_refine
    queued: list[dict[str, Any]] = [
        {REFINE_PREFIX + k: v for k, v in best[f].items()} if f in best
        else default_configuration(space, f, REFINE_PREFIX) for f in leaders]
    local = next((f for f in leaders if _searches_patch_size(space, f)), None)
    if local is not None:
        queued.append({REFINE_PREFIX + AUGMENTATION_KEY: local})
    for params in queued[:n_refine]:
        study.enqueue_trial(params, skip_if_exists=True)
    return leaders


def rerun_interrupted_trials(
    study: optuna.Study, recover: Callable[[int], float | None] | None = None,
    keep: Collection[int] = (),
) -> list[int]:
    """Settle trials left RUNNING by a process that died: every RUNNING trial but those
    in ``keep`` (reserved by a runner still alive). If ``recover(number)`` knows the
    trial's loss (the caller stored its result before dying), the trial is completed with
    it; otherwise it is marked FAIL and its parameters are queued again, so it is rerun.
    Call it only inside a turn of the study's gate (:data:`TrialGate`), which tells live
    reservations apart. Returns the numbers of the trials queued again."""
    interrupted = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    rerun = []
    for t in interrupted:
        if t.number in keep:
            continue
        stored = recover(t.number) if recover is not None else None
        if stored is not None:
            study.tell(t.number, stored)
            continue
        if FAILED_REASON in t.user_attrs:
            # It failed on its own (out of memory, a non-finite loss) and the process died
            # before Optuna recorded it: settle it as failed, do not run it again.
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            continue
        rerun.append(t.number)
        # Optuna's public API cannot set an attribute on a trial this process did not start,
        # so the reason is kept on the study (read it with ``failed_reason``).
        study.set_user_attr(_interrupted_key(t.number),
                            "interrupted: the process running it stopped")
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        # A trial that died before sampling has only its queued (fixed) parameters.
        params = t.params or t.system_attrs.get("fixed_params") or {}
        if params:
            study.enqueue_trial(dict(params), skip_if_exists=False)
    return rerun


def _interrupted_key(number: int) -> str:
    return f"trial_{number}.failed_reason"


def failed_reason(study: optuna.Study, t: optuna.trial.FrozenTrial) -> str | None:
    """Why a FAIL trial failed: out of memory or a non-finite loss (set while it ran), or
    interrupted with its process (set when a resumed study settled it); None if unknown."""
    reason = t.user_attrs.get(FAILED_REASON) or study.user_attrs.get(_interrupted_key(t.number))
    return None if reason is None else str(reason)


def _record(t: optuna.trial.FrozenTrial, result: TrialResult | None) -> TrialRecord:
    params = dict(t.user_attrs.get("params", {}))
    duration = t.duration.total_seconds() if t.duration is not None else None
    value = t.value if t.state == optuna.trial.TrialState.COMPLETE else None
    family = t.params.get(AUGMENTATION_KEY, t.params.get(REFINE_PREFIX + AUGMENTATION_KEY))
    steps = t.user_attrs.get("train_steps")
    return TrialRecord(
        number=t.number, state=t.state.name, augmentation=family,
        params=params, validation_loss=value, duration_s=duration, result=result,
        stage=t.user_attrs.get("stage"), train_steps=None if steps is None else int(steps),
        losses=dict(t.user_attrs.get("losses", {})),
    )


class GateHold(Protocol):
    """One turn at the study's budget (see :data:`TrialGate`): the trials other runners of
    the study have reserved, and the reservation of this one."""

    reserved: frozenset[int]

    def reserve(self, number: int | None) -> None: ...


#: Opens one turn at the budget. Whoever runs a study's trials (one process, or several
#: workers at once, each a slot of the job: worker/manager.py's ``trial_gate``) decides
#: inside a turn which trial to start next; turns of one study never overlap, so the budget
#: is never overrun and a trial left running by a runner that died (running in the study,
#: reserved by no one) is told apart from one running elsewhere.
TrialGate = Callable[[], AbstractContextManager[GateHold]]

@dataclass
class _AloneHold:
    reserved: frozenset[int] = frozenset()

    def reserve(self, number: int | None) -> None:
        pass


def run_alone() -> AbstractContextManager[GateHold]:
    """The gate of a study run by one process: nothing else reserves trials."""
    return nullcontext(_AloneHold())


#: How often a runner waiting for the screen to finish elsewhere looks again (seconds).
WAIT_SECONDS = 1.0


class StudyHooks(TypedDict, total=False):
    """How a caller follows and steers a study (every one optional; see run_study_slot)."""

    on_trial: Callable[[int, TrialResult], None]
    should_stop: Callable[[], bool]
    recover: Callable[[int], float | None]
    on_fail: Callable[[int, str, dict[str, ParamValue], str, str | None, int], None]
    on_progress: Callable[[int, int, int, float], None]


def run_study(
    data: PreparedData,
    settings: StudySettings,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    **hooks: Unpack[StudyHooks],
) -> StudyResult:
    """Run (or resume) the study alone until it holds ``n_trials`` finished trials (see
    :func:`run_study_slot`, which this is with a gate that nothing else shares)."""
    result = run_study_slot(data, settings, storage, study_name, gate=run_alone, **hooks)
    assert result is not None  # alone, nothing else can be running its last trials
    return result


def run_study_slot(
    data: PreparedData,
    settings: StudySettings,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    gate: TrialGate = run_alone,
    wait_seconds: float = WAIT_SECONDS,
    **hooks: Unpack[StudyHooks],
) -> StudyResult | None:
    """Run trials of the study, one at a time, until its plan is used up; with a shared
    ``gate``, other runners (workers) run trials of the same study at once.

    Each trial starts in a turn of the ``gate``: trials left running by a runner that died
    are settled first (:func:`rerun_interrupted_trials`, with ``recover``), then the
    strategy's next trial is reserved (a staged study's refine stage starts only once
    every screen trial has finished, here or elsewhere: until then this runner waits,
    checking ``should_stop``). Returns the result if this runner finished the study, or
    None if the study's last trials are running elsewhere (their runner finishes it).

    The ``hooks``: ``on_trial(number, result)`` is called for each finished trial *before*
    Optuna records it as complete, so a caller that persists results (the service) never
    has a trial complete in the study but missing from its own tables; if it raises, the
    trial is failed and the study stops. ``should_stop()`` is checked between trials and at
    every training step; when it returns True the running trial's configuration is queued
    again (a resumed study reruns it) and :class:`TrialInterrupted` propagates.

    A trial that runs out of device memory, or whose loss is not finite, is marked FAIL
    with its reason (``on_fail(number, family, params, reason, stage, train_steps)``) and
    the study goes on; it counts against ``n_trials``. Any other exception ends the study.
    The best trial is the completed full-length one with the lowest rank sum under the
    objective and MMD (ssad_common.strategy.selectable).
    ``on_progress(number, step, steps, loss)`` reports the running trial's training (see
    ``run_trial``'s ``progress``).
    """
    on_trial, should_stop, recover = (hooks.get("on_trial"), hooks.get("should_stop"),
                                      hooks.get("recover"))
    on_fail, on_progress = hooks.get("on_fail"), hooks.get("on_progress")
    study = create_study(settings, storage, study_name)
    plan = settings.plan
    results: dict[int, TrialResult] = {}
    failures: list[str] = []
    leaders: list[str] = []

    def fail(trial: optuna.Trial, family: str, params: dict[str, ParamValue],
             reason: str, stage: str | None, train_steps: int) -> NoReturn:
        trial.set_user_attr(FAILED_REASON, reason)
        failures.append(f"trial {trial.number} ({family}): {reason}")
        if on_fail is not None:
            on_fail(trial.number, family, params, reason, stage, train_steps)
        raise TrialFailed(reason)

    def objective(trial: optuna.Trial, stage: str | None) -> float:
        if stage == REFINE:
            family, params = sample_configuration(trial, settings.search_space, leaders,
                                                  REFINE_PREFIX)
        else:
            family, params = sample_configuration(trial, settings.search_space)
        train = settings.train
        if stage == SCREEN:
            train = dataclasses.replace(train, steps=plan.screen_steps)
        trial.set_user_attr("params", params)
        trial.set_user_attr("train_steps", train.steps)
        if stage is not None:
            trial.set_user_attr("stage", stage)
        prune = settings.pruning and stage != SCREEN

        def report(step: int, value: float) -> bool:
            trial.report(value, step)
            return trial.should_prune()

        def progress(step: int, steps: int, loss: float) -> None:
            if on_progress is not None:
                on_progress(trial.number, step, steps, loss)

        try:
            if should_stop is not None and should_stop():
                raise TrialInterrupted("stopped between trials")
            result = run_trial(
                data, family, params, train, objective=settings.objective,
                contamination=settings.contamination, seed=settings.seed + trial.number,
                report=report if prune else None, should_stop=should_stop,
                progress=progress if on_progress is not None else None,
            )
        except TrialPruned as exc:
            raise optuna.TrialPruned(str(exc)) from None
        except TrialInterrupted:
            _queue_again(study, trial)
            raise
        except Exception as exc:
            reason = out_of_memory_reason(exc)
            if reason is None:
                raise
            fail(trial, family, params, reason, stage, train.steps)
        if not math.isfinite(result.validation_loss):
            fail(trial, family, params, f"the validation loss is not finite "
                                        f"({result.validation_loss})", stage, train.steps)
        result = dataclasses.replace(result, stage=stage)
        # Written before the caller's copy, so that nothing but Optuna's own tell can fail
        # once the result is stored (a failure in between would rerun a stored trial).
        trial.set_user_attr("losses", result.losses)
        trial.set_user_attr("timings", result.timings)
        # The caller's copy first: if the study's storage fails next, the result survives
        # and a resumed study completes this trial from it (``recover``).
        if on_trial is not None:
            try:
                on_trial(trial.number, result)
            except BaseException:
                # Not stored (a database outage, a lost lease): a resumed study runs this
                # configuration again instead of drawing another in its place.
                _queue_again(study, trial)
                raise
        results[trial.number] = result
        return result.validation_loss

    while True:
        with gate() as hold:
            step, stage = _next_step(study, settings, hold, recover, leaders)
            if isinstance(step, optuna.Trial):
                hold.reserve(step.number)
            elif step == _FINISH:
                hold.reserve(FINISHING)
        if step == _LEAVE:
            return None
        if step == _FINISH:
            break
        if step == _WAIT:
            _wait(wait_seconds, should_stop)
            continue
        assert isinstance(step, optuna.Trial)
        _run_one(study, step, stage, objective)
    trials = [_record(t, results.get(t.number)) for t in study.get_trials(deepcopy=False)]
    eligible = selectable(t for t in trials if t.state == "COMPLETE")
    if not eligible:
        detail = f"; first failure: {failures[0]}" if failures else ""
        raise RuntimeError(f"no trial completed: every trial failed or was pruned{detail}")
    return StudyResult(best=eligible[0], trials=trials, study_name=study.study_name,
                       plan=plan, leaders=leaders)


_WAIT, _LEAVE, _FINISH = "wait", "leave", "finish"


def _next_step(study: optuna.Study, settings: StudySettings, hold: GateHold,
               recover: Callable[[int], float | None] | None,
               leaders: list[str]) -> tuple[optuna.Trial | str, str | None]:
    """Inside a turn of the gate: the next trial to run (asked of the study, so it is
    RUNNING there before the turn ends) and its stage, or wait, leave or finish."""
    queue_start(study, settings)
    rerun_interrupted_trials(study, recover, keep=hold.reserved)
    trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]

    def used(stage: str | None) -> int:
        return sum(1 for t in trials
                   if (_counted(t) or t.state == optuna.trial.TrialState.RUNNING)
                   and _stage(t, settings.strategy) == stage)

    plan = settings.plan
    if settings.strategy != "staged":
        stage: str | None = None if used(None) < settings.n_trials else _FINISH
    elif used(SCREEN) < plan.n_screen:
        stage = SCREEN
    elif any(_stage(t, settings.strategy) == SCREEN for t in running):
        return _WAIT, None  # the refine stage's leaders need every screen result
    else:
        if not leaders:
            leaders.extend(start_refine(study, settings))
        stage = REFINE if used(REFINE) < plan.n_refine else _FINISH
    if stage == _FINISH:
        return (_LEAVE if running or FINISHING in hold.reserved else _FINISH), None
    return study.ask(), stage


def _run_one(study: optuna.Study, trial: optuna.Trial, stage: str | None,
             objective: Callable[[optuna.Trial, str | None], float]) -> None:
    """Run one asked trial and tell the study how it ended (as ``Study.optimize`` would):
    complete, pruned, failed (TrialFailed: the study goes on), or failed and raised."""
    try:
        value = objective(trial, stage)
    except optuna.TrialPruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return
    except TrialFailed:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    except BaseException:
        # skip_if_finished: another runner may have settled it already (see _queue_again).
        study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        raise
    study.tell(trial, value)


def _queue_again(study: optuna.Study, trial: optuna.Trial) -> None:
    """Queue an interrupted trial's configuration again, so that it is rerun rather than
    replaced by a new draw, unless the trial is no longer running: then another runner's
    turn at the gate found this runner's slot expired and already queued it again."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if any(t.number == trial.number for t in running):
        study.enqueue_trial(dict(trial.params), skip_if_exists=False)


def _wait(seconds: float, should_stop: Callable[[], bool] | None) -> None:
    """Wait for trials running elsewhere, stopping early if asked to."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if should_stop is not None and should_stop():
            raise TrialInterrupted("stopped while waiting for the screen to finish")
        time.sleep(min(0.1, seconds))
