"""The study's plan (ssad_common/strategy.py): the budget is exact and what it cannot cover
is named. Pure arithmetic, no training."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from ssad_common.search_space import DEFAULT_AUGMENTATIONS, FAMILIES, SearchSpace
from ssad_common.strategy import SCREEN, plan_for, plan_study, ranked, selectable


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
                plan = plan_study(strategy, n_trials, steps, fams,
                                  {f: math.inf for f in fams[::2]} | {fams[-1]: 3},
                                  dict.fromkeys(fams[::3], 2) | {fams[-1]: 3})
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


def test_decisiveness_reports_the_family_gap_and_the_top_configurations_agreement() -> None:
    import numpy as np

    from worker.core.selection import Candidate, decisiveness, ensemble_scores

    a = np.array([0.0, 1.0, 2.0, 3.0, 9.0, 8.0, 0.5, 0.2, 0.1, 0.3])
    same = a * 2 + 1  # flags the same images
    other = -a  # flags the opposite ones
    # Best first, with their selection scores (rank sums), as ssad_common.strategy.ranked
    # gives them.
    cands = [Candidate(1, "cutout", 2.0, a), Candidate(2, "cutout", 3.5, same),
             Candidate(4, "rotate", 4.0, other), Candidate(3, "flip", 8.0, None)]
    d = decisiveness(cands, contamination=0.2)
    assert (d["best_trial"], d["best_family"]) == (1, "cutout")
    assert (d["runner_up_family"], d["runner_up_trial"]) == ("rotate", 4)
    assert d["family_gap"] == pytest.approx(2.0)
    assert d["family_gap_share"] == pytest.approx(2.0 / 6.0)
    assert d["family_gap_unit"] == "rank points"
    assert d["top_trials"] == [1, 2, 4] and d["candidates"] == 4
    # best vs same: the 2 flagged images coincide (1.0); best vs other: none do (0.0).
    assert d["agreement_jaccard"] == pytest.approx(0.5)
    assert d["trust"] == "decisive"  # at the threshold: half of the flagged images agree
    assert d["agreement_spearman"] == pytest.approx(0.0)
    z = ensemble_scores(cands, k=2)  # the two cutout trials: the same ranking as a
    assert list(np.argsort(z)) == list(np.argsort(a))
    tied = decisiveness([Candidate(1, "cutout", 3.0, a), Candidate(4, "rotate", 3.0, same)],
                        contamination=0.2)
    assert (tied["family_gap"], tied["family_gap_share"]) == (0.0, 0.0)  # a coin flip
    with pytest.raises(ValueError, match=r"best .* first"):
        decisiveness(cands[::-1], contamination=0.2)
    alone = decisiveness([Candidate(0, "rotate", 1.0, a)], contamination=0.1)
    assert alone["runner_up_family"] is None and alone["agreement_jaccard"] is None
    assert alone["family_gap"] is None and alone["family_gap_unit"] is None
    assert alone["trust"] is None  # nothing to compare the choice with
    split = decisiveness([Candidate(1, "cutout", 2.0, a), Candidate(4, "rotate", 4.0, other)],
                         contamination=0.2)
    assert split["agreement_jaccard"] == 0.0 and split["trust"] == "uncertain"
    with pytest.raises(ValueError, match="scores"):
        decisiveness([*cands[:1], Candidate(9, "x", 9.0, None)], contamination=0.1)


def test_the_trust_verdict_reads_the_agreement_against_its_threshold() -> None:
    from ssad_common.strategy import TRUST_AGREEMENT, trust

    assert TRUST_AGREEMENT == 0.5  # the value docs/benchmarks.md §7 tested on held-out tasks
    assert trust(None) is None
    assert trust(0.5) == trust(0.9) == trust(1.0) == "decisive"
    assert trust(0.49) == trust(0.0) == "uncertain"


@dataclass(frozen=True)
class Done:
    """A completed trial as ssad_common.strategy.ranked reads it."""

    number: int
    validation_loss: float | None
    mmd: float | None = None
    stage: str | None = None

    @property
    def losses(self) -> dict[str, float]:
        return {} if self.mmd is None else {"mmd": self.mmd}


def test_the_result_is_chosen_by_the_objectives_rank_plus_mmds() -> None:
    """DSV alone rewards far-away augmentations, MMD near ones: the chosen trial has the
    lowest sum of its two ranks, not the lowest loss; ties go to the lower loss, then the
    earlier trial; screen trials are chosen only when nothing else completed."""
    far = Done(0, -0.9, mmd=0.5)  # the objective's favourite, MMD's worst
    both = Done(1, -0.8, mmd=0.1)  # second and first: the lowest rank sum
    near = Done(2, -0.1, mmd=0.2)
    assert [(score, t.number) for score, t in ranked([far, both, near])] == [
        (3.0, 1), (4.0, 0), (5.0, 2)]
    assert selectable([near, far, both])[0] == both
    # Ties: a rank sum shared by two trials goes to the lower loss, then the earlier one.
    a, b = Done(5, -0.5, mmd=0.2), Done(3, -0.4, mmd=0.1)
    assert selectable([b, a]) == [a, b]
    c, d = Done(7, -0.5, mmd=0.1), Done(6, -0.5, mmd=0.1)
    assert [score for score, _ in ranked([c, d])] == [3.0, 3.0]
    assert selectable([c, d]) == [d, c]
    # No MMD (a trial stored before the rule) ranks last by MMD.
    old = Done(8, -0.9)  # and no number (NaN, a stored null) ranks last too
    for odd in (math.nan, math.inf):
        assert selectable([Done(8, -0.9, mmd=odd), Done(9, -0.8, mmd=0.9),
                           Done(10, -0.7, mmd=1.0)])[0].number == 9
    assert [t.number for t in selectable([old, Done(9, -0.8, mmd=0.9),
                                          Done(10, -0.7, mmd=1.0)])] == [9, 8, 10]
    # Screen trials only when no full-length one completed; no loss, never.
    screen = Done(10, -2.0, mmd=0.0, stage=SCREEN)
    assert selectable([screen, near, Done(11, None)]) == [near]
    assert selectable([screen, Done(11, None)]) == [screen]
    assert selectable([]) == []


def test_a_small_space_fills_the_screens_share_with_more_configurations() -> None:
    """Three local families would screen in one trial-equivalent of twelve: the screen's
    quarter is filled with more configurations of each, every other fill first (cutout's
    four, the scar's two), then patch sizes drawn at random, each to the family screened
    least so far, so one default fill cannot decide whether a family is refined."""
    space = SearchSpace.from_dict({"augmentations": ["cutout", "cutpaste", "cutpaste-scar"]})
    assert space.screen_choices() == {"cutout": 4, "cutpaste": 0, "cutpaste-scar": 2}
    plan = plan_for("staged", 12, 400, space)
    assert plan.screen_families == ("cutout", "cutpaste", "cutpaste-scar")
    assert plan.screen_extra == ("cutout", "cutpaste-scar") * 2 + ("cutout",) * 2 + (
        "cutpaste",) * 3
    screened = {f: 1 + plan.screen_extra.count(f) for f in plan.screen_families}
    assert screened == {"cutout": 5, "cutpaste": 4, "cutpaste-scar": 3}
    assert (plan.n_screen, plan.screen_steps, plan.n_refine) == (12, 100, 9)
    assert plan.total_steps == plan.budget_steps
    assert plan.to_json()["screen"]["extra"] == list(plan.screen_extra)
    # Too few extras for every fill: each goes to the family screened least so far.
    eight = plan_for("staged", 8, 400, space)
    assert eight.screen_extra == ("cutout", "cutpaste-scar", "cutout", "cutpaste-scar",
                                  "cutout")
    # A family with only choices to search screens each of them once, and no more: flip
    # has one other direction, invert nothing; the screen then costs what it needs.
    few = plan_for("staged", 12, 400, SearchSpace.from_dict(
        {"augmentations": ["flip", "invert"]}))
    assert few.screen_extra == ("flip",) and few.n_screen == 3
    assert few.n_screen * few.screen_steps <= 400 and few.n_refine == 11
    assert space.screen_capacity()["cutout"] == math.inf
    # A fixed fill is no choice to screen.
    assert SearchSpace.from_dict({"augmentations": ["cutout"], "fixed": {
        "cutout": {"fill": "one"}}}).screen_choices() == {"cutout": 0}
    # The 12 default families fill the quarter on their own: no extra screens.
    assert plan_for("staged", 12, 400, SearchSpace()).screen_extra == ()


def test_the_cli_states_a_screen_of_extra_configurations() -> None:
    from ssad_tune.client import describe_plan

    small = plan_for("staged", 12, 400, SearchSpace.from_dict(
        {"augmentations": ["cutout", "cutpaste", "cutpaste-scar"]})).to_json()
    assert describe_plan(small) == (
        "budget: 12 full-length trials = 4,800 training steps (staged: screen 12 "
        "configurations of 3 families × 100 steps, then 9 trials × 400 steps)")
    assert "screen 12 families × 100 steps" in describe_plan(
        plan_for("staged", 12, 400, SearchSpace()).to_json())
    # One of a kind is singular (the quick start's small budgets).
    two = SearchSpace.from_dict({"augmentations": ["rotate", "flip"]})
    assert describe_plan(plan_for("staged", 2, 40, two).to_json()) == (
        "budget: 2 full-length trials = 80 training steps (staged: screen 2 families × 20 "
        "steps, then 1 trial × 40 steps)")
    assert describe_plan(plan_for("staged", 1, 40, two).to_json()).startswith(
        "budget: 1 full-length trial = 40 training steps (staged: 1 trial × 40 steps)")


def test_the_cli_states_the_family_gap_in_its_unit() -> None:
    from ssad_tune.client import describe_selection

    # A job stored from 2026-12-02 to 03, when the best was the lowest loss.
    sel = {"runner_up_family": "cutout", "family_gap": 0.04213, "family_gap_share": 0.5,
           "family_gap_unit": "loss", "agreement_jaccard": 0.6, "top_k": 3}
    assert describe_selection(sel) == (
        "selection: runner-up family cutout is 0.0421 behind in the objective's loss (50% "
        "of the candidates' range); the top 3 configurations agree on 60% of the images "
        "they flag")
    # A job stored before the unit (or a server older than it): a loss difference too.
    unit_less = {k: v for k, v in sel.items() if k != "family_gap_unit"}
    assert describe_selection(unit_less) == describe_selection(sel)
    # A job of this version (and of 2026-12-01 to 02): the rank sum, in rank points.
    ranks = {**sel, "family_gap": 1.0, "family_gap_unit": "rank points"}
    assert "is 1 rank point behind (50%" in describe_selection(ranks)
    assert "is 2.5 rank points behind" in describe_selection({**ranks, "family_gap": 2.5})
    assert describe_selection({}) == "selection: one candidate only"
    assert describe_selection({**sel, "trust": "decisive"}).endswith("\ntrust: decisive")
    hedge = describe_selection({**sel, "agreement_jaccard": 0.2, "trust": "uncertain"})
    assert "\ntrust: uncertain: the tuned detector may be no better" in hedge
    assert hedge.endswith("the top 3 configurations' ensemble hedges it (ssad-tune follow "
                          "JOB --ensemble 3, or GET /v1/jobs/JOB/scores?ensemble=3)")
    two = describe_selection({**sel, "top_k": 2, "trust": "uncertain"}, "j-1")
    assert two.endswith("(ssad-tune follow j-1 --ensemble 2, or GET /v1/jobs/j-1/scores"
                        "?ensemble=2)")
