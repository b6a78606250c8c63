"""How a study spends its budget (method.md §5): the plan, as plain data.

The budget of a tuning job is ``n_trials`` *trial-equivalents*: ``n_trials × train_steps``
training steps of the detector. Two strategies spend it:

``staged`` (the default)
    1. **Screen**: every family once at its default hyperparameters, each trained for a
       fraction of ``train_steps`` (at least ``1 / SCREEN_TRIALS_PER_EQUIVALENT`` of it).
       The screen takes at least ``SCREEN_SHARE`` of the budget (in whole
       trial-equivalents, rounded down) and at most half of it: when the families alone
       would cost less (a small space: 3 families screen in one trial-equivalent), the
       rest of its share screens more configurations of the families with something to
       search (``screen_extra``: first every other fill and direction, then patch sizes
       and other numbers drawn at random, each to the family screened least so far), so
       one default fill cannot drop a family. The 12 default families fill
       the share exactly (3 of the default 12 trial-equivalents).
       A budget too small to screen every family screens the first ones in the space's
       order and names the rest.
    2. **Refine**: the rest of the budget as full-length trials over the *leaders* (the
       ``LEADERS`` families with the lowest screen loss, plus the best local family with a
       searched patch size, so the patch size is always searched): each leader once at its
       best screened configuration, one more trial of the best local family, then TPE over
       the leaders' hyperparameters. Only full-length trials can be chosen as the best,
       by the sum of their ranks under the objective and under MMD (:func:`ranked`).

``tpe``
    The study before issue 11: one full-length trial per family at its defaults (in the
    space's order, as many as the budget allows), then TPE over every family.

If the budget cannot screen every family, the families left out are named
(``skipped_families``) in the job's plan. This module is torch-free: the API states the
plan when a job is created, and the worker runs it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeVar, cast, get_args

StrategyName = Literal["staged", "tpe"]
STRATEGIES: Final[tuple[StrategyName, ...]] = get_args(StrategyName)
DEFAULT_STRATEGY: Final[StrategyName] = "staged"

#: Screen trials per trial-equivalent, at most: a screen trial trains for at least
#: ``train_steps / 4`` (more when fewer families share the screen's whole equivalents).
SCREEN_TRIALS_PER_EQUIVALENT: Final = 4
#: The screen's share of the budget, at least (whole trial-equivalents, rounded down).
SCREEN_SHARE: Final = 0.25
#: Families carried from the screen to the refine stage (plus the best local family).
LEADERS: Final = 2
#: A trial's stage under the staged strategy (``job_trials.stage``; None under tpe).
SCREEN: Final = "screen"
REFINE: Final = "refine"
#: What a runner of a study reserves while it finishes it (trial numbers are never
#: negative): the study's other runners (parallel trials) see it and leave.
FINISHING: Final = -1


#: The second loss the result is chosen with (see :func:`selectable`).
SECOND_OPINION: Final = "mmd"


class _Trial(Protocol):
    @property
    def number(self) -> int: ...
    @property
    def stage(self) -> str | None: ...
    @property
    def validation_loss(self) -> float | None: ...
    @property
    def losses(self) -> Mapping[str, float]: ...


T = TypeVar("T", bound=_Trial)


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of ``values``, lowest first; tied values share their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _finite(value: object) -> float:
    """A stored loss as a number to rank by: anything but a finite number ranks last."""
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return math.inf


def ranked(completed: Iterable[T]) -> list[tuple[float, T]]:
    """The completed trials the result is chosen among, best first, each with its
    selection score: the full-length ones (the screen's when no full-length trial
    completed), scored by their rank under the study's objective (``validation_loss``)
    plus their rank under MMD (``SECOND_OPINION``), lower is better; ties go to the lower
    loss, then the earlier trial. A trial with no finite MMD ranks last by it.

    Why two losses: DSV, the default objective, rewards augmentations that land far from
    the train set, MMD rewards near ones. The objective alone still drives the search;
    this rule only chooses among its trials. Its history: chosen on the development runs
    (2026-12-01), dropped for the objective alone after three held-out sets (21 runs)
    where it was slightly worse (2026-12-02), and back once every recorded study could be
    replayed: over 146 runs its median regret is 0.006 against the objective alone's
    0.016, and it beats the mean configuration on 90 % against 81 % (docs/benchmarks.md §7,
    *The rank sum of DSV and MMD, back*)."""
    done = [t for t in completed if t.validation_loss is not None]
    full = [t for t in done if t.stage != SCREEN] or done
    second = [_finite(t.losses.get(SECOND_OPINION)) for t in full]
    score = [a + b for a, b in zip(
        _ranks([cast(float, t.validation_loss) for t in full]), _ranks(second), strict=True)]
    order = sorted(range(len(full)),
                   key=lambda i: (score[i], full[i].validation_loss, full[i].number))
    return [(score[i], full[i]) for i in order]


def selectable(completed: Iterable[T]) -> list[T]:
    """The completed trials the result is chosen among, best first (:func:`ranked`). The
    one rule behind the study's best, the job's ``best`` and ``selection``, and
    ``?ensemble=k``."""
    return [t for _, t in ranked(completed)]


#: ``selection.trust``: a choice is "decisive" when the top configurations agree on at
#: least this share of the images they flag (mean Jaccard overlap), "uncertain" below.
#: Read off the development runs (docs/benchmarks.md §7, *A trust verdict*): every run at
#: or above it had regret ≤ 0.016 and beat fixed CutPaste; every run below, regret ≥ 0.035.
TRUST_AGREEMENT: Final = 0.5
Trust = Literal["decisive", "uncertain"]


def trust(agreement_jaccard: float | None) -> Trust | None:
    """How far to trust a study's choice, from its top configurations' agreement (None:
    one candidate, nothing to compare it with)."""
    if agreement_jaccard is None:
        return None
    return "decisive" if agreement_jaccard >= TRUST_AGREEMENT else "uncertain"


@dataclass(frozen=True)
class StudyPlan:
    """What a study will run: ``screen_families`` at their defaults and one more
    configuration of each family in ``screen_extra`` (in that order), at ``screen_steps``
    each, then ``n_refine`` trials at ``train_steps``. ``total_steps`` never exceeds the
    budget."""

    strategy: StrategyName
    n_trials: int
    train_steps: int
    screen_families: tuple[str, ...]
    screen_steps: int
    n_refine: int
    skipped_families: tuple[str, ...]
    screen_extra: tuple[str, ...] = ()

    @property
    def n_screen(self) -> int:
        return len(self.screen_families) + len(self.screen_extra)

    @property
    def total_trials(self) -> int:
        return self.n_screen + self.n_refine

    @property
    def total_steps(self) -> int:
        return self.n_screen * self.screen_steps + self.n_refine * self.train_steps

    @property
    def budget_steps(self) -> int:
        return self.n_trials * self.train_steps

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy, "budget_trial_equivalents": self.n_trials,
            "budget_train_steps": self.budget_steps, "planned_train_steps": self.total_steps,
            "screen": {"trials": self.n_screen, "train_steps_each": self.screen_steps,
                       "families": list(self.screen_families),
                       "extra": list(self.screen_extra)},
            "refine": {"trials": self.n_refine, "train_steps_each": self.train_steps},
            "skipped_families": list(self.skipped_families),
        }


def _screen_extra(screened: Sequence[str], want: int, capacity: Mapping[str, float],
                  choices: Mapping[str, int]) -> list[str]:
    """``want`` more screen configurations of ``screened``, one at a time, each to the
    family screened least so far (the space's order breaks ties): first among the families
    with one of their choices (fill, direction) not yet screened, so every fill is tried
    before any is tried twice; then among those with any ``capacity`` left."""
    count = dict.fromkeys(screened, 1)
    extra: list[str] = []
    for quota in ({f: min(choices.get(f, 0), capacity.get(f, 0)) for f in screened},
                  {f: capacity.get(f, 0) for f in screened}):
        while len(extra) < want:
            open_ = [f for f in screened if count[f] - 1 < quota[f]]
            if not open_:
                break
            family = min(open_, key=count.__getitem__)
            count[family] += 1
            extra.append(family)
    return extra


def plan_study(strategy: str, n_trials: int, train_steps: int,
               families: Sequence[str], capacity: Mapping[str, float] | None = None,
               choices: Mapping[str, int] | None = None) -> StudyPlan:
    """The plan for a budget of ``n_trials`` full-length trials over ``families`` (in the
    search space's order, which is also the order families are screened in when the
    budget cannot screen them all). ``capacity``: how many configurations besides its
    defaults each family has to screen (``math.inf`` when it searches a number; see
    ``SearchSpace.screen_capacity``); without it, each family is screened at its defaults
    only. ``choices``: how many of those are other combinations of its searched choices
    (``SearchSpace.screen_choices``), which the screen covers first."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {list(STRATEGIES)}")
    if n_trials < 1 or train_steps < 1 or not families:
        raise ValueError("a plan needs n_trials >= 1, train_steps >= 1 and a family")
    fams = tuple(families)
    if strategy == "tpe":
        screened = fams[:n_trials]
        return StudyPlan("tpe", n_trials, train_steps, screened, train_steps,
                         n_trials - len(screened), fams[len(screened):])
    # Screen as many families as fit in half the budget, always keeping at least one
    # full-length trial for the refine stage; a screen trial trains for at least one step.
    per_equivalent = min(SCREEN_TRIALS_PER_EQUIVALENT, train_steps)
    n_screen = min(len(fams), (n_trials // 2) * per_equivalent,
                   (n_trials - 1) * per_equivalent)
    if n_screen < 2:
        # Nothing to screen between (one family), or no budget to screen and refine: the
        # first family's trials are all full length.
        return StudyPlan("staged", n_trials, train_steps, (), train_steps, n_trials, fams[1:])
    screened = fams[:n_screen]
    # The rest of the screen's share: more configurations of the screened families.
    want = max(0, int(n_trials * SCREEN_SHARE) * per_equivalent - n_screen)
    extra = _screen_extra(screened, want, capacity or {}, choices or {})
    screen_equivalents = math.ceil((n_screen + len(extra)) / per_equivalent)
    screen_steps = screen_equivalents * train_steps // (n_screen + len(extra))
    return StudyPlan("staged", n_trials, train_steps, screened, screen_steps,
                     n_trials - screen_equivalents, fams[n_screen:], tuple(extra))


class Space(Protocol):
    """What a plan needs of a search space (ssad_common.search_space.SearchSpace)."""

    @property
    def augmentations(self) -> tuple[str, ...]: ...

    def screen_capacity(self) -> dict[str, float]: ...

    def screen_choices(self) -> dict[str, int]: ...


def plan_for(strategy: str, n_trials: int, train_steps: int, space: Space) -> StudyPlan:
    """The plan of a study over ``space`` (what the API states and the worker runs)."""
    return plan_study(strategy, n_trials, train_steps, space.augmentations,
                      space.screen_capacity(), space.screen_choices())
