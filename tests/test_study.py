"""The Optuna study: conditional space, warm start, seeded, resumable from storage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from ssad_common.search_space import SearchSpace
from tests.helpers import by_selection_rule
from worker.core.data import prepare
from worker.core.study import (
    StudyResult,
    StudySettings,
    TrialRecord,
    create_study,
    failed_reason,
    queue_start,
    run_study,
    sample_configuration,
    warm_start_configurations,
)
from worker.core.training import TrainSettings, TrialInterrupted
from worker.core.trial import TrialResult

TINY = TrainSettings(steps=4, batch_size=8, width=8)


@pytest.fixture(scope="module")
def data(digits: tuple[np.ndarray, np.ndarray, np.ndarray]):  # type: ignore[no-untyped-def]
    train, test, _ = digits
    return prepare(train[:40], test[:30], torch.device("cpu"))


def test_space_is_conditional_define_by_run() -> None:
    space = SearchSpace.from_dict({"augmentations": ["cutout", "rotate", "invert"],
                                   "patch_size": [0.01, 0.2]})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        t = study.ask()
        family, params = sample_configuration(t, space)
        keys = set(t.params) - {"augmentation"}
        assert all(k.startswith(family + ".") for k in keys)
        if family == "cutout":
            assert 0.01 <= float(params["patch_size"]) <= 0.2
            assert params["aspect"] == 1.0  # not searched: default
        seen.add(family)
        study.tell(t, 0.0)
    assert seen == {"cutout", "rotate", "invert"}


def test_warm_start_is_one_trial_per_family_at_defaults() -> None:
    space = SearchSpace.from_dict({"augmentations": ["noise", "cutout"]})
    assert warm_start_configurations(space) == [
        {"augmentation": "noise", "noise.std": 0.1},
        {"augmentation": "cutout", "cutout.patch_size": 0.05, "cutout.fill": "grey"},
    ]


def test_study_runs_warm_start_then_tpe_and_picks_by_the_selection_rule(data) -> None:  # type: ignore[no-untyped-def]
    space = SearchSpace.from_dict({"augmentations": ["cutout", "rotate"]})
    calls: list[int] = []
    settings = StudySettings(n_trials=4, search_space=space, train=TINY, seed=1,
                             strategy="tpe")
    result = run_study(data, settings, on_trial=lambda n, r: calls.append(n))
    assert calls == [0, 1, 2, 3]
    assert [t.augmentation for t in result.trials[:2]] == ["cutout", "rotate"]
    assert result.trials[0].params == {"patch_size": 0.05, "aspect": 1.0, "fill": "grey",
                                       "placement": "object"}
    losses = [t.validation_loss for t in result.trials]
    assert result.best.number == by_selection_rule(result.trials)[0][1]
    assert result.best_scores is not None and len(result.best_scores) == len(data.test)
    again = run_study(data, settings)
    assert [t.params for t in again.trials] == [t.params for t in result.trials]
    assert [t.validation_loss for t in again.trials] == losses


def test_restarted_study_keeps_finished_trials_and_reruns_the_interrupted_one(
    data, tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    space = SearchSpace.from_dict({"augmentations": ["invert", "flip", "mask", "noise"]})
    settings = StudySettings(n_trials=4, search_space=space, train=TINY, strategy="tpe")
    first: list[int] = []
    with pytest.raises(TrialInterrupted):  # a graceful stop during the third trial
        run_study(data, settings, storage=storage, study_name="job-1",
                  on_trial=lambda n, r: first.append(n), should_stop=lambda: len(first) >= 2)
    assert first == [0, 1]
    # A process that died mid-trial leaves that trial RUNNING in the storage.
    orphan = optuna.load_study(study_name="job-1", storage=storage).ask()
    assert orphan.suggest_categorical("augmentation", list(space.augmentations)) in (
        "mask", "noise")  # both are queued: the interrupted one went back in the queue

    second: list[int] = []
    result = run_study(data, settings, storage=storage, study_name="job-1",
                       on_trial=lambda n, r: second.append(n))
    assert len(second) == 2  # only the two missing configurations ran
    done = [(t.augmentation, t.state) for t in result.trials]
    assert done[:2] == [("invert", "COMPLETE"), ("flip", "COMPLETE")]
    assert sorted(a for a, s in done if s == "COMPLETE") == ["flip", "invert", "mask", "noise"]
    assert result.trials[0].result is None and result.trials[-1].result is not None
    # The orphan was failed through Optuna's public API, with its reason kept.
    study = optuna.load_study(study_name="job-1", storage=storage)
    settled = study.trials[orphan.number]
    assert settled.state == optuna.trial.TrialState.FAIL
    assert failed_reason(study, settled) == "interrupted: the process running it stopped"


def test_a_trial_stored_before_the_crash_is_completed_not_rerun(
    data, tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    space = SearchSpace.from_dict({"augmentations": ["invert", "flip"]})
    settings = StudySettings(n_trials=2, search_space=space, train=TINY, strategy="tpe")
    study = optuna.create_study(storage=storage, study_name="job-2")
    orphan = study.ask()  # died after its result was stored by the caller
    orphan.suggest_categorical("augmentation", list(space.augmentations))
    ran: list[int] = []
    result = run_study(data, settings, storage=storage, study_name="job-2",
                       on_trial=lambda n, r: ran.append(n),
                       recover=lambda n: -5.0 if n == orphan.number else None)
    assert result.trials[0].state == "COMPLETE" and result.trials[0].validation_loss == -5.0
    assert len(ran) == 1 and result.best.number == orphan.number


def test_pruning_stops_trials_worse_than_the_median(data) -> None:  # type: ignore[no-untyped-def]
    """The median pruner (after 4 finished trials) must stop at least one trial early, and
    only one whose intermediate loss was worse than the median of the earlier trials'."""
    storage = optuna.storages.InMemoryStorage()
    settings = StudySettings(
        n_trials=8, search_space=SearchSpace.from_dict({"augmentations": ["invert", "noise"]}),
        train=TrainSettings(steps=6, batch_size=8, width=8, eval_every=2), pruning=True,
        strategy="tpe")
    result = run_study(data, settings, storage=storage)
    assert len(result.trials) == 8
    assert {t.state for t in result.trials} <= {"COMPLETE", "PRUNED"}
    study = optuna.load_study(study_name=result.study_name, storage=storage)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "no trial was pruned"
    for t in pruned:
        step = t.last_step
        assert step is not None and step < settings.train.steps  # stopped before the end
        earlier = [e.intermediate_values[step] for e in study.trials
                   if e.number < t.number and e.state == optuna.trial.TrialState.COMPLETE]
        assert len(earlier) >= 4 and t.intermediate_values[step] > np.median(earlier)
        assert result.trials[t.number].validation_loss is None


def test_non_finite_losses_fail_the_trial_not_the_study(data, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import worker.core.study as study_mod

    real = study_mod.run_trial
    calls = {"n": 0}

    def flaky(*args, **kwargs) -> TrialResult:  # type: ignore[no-untyped-def]
        r = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            return TrialResult(**{**r.__dict__, "validation_loss": float("nan")})
        return r

    monkeypatch.setattr(study_mod, "run_trial", flaky)
    space = SearchSpace.from_dict({"augmentations": ["invert", "flip"]})
    result = run_study(data, StudySettings(n_trials=2, search_space=space, train=TINY,
                                           strategy="tpe"))
    assert [t.state for t in result.trials] == ["FAIL", "COMPLETE"]
    assert result.best.augmentation == "flip"


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        StudySettings(n_trials=0)
    with pytest.raises(ValueError, match="unknown objective"):
        StudySettings(objective="auroc")
    with pytest.raises(ValueError, match="contamination"):
        StudySettings(contamination=1.0)
    with pytest.raises(ValueError, match="eval_every"):
        StudySettings(pruning=True)


def test_a_job_and_the_engine_default_to_the_same_study() -> None:
    """A request that sets nothing, the engine's settings and ``python -m worker.tune``
    without options all run the same study (their defaults come from ssad_common/jobspec.py)."""
    from service.jobs.schemas import JobCreate
    from ssad_common.jobspec import TuneSpec
    from worker.runner import study_settings
    from worker.tune import build_parser

    request = JobCreate(train_dataset_id="a", test_dataset_id="b")
    spec = TuneSpec(**request.model_dump(exclude={"search_space", "parallelism"}))
    assert study_settings(spec) == StudySettings()
    args = build_parser().parse_args(["--train", "a", "--test", "b"])
    assert (args.n_trials, args.objective, args.contamination, args.seed, args.steps,
            args.batch_size, args.scorer, args.strategy) == (
        request.n_trials, request.objective, request.contamination, request.seed,
        request.train_steps, request.batch_size, request.scorer, request.strategy)
    assert request.strategy == "staged"


# ------------------------------------------------------------------ the staged strategy


def _by_stage(result: StudyResult, stage: str) -> list[TrialRecord]:
    return [t for t in result.trials if t.stage == stage]


def test_staged_default_budget_screens_every_family_then_searches_patch_size(data) -> None:  # type: ignore[no-untyped-def]
    """The default study (12 families, 12 trial-equivalents): the screen costs a quarter of
    the budget, the training steps add up to the budget exactly, the best is a full-length
    trial, and the patch size is sampled more than once at full length."""
    settings = StudySettings(train=TrainSettings(steps=8, batch_size=8, width=8))
    assert settings.strategy == "staged" and settings.n_trials == 12
    result = run_study(data, settings)
    screen, refine = _by_stage(result, "screen"), _by_stage(result, "refine")
    assert [t.augmentation for t in screen] == list(settings.search_space.augmentations)
    assert {t.train_steps for t in screen} == {2} and len(refine) == 9
    assert {t.train_steps for t in refine} == {8}
    assert sum(t.train_steps or 0 for t in result.trials) == 12 * 8  # the budget, exactly
    assert result.plan.skipped_families == ()
    assert result.best.stage == "refine"
    assert result.best.number == by_selection_rule(refine)[0][1]
    assert {t.augmentation for t in refine} <= set(result.leaders)
    local = [t for t in refine if "patch_size" in t.params
             and t.augmentation in ("cutout", "cutpaste", "cutpaste-scar")]
    assert len({t.params["patch_size"] for t in local}) >= 2, local
    # The leaders: the two best-screened families, plus the best local one if neither is.
    ranked = [t.augmentation for t in sorted(
        (t for t in screen if t.validation_loss is not None),
        key=lambda t: (t.validation_loss, t.number))]
    best_local = next(f for f in ranked if f in ("cutout", "cutpaste", "cutpaste-scar"))
    assert result.leaders[:2] == ranked[:2]
    assert best_local in result.leaders and len(result.leaders) <= 3


def test_a_small_space_screens_every_fill_and_refines_from_the_best_screened(data) -> None:  # type: ignore[no-untyped-def]
    """Three families, eight trial-equivalents: the screen (a quarter of the budget) tries
    cutout at each of its fills, patch sizes drawn at random, and flip in both directions;
    each leader's first full-length trial is its best screened configuration."""
    space = SearchSpace.from_dict({"augmentations": ["cutout", "flip", "invert"]})
    settings = StudySettings(n_trials=8, search_space=space, train=TINY, leaders=2)
    assert settings.plan.screen_extra == ("cutout", "flip", "cutout", "cutout", "cutout")
    result = run_study(data, settings)
    screen, refine = _by_stage(result, "screen"), _by_stage(result, "refine")
    assert len(screen) == 8 and len(refine) == settings.plan.n_refine == 6
    assert sum(t.train_steps or 0 for t in result.trials) == 8 * TINY.steps
    cutouts = [t.params for t in screen if t.augmentation == "cutout"]
    assert [str(p["fill"]) for p in cutouts] == ["grey", "zero", "mean", "noise", "one"]
    assert len({p["patch_size"] for p in cutouts}) == 5  # the default, then 4 draws
    assert sorted(str(t.params["direction"]) for t in screen
                  if t.augmentation == "flip") == ["horizontal", "vertical"]
    best = {}
    for t in sorted((t for t in screen if t.validation_loss is not None),
                    key=lambda t: (t.validation_loss, t.number)):
        best.setdefault(t.augmentation, t.params)
    assert [(t.augmentation, t.params) for t in refine[:2]] == [
        (f, best[f]) for f in result.leaders[:2]]


def test_queueing_the_screen_again_adds_only_what_is_missing() -> None:
    """A runner that died while queueing the screen leaves part of it queued: the next
    turn queues the rest, repeats included, and nothing twice."""
    space = SearchSpace.from_dict({"augmentations": ["cutpaste", "invert"]})
    settings = StudySettings(n_trials=8, search_space=space, train=TINY)
    study = create_study(settings)
    queue_start(study, settings)
    assert len(study.trials) == settings.plan.n_screen == 8  # cutpaste 7 times
    study.set_user_attr("start_queued", False)
    queue_start(study, settings)
    assert len(study.trials) == 8


def test_a_budget_too_small_for_every_family_names_the_skipped_ones(data) -> None:  # type: ignore[no-untyped-def]
    space = SearchSpace.from_dict({"augmentations": ["invert", "flip", "mask", "noise",
                                                     "rotate", "color"]})
    settings = StudySettings(n_trials=2, search_space=space, train=TINY)
    result = run_study(data, settings)
    assert result.plan.screen_families == ("invert", "flip", "mask", "noise")
    assert result.plan.skipped_families == ("rotate", "color")
    assert {t.augmentation for t in result.trials} <= {"invert", "flip", "mask", "noise"}
    assert len(result.trials) == 5 and sum(t.train_steps or 0 for t in result.trials) == 8


def test_pruned_trials_never_become_the_best_and_count_against_the_budget(data) -> None:  # type: ignore[no-untyped-def]
    storage = optuna.storages.InMemoryStorage()
    settings = StudySettings(
        n_trials=14, search_space=SearchSpace.from_dict({"augmentations": ["invert", "noise"]}),
        train=TrainSettings(steps=6, batch_size=8, width=8, eval_every=2), pruning=True)
    result = run_study(data, settings, storage=storage)
    assert len(result.trials) == result.plan.total_trials == 12 + 11  # 10 more noise screens
    pruned = [t for t in result.trials if t.state == "PRUNED"]
    assert pruned, "no trial was pruned"
    assert all(t.stage == "refine" for t in pruned)  # the short screen is never pruned
    assert result.best.state == "COMPLETE" and result.best.stage == "refine"
    assert result.best.number not in {t.number for t in pruned}


def test_a_resumed_staged_study_keeps_its_leaders_and_its_budget(
    data, tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    space = SearchSpace.from_dict({"augmentations": ["invert", "flip", "mask", "cutout"]})
    settings = StudySettings(n_trials=6, search_space=space, train=TINY, leaders=1)
    plan = settings.plan
    assert (plan.n_screen, plan.n_refine) == (4, 5)
    first: list[int] = []
    with pytest.raises(TrialInterrupted):  # stopped during the second refine trial
        run_study(data, settings, storage=storage, study_name="job-3",
                  on_trial=lambda n, r: first.append(n),
                  should_stop=lambda: len(first) >= plan.n_screen + 1)
    study = optuna.load_study(study_name="job-3", storage=storage)
    leaders = study.user_attrs["refine_leaders"]
    assert "cutout" in leaders and 1 <= len(leaders) <= 2  # 1 leader (+ the best local)
    # Resumed with the leaders' order changed under it would refine other families; the
    # stored leaders are read back instead of chosen again.
    second: list[int] = []
    result = run_study(data, settings, storage=storage, study_name="job-3",
                       on_trial=lambda n, r: second.append(n))
    assert result.leaders == leaders
    assert len(first) + len(second) == plan.total_trials
    assert len(set(first) | set(second)) == plan.total_trials  # no trial stored twice
    done = [t for t in result.trials if t.state == "COMPLETE"]
    assert len(done) == plan.total_trials
    assert sum(t.train_steps or 0 for t in done) == plan.total_steps <= 6 * TINY.steps
    assert {t.augmentation for t in done if t.stage == "refine"} <= set(leaders)


def test_an_interrupted_trial_is_queued_again_once() -> None:
    """A runner whose trial was interrupted queues its configuration again, unless another
    runner already settled it (found its slot expired and queued it itself): then a second
    copy would run the same configuration twice."""
    from worker.core.study import _queue_again, rerun_interrupted_trials

    def waiting(study: optuna.Study) -> int:
        return len(study.get_trials(states=(optuna.trial.TrialState.WAITING,)))

    study = optuna.create_study()
    trial = study.ask()
    trial.suggest_categorical("augmentation", ["invert", "flip"])
    _queue_again(study, trial)  # still running here: queued again
    assert waiting(study) == 1
    other = study.ask()  # pops the queued copy
    other.suggest_categorical("augmentation", ["invert", "flip"])
    assert rerun_interrupted_trials(study, keep={other.number}) == [trial.number]
    assert waiting(study) == 1  # the other runner's turn queued it again
    _queue_again(study, trial)  # the late runner: already settled, nothing more
    assert waiting(study) == 1


def test_a_study_begun_with_fewer_fills_keeps_them_when_resumed() -> None:
    """A study stored before CutOut gained its white fill (four choices) is resumed by a
    worker that knows five: Optuna refuses a categorical parameter whose choices change,
    so the study samples from the four it began with, and a new study from all five."""
    space = SearchSpace.from_dict({"augmentations": ["cutout"]})
    old = ["zero", "mean", "grey", "noise"]
    dists = {"augmentation": optuna.distributions.CategoricalDistribution(["cutout"]),
             "cutout.patch_size": optuna.distributions.FloatDistribution(0.005, 0.5, log=True),
             "cutout.fill": optuna.distributions.CategoricalDistribution(old)}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.add_trial(optuna.trial.create_trial(
        params={"augmentation": "cutout", "cutout.patch_size": 0.05, "cutout.fill": "grey"},
        distributions=dists, value=0.1))
    for _ in range(20):
        trial = study.ask()
        _, params = sample_configuration(trial, space)
        assert params["fill"] in old
        study.tell(trial, 0.0)
    fresh = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = fresh.ask()
    sample_configuration(trial, space)
    assert list(trial.distributions["cutout.fill"].choices) == [*old, "one"]  # type: ignore[attr-defined]
