"""The study's plan (ssad_common/strategy.py): the budget is exact and what it cannot cover
is named. Pure arithmetic, no training."""

from __future__ import annotations

import pytest

from ssad_common.search_space import DEFAULT_AUGMENTATIONS, FAMILIES
from ssad_common.strategy import plan_study


def test_the_default_plan_screens_every_family_in_a_quarter_of_the_budget() -> None:
    plan = plan_study("staged", 12, 400, DEFAULT_AUGMENTATIONS)
    assert plan.screen_families == DEFAULT_AUGMENTATIONS and plan.skipped_families == ()
    assert (plan.n_screen, plan.screen_steps, plan.n_refine) == (12, 100, 9)
    assert plan.n_screen * plan.screen_steps == plan.budget_steps // 4
    assert plan.total_steps == plan.budget_steps == 4800


@pytest.mark.parametrize("strategy", ["staged", "tpe"])
def test_no_plan_exceeds_its_budget_and_every_family_is_screened_or_named(
        strategy: str) -> None:
    families = tuple(FAMILIES)
    for n_families in range(1, len(families) + 1):
        fams = families[:n_families]
        for n_trials in range(1, 31):
            for steps in (1, 7, 400):
                plan = plan_study(strategy, n_trials, steps, fams)
                assert plan.total_steps <= plan.budget_steps, (n_families, n_trials, steps)
                assert plan.n_refine >= (1 if strategy == "staged" else 0)
                assert plan.screen_families + plan.skipped_families == fams or (
                    plan.n_screen == 0 and plan.skipped_families == fams[1:])
                assert plan.screen_steps <= steps
                if strategy == "staged" and plan.n_screen and steps >= 4:
                    # The screen never takes more than half the budget...
                    assert plan.n_screen * plan.screen_steps <= plan.budget_steps / 2
                    # ...and uses up its whole trial-equivalents (up to integer division).
                    assert plan.budget_steps - plan.total_steps < plan.n_screen


def test_small_budgets_skip_families_in_the_spaces_order() -> None:
    plan = plan_study("staged", 3, 400, DEFAULT_AUGMENTATIONS)
    assert plan.screen_families == DEFAULT_AUGMENTATIONS[:4]
    assert plan.skipped_families == DEFAULT_AUGMENTATIONS[4:]
    assert plan.to_json()["skipped_families"] == list(DEFAULT_AUGMENTATIONS[4:])
    one = plan_study("staged", 1, 400, DEFAULT_AUGMENTATIONS)
    assert (one.n_screen, one.n_refine) == (0, 1)
    assert one.skipped_families == DEFAULT_AUGMENTATIONS[1:]
    tpe = plan_study("tpe", 6, 400, DEFAULT_AUGMENTATIONS)
    assert tpe.skipped_families == DEFAULT_AUGMENTATIONS[6:] and tpe.n_refine == 0


def test_unknown_strategies_and_empty_budgets_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        plan_study("grid", 12, 400, DEFAULT_AUGMENTATIONS)
    with pytest.raises(ValueError):
        plan_study("staged", 0, 400, DEFAULT_AUGMENTATIONS)
