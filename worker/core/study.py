"""The search strategy (method.md §5): an Optuna study over family × hyperparameters.

Each trial samples the augmentation family (categorical) and then only that family's
hyperparameters (define-by-run, so the space is conditional), trains a detector through
:func:`worker.core.trial.run_trial` and returns the validation loss; the study minimises it.
The sampler is a seeded TPE. By default the study starts with one trial per family at its
default hyperparameters (``warm_start``), so even a small budget sees every family once
before TPE refines the best ones. Storage is whatever the caller passes (in memory, or an
RDB URL so a restarted study keeps its finished trials).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

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
from worker.core.data import PreparedData
from worker.core.device import out_of_memory_reason
from worker.core.objectives import get_objective
from worker.core.training import TrainSettings, TrialInterrupted, TrialPruned
from worker.core.trial import TrialResult, run_trial

AUGMENTATION_KEY = "augmentation"
FAILED_REASON = "error"  # the trial's user attribute naming why it failed


@dataclass(frozen=True)
class StudySettings:
    n_trials: int = DEFAULT_N_TRIALS
    objective: str = DEFAULT_OBJECTIVE
    contamination: float = DEFAULT_CONTAMINATION
    seed: int = DEFAULT_SEED
    search_space: SearchSpace = field(default_factory=SearchSpace)
    train: TrainSettings = field(default_factory=TrainSettings)
    warm_start: bool = True
    pruning: bool = False

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            raise ValueError("n_trials must be >= 1")
        get_objective(self.objective)
        if not 0.0 < self.contamination < 1.0:
            raise ValueError("contamination must be in (0, 1)")
        if self.pruning and not self.train.eval_every:
            raise ValueError("pruning needs train.eval_every > 0 (intermediate losses)")


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

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "number": self.number, "state": self.state, "augmentation": self.augmentation,
            "params": self.params, "validation_loss": self.validation_loss,
            "duration_s": self.duration_s,
        }
        if self.result is not None:
            out["losses"] = self.result.losses
            out["timings"] = self.result.timings
        return out


@dataclass(frozen=True)
class StudyResult:
    best: TrialRecord
    trials: list[TrialRecord]
    study_name: str

    @property
    def best_scores(self) -> np.ndarray | None:
        return None if self.best.result is None else self.best.result.scores


def sample_configuration(
    trial: optuna.trial.BaseTrial, space: SearchSpace
) -> tuple[str, dict[str, ParamValue]]:
    """Define-by-run: the family first, then only that family's searched hyperparameters.

    Parameter names are prefixed with the family (``cutout.patch_size``) so TPE keeps a
    separate model of each family's ranges.
    """
    family = str(trial.suggest_categorical(AUGMENTATION_KEY, list(space.augmentations)))
    sampled: dict[str, ParamValue] = {}
    for p in space.searched_params(family):
        key = f"{family}.{p.name}"
        if isinstance(p, FloatParam):
            sampled[p.name] = trial.suggest_float(key, p.low, p.high, log=p.log)
        elif isinstance(p, CategoricalParam):
            sampled[p.name] = str(trial.suggest_categorical(key, list(p.choices)))
    return family, space.complete(family, sampled)


def warm_start_configurations(space: SearchSpace) -> list[dict[str, Any]]:
    """One Optuna parameter dict per family: its defaults, clipped into the searched range."""
    out = []
    for family in space.augmentations:
        params: dict[str, Any] = {AUGMENTATION_KEY: family}
        for p in space.searched_params(family):
            value = p.default
            if isinstance(p, FloatParam):
                value = min(max(float(value), p.low), p.high)
            params[f"{family}.{p.name}"] = value
        out.append(params)
    return out


def make_sampler(settings: StudySettings) -> optuna.samplers.BaseSampler:
    n_startup = len(settings.search_space.augmentations) if settings.warm_start else 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=settings.seed, multivariate=True, group=True,
            n_startup_trials=min(n_startup, max(1, settings.n_trials - 1)),
        )


def create_study(
    settings: StudySettings, storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
) -> optuna.Study:
    """Create, or load if it exists in ``storage``, the study (minimising the loss)."""
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
        if settings.pruning else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        storage=storage, study_name=study_name, direction="minimize",
        sampler=make_sampler(settings), pruner=pruner, load_if_exists=True,
    )
    if settings.warm_start and not study.trials:
        for params in warm_start_configurations(settings.search_space)[: settings.n_trials]:
            study.enqueue_trial(params, skip_if_exists=True)
    return study


def rerun_interrupted_trials(
    study: optuna.Study, recover: Callable[[int], float | None] | None = None
) -> list[int]:
    """Settle trials left RUNNING by a process that died. If ``recover(number)`` knows the
    trial's loss (the caller stored its result before dying), the trial is completed with
    it; otherwise it is marked FAIL and its parameters are queued again, so it is rerun.
    Only the holder of a study may call this (the service's job lease guarantees one runner
    per study). Returns the numbers of the trials queued again."""
    interrupted = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    rerun = []
    for t in interrupted:
        stored = recover(t.number) if recover is not None else None
        if stored is not None:
            study.tell(t.number, stored)
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
    return TrialRecord(
        number=t.number, state=t.state.name, augmentation=t.params.get(AUGMENTATION_KEY),
        params=params, validation_loss=value, duration_s=duration, result=result,
    )


def run_study(
    data: PreparedData,
    settings: StudySettings,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    on_trial: Callable[[int, TrialResult], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    recover: Callable[[int], float | None] | None = None,
    on_fail: Callable[[int, str, dict[str, ParamValue], str], None] | None = None,
    on_progress: Callable[[int, int, int, float], None] | None = None,
) -> StudyResult:
    """Run (or resume) the study until it holds ``n_trials`` finished trials.

    ``on_trial(number, result)`` is called for each finished trial *before* Optuna records
    it as complete, so a caller that persists results (the service) never has a trial
    complete in the study but missing from its own tables; if it raises, the trial is
    failed and the study stops. ``should_stop()`` is checked between trials and at every
    training step; when it returns True the running trial's configuration is queued again
    (a resumed study reruns it) and :class:`TrialInterrupted` propagates. ``recover`` is
    passed to :func:`rerun_interrupted_trials` when a study is resumed.

    A trial that runs out of device memory, or whose loss is not finite, is marked FAIL
    with its reason (``on_fail(number, family, params, reason)``) and the study goes on; it
    counts against ``n_trials``. Any other exception ends the study. The best trial is the
    completed one with the lowest loss. ``on_progress(number, step, steps, loss)`` reports
    the running trial's training (see ``run_trial``'s ``progress``).
    """
    study = create_study(settings, storage, study_name)
    results: dict[int, TrialResult] = {}
    failures: list[str] = []

    def fail(trial: optuna.Trial, family: str, params: dict[str, ParamValue],
             reason: str) -> NoReturn:
        trial.set_user_attr(FAILED_REASON, reason)
        failures.append(f"trial {trial.number} ({family}): {reason}")
        if on_fail is not None:
            on_fail(trial.number, family, params, reason)
        raise TrialFailed(reason)

    def objective(trial: optuna.Trial) -> float:
        family, params = sample_configuration(trial, settings.search_space)
        trial.set_user_attr("params", params)

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
                data, family, params, settings.train, objective=settings.objective,
                contamination=settings.contamination, seed=settings.seed + trial.number,
                report=report if settings.pruning else None, should_stop=should_stop,
                progress=progress if on_progress is not None else None,
            )
        except TrialPruned as exc:
            raise optuna.TrialPruned(str(exc)) from None
        except TrialInterrupted:
            study.enqueue_trial(dict(trial.params), skip_if_exists=False)
            raise
        except Exception as exc:
            reason = out_of_memory_reason(exc)
            if reason is None:
                raise
            fail(trial, family, params, reason)
        if not math.isfinite(result.validation_loss):
            fail(trial, family, params, f"the validation loss is not finite "
                                        f"({result.validation_loss})")
        # The caller's copy first: if the study's storage fails next, the result survives
        # and a resumed study completes this trial from it (``recover``).
        if on_trial is not None:
            on_trial(trial.number, result)
        results[trial.number] = result
        trial.set_user_attr("losses", result.losses)
        trial.set_user_attr("timings", result.timings)
        return result.validation_loss

    rerun_interrupted_trials(study, recover)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = settings.n_trials - len(study.get_trials(deepcopy=False, states=finished))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, gc_after_trial=False,
                       catch=(TrialFailed,))
    trials = [_record(t, results.get(t.number)) for t in study.get_trials(deepcopy=False)]
    complete = [t for t in trials if t.state == "COMPLETE" and t.validation_loss is not None]
    if not complete:
        detail = f"; first failure: {failures[0]}" if failures else ""
        raise RuntimeError(f"no trial completed: every trial failed or was pruned{detail}")
    best = min(complete, key=lambda t: (t.validation_loss, t.number))
    return StudyResult(best=best, trials=trials, study_name=study.study_name)
