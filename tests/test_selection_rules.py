"""bench.selection_rules: the thirteenth round's tail guard and the run-by-run judge; bench.compare
reading a run under another recorded scorer.

The guard and the judge decided a round (docs/benchmarks.md §7, *The tail as a guard*), so
what they compute is pinned here on hand-made trials: which trials the guard vetoes, the
order it leaves, and that the judge pairs runs, not task names."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from bench.selection_rules import (
    TAIL_GUARD,
    evaluate,
    head_to_head,
    report,
    tail_guard_order,
)

GUARD_VS_DSV = (TAIL_GUARD, "dsv alone")


def trial(number: int, dsv: float, tail: float | None, auroc: float = 0.5) -> dict[str, Any]:
    losses = {"dsv": dsv} if tail is None else {"dsv": dsv, "tail-energy": tail}
    return {"number": number, "stage": "refine", "losses": losses, "auroc": auroc}


def run(task: str, trials: list[dict[str, Any]], file: str) -> dict[str, Any]:
    return {"task": task, "trials": trials, "mean": 0.5, "pixel": {"knn": 0.5}, "file": file}


def test_the_guard_vetoes_the_trials_above_the_tail_median_and_dsv_chooses_among_the_rest() -> None:
    # Nine trials: tail losses 1..9 in a shuffled order, so the median is 5 and the four
    # trials with tail 6..9 are vetoed, whatever their DSV loss.
    tails = [7, 2, 9, 5, 1, 8, 3, 6, 4]
    dsvs = [-0.9, -0.1, -0.8, -0.3, -0.2, -0.7, -0.4, -0.6, -0.5]
    trials = [trial(i, d, t) for i, (d, t) in enumerate(zip(dsvs, tails, strict=True))]
    order = tail_guard_order(trials)
    kept, vetoed = order[:5], order[5:]
    assert {tails[i] for i in kept} == {1, 2, 3, 4, 5}
    assert [dsvs[i] for i in kept] == sorted(dsvs[i] for i in kept)
    assert [dsvs[i] for i in vetoed] == sorted(dsvs[i] for i in vetoed)
    # DSV alone would take trial 0 (-0.9), whose tail loss (7) is above the median; the
    # guard takes the lowest DSV loss among the kept: trial 8 (-0.5).
    assert order[0] == 8
    assert order[5] == 0


def test_an_even_count_vetoes_above_the_midpoint_and_ties_go_to_the_earlier_trial() -> None:
    # Four trials: median tail 2.5, so tails 3 and 4 are vetoed; trials 1 and 2 share a
    # DSV loss and keep their numbers' order.
    trials = [trial(0, -1.0, 4), trial(1, -0.5, 1), trial(2, -0.5, 2), trial(3, -2.0, 3)]
    assert tail_guard_order(trials) == [1, 2, 3, 0]


def test_a_trial_without_a_finite_tail_loss_is_vetoed() -> None:
    # The median is of the finite losses (2.0): the NaN trial and trial 3 are vetoed. With
    # NaN in the median nothing would be, and DSV's -9.0 would win.
    trials = [trial(0, -9.0, math.nan), trial(1, -1.0, 1.0), trial(2, -2.0, 2.0),
              trial(3, -3.0, 3.0)]
    assert tail_guard_order(trials) == [2, 1, 0, 3]


def test_the_judge_pairs_runs_not_task_names() -> None:
    # The same task at two seeds (two files); the guard changes the choice at seed 1 only.
    seed0 = [trial(0, -1.0, 1.0, auroc=0.9), trial(1, -0.5, 2.0, auroc=0.7),
             trial(2, -0.2, 3.0, auroc=0.6)]
    seed1 = [trial(0, -1.0, 3.0, auroc=0.4), trial(1, -0.5, 1.0, auroc=0.8),
             trial(2, -0.2, 2.0, auroc=0.6)]
    per_rule = evaluate([run("t", seed0, "s0.json"), run("t", seed1, "s1.json")])
    text = head_to_head(per_rule, *GUARD_VS_DSV)
    assert "| t (s0.json) | 0.900 | 0.900 |" in text
    assert "| t (s1.json) | 0.800 | 0.400 |" in text
    assert "higher on 1, dsv alone on 0, 1 ties" in text


def test_a_run_without_the_tail_loss_is_not_replayed_for_the_guard() -> None:
    old = [trial(0, -1.0, None, auroc=0.9), trial(1, -0.5, None, auroc=0.7)]
    new = [trial(0, -1.0, 2.0, auroc=0.4), trial(1, -0.5, 1.0, auroc=0.8)]
    per_rule = evaluate([run("t", old, "old.json"), run("t", new, "new.json")])
    assert [x["run"] for x in per_rule[TAIL_GUARD]] == [1]
    assert [x["run"] for x in per_rule["dsv alone"]] == [0, 1]
    assert "| dsv, tail-energy guard | 1 |" in report(per_rule)
    with pytest.raises(SystemExit, match="1 runs, 'dsv alone' 2"):
        head_to_head(per_rule, *GUARD_VS_DSV)
    only_old = evaluate([run("t", old, "old.json")])
    assert "| dsv, tail-energy guard | 0 (no run recorded dsv, tail-energy) |" in report(only_old)


def test_compare_reads_a_run_under_another_recorded_scorer() -> None:
    from bench.compare import judged, rescored

    def scored(number: int, stage: str, own: float, other: float) -> dict[str, Any]:
        return {"number": number, "stage": stage, "auroc": own,
                "auroc_by_scorer": {"mahalanobis": other}}

    trials = [scored(0, "screen", 0.99, 0.99), scored(1, "refine", 0.9, 0.7),
              scored(2, "refine", 0.8, 0.85)]
    chosen = {"selected": {"number": 1, "auroc": 0.9, "augmentation": "rotate",
                           "params": {}}, "regret": 0.0, "ensemble_top": 0.95}
    r = {"task": "t", "trials": trials, "oracle": 0.9, "mean": 0.85, "truth": None,
         "pixel": {"knn": 0.75}, "objectives": {"dsv": chosen}, "study_objective": "dsv"}
    back = rescored(r, "mahalanobis")
    # the same choice, its AUROC, the oracle and the mean among the full-length trials
    # under the other scorer (the screen's 0.99 is not among them)
    row = judged(back, None)
    assert back["oracle"] == 0.85 and back["mean"] == pytest.approx(0.775)
    assert row["auroc"] == 0.7 and row["regret"] == pytest.approx(0.15)
    assert not row["beats_mean"] and not row["above_pixels"]
    assert judged(r, None)["auroc"] == 0.9  # the run as recorded is untouched
    with pytest.raises(SystemExit, match="ensemble"):
        judged(back, None, "ensemble")
    with pytest.raises(SystemExit, match="did not record"):
        rescored(r, "logit")


def test_compare_reads_a_run_made_with_the_scorer_asked_for_as_it_is(tmp_path: Any) -> None:
    import json

    from bench.compare import runs_of

    run_ = {"task": "t", "kind": "injected", "trials": [{"number": 1, "auroc": 0.9}]}
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"meta": {"scorer": "multilevel"}, "results": [run_]}))
    old = tmp_path / "old.json"  # before bench.engine --scorer: Mahalanobis's
    old.write_text(json.dumps({"meta": {}, "results": [run_]}))
    assert runs_of([new], None, scorer="multilevel")[0]["scorer"] == "multilevel"
    assert runs_of([old], None, scorer="mahalanobis")[0]["trials"] == run_["trials"]
    assert runs_of([old], None)[0]["scorer"] == "mahalanobis"
    with pytest.raises(SystemExit, match="did not record"):
        runs_of([old], None, scorer="multilevel")


def test_compare_reads_the_oracle_as_the_ceiling_and_prices_the_generator() -> None:
    from bench.compare import judged

    def t(number: int, stage: str, auroc: float, family: str, size: float) -> dict[str, Any]:
        return {"number": number, "stage": stage, "auroc": auroc, "augmentation": family,
                "params": {"patch_size": size}}

    # the generator: cutout at 0.04; the screen's 0.99 is not selectable; the best
    # full-length detector is cutout at 3× the size; the generator's own trial is 0.05 lower
    trials = [t(0, "screen", 0.99, "cutout", 0.04), t(1, "refine", 0.95, "cutout", 0.12),
              t(2, "refine", 0.90, "cutout", 0.05), t(3, "refine", 0.80, "cutpaste", 0.04)]
    chosen = {"selected": trials[3], "regret": 0.15, "ensemble_top": 0.9}
    r = {"task": "t", "kind": "injected", "trials": trials, "oracle": 0.95, "mean": 0.88,
         "truth": {"augmentation": "cutout", "patch_size": 0.04}, "pixel": {"knn": 0.7},
         "objectives": {"dsv": chosen}, "study_objective": "dsv"}
    choice, ceiling = judged(r, None), judged(r, None, "oracle")
    assert choice["auroc"] == 0.80 and not choice["family"] and not choice["size"]
    assert ceiling["auroc"] == 0.95 and ceiling["regret"] == 0.0
    assert ceiling["family"] and not ceiling["size"]  # the best detector is 3× the defect
    assert choice["generator_regret"] == pytest.approx(0.05)  # trial 2, within 1.5×
    assert choice["family_refined"]
    blurred = {**r, "truth": {"augmentation": "blur", "patch_size": 0.04}}
    assert not judged(blurred, None, "oracle")["family_refined"]
    one_class = {**r, "kind": "one-class", "truth": None}
    assert judged(one_class, None, "oracle")["generator_regret"] is None


def test_the_oracle_prefers_the_generator_in_a_tie_and_follows_the_scorer_asked_for() -> None:
    from bench.compare import judged, rescored

    def t(number: int, auroc: float, other: float, size: float) -> dict[str, Any]:
        return {"number": number, "stage": "refine", "auroc": auroc, "augmentation": "cutout",
                "params": {"patch_size": size}, "auroc_by_scorer": {"mahalanobis": other}}

    # trials 0 and 1 tie at 1.0; trial 1 is the generator (0.04 against 0.2)
    trials = [t(0, 1.0, 0.7, 0.2), t(1, 1.0, 0.6, 0.04), t(2, 0.9, 0.95, 0.2)]
    chosen = {"selected": trials[2], "regret": 0.1, "ensemble_top": 0.9}
    r = {"task": "t", "kind": "injected", "trials": trials, "oracle": 1.0, "mean": 0.97,
         "truth": {"augmentation": "cutout", "patch_size": 0.04}, "pixel": {"knn": 0.7},
         "objectives": {"dsv": chosen}, "study_objective": "dsv"}
    assert judged(r, None, "oracle")["size"]
    # under the other scorer the best detector is trial 2 (0.95), the generator 0.35 below
    row = judged(rescored(r, "mahalanobis"), "no such objective", "oracle")
    assert row["auroc"] == 0.95 and not row["size"]
    assert row["generator_regret"] == pytest.approx(0.35)


def test_the_consensus_is_the_top_configuration_that_agrees_most_with_the_others() -> None:
    from bench.selection_rules import consensus

    rng = np.random.default_rng(0)
    truth = rng.normal(size=50)
    stray = -truth  # the best by the selection score, ranking the images backwards
    near = truth + rng.normal(scale=0.1, size=50)
    nearer = truth + rng.normal(scale=0.01, size=50)
    # the stray best is outvoted; only the top k take part: the fourth's missing scores
    # are never read
    assert consensus([stray, near, nearer, None], k=3) in (1, 2)
    assert consensus([truth, truth, truth], k=3) == 0  # a tie in agreement: the better rank
    assert consensus([stray, None], k=2) == 0  # two cannot outvote each other
    with pytest.raises(ValueError, match="scores"):
        consensus([stray, near, None], k=3)
    with pytest.raises(ValueError):
        consensus([], k=3)


def test_compare_judges_the_recorded_consensus_pick_as_one_trial() -> None:
    from bench.compare import judged, rescored

    def t(number: int, auroc: float, size: float) -> dict[str, Any]:
        return {"number": number, "stage": "refine", "auroc": auroc, "augmentation": "cutout",
                "params": {"patch_size": size}, "auroc_by_scorer": {"mahalanobis": 0.5}}

    trials = [t(0, 0.70, 0.2), t(1, 0.95, 0.04), t(2, 0.90, 0.1)]
    chosen = {"selected": trials[0], "regret": 0.25, "ensemble_top": 0.93,
              "consensus": {"3": 1, "5": 2}}
    r = {"task": "t", "kind": "injected", "trials": trials, "oracle": 0.95, "mean": 0.85,
         "truth": {"augmentation": "cutout", "patch_size": 0.04}, "pixel": {"knn": 0.8},
         "objectives": {"dsv": chosen}, "study_objective": "dsv"}
    assert not judged(r, None)["beats_mean"]  # the choice itself: trial 0
    medoid, of_five = judged(r, None, "consensus"), judged(r, None, "consensus-5")
    assert (medoid["auroc"], medoid["regret"], medoid["size"]) == (0.95, 0.0, True)
    assert medoid["beats_mean"] and medoid["above_pixels"]
    assert of_five["auroc"] == 0.90 and of_five["regret"] == pytest.approx(0.05)
    old = {**r, "objectives": {"dsv": {k: v for k, v in chosen.items() if k != "consensus"}}}
    with pytest.raises(SystemExit, match="no consensus"):
        judged(old, None, "consensus")
    # the pick is the medoid of the run's own scores: not judged as another scorer's
    with pytest.raises(SystemExit, match="own scorer only"):
        judged(rescored(r, "mahalanobis"), None, "consensus")


def test_compare_counts_a_study_found_in_two_files_once(tmp_path: Any, capsys: Any) -> None:
    import json

    from bench.compare import runs_of

    run_ = {"task": "t", "kind": "injected",
            "trials": [{"number": 1, "augmentation": "flip", "params": {}, "auroc": 0.9}]}
    other = {**run_, "trials": [{**run_["trials"][0], "auroc": 0.8}]}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"meta": {}, "results": [run_]}))
    b.write_text(json.dumps({"meta": {}, "results": [run_, other]}))
    assert [r["trials"][0]["auroc"] for r in runs_of([a, b], None)] == [0.9, 0.8]
    assert "repeats the run in" in capsys.readouterr().err


def test_compare_splits_runs_by_the_trust_verdict_their_choice_recorded(capsys: Any) -> None:
    from bench.compare import judged, print_by_trust, rescored

    def t(number: int, auroc: float, other: float) -> dict[str, Any]:
        return {"number": number, "stage": "refine", "auroc": auroc, "augmentation": "flip",
                "params": {}, "auroc_by_scorer": {"mahalanobis": other}}

    def r(task: str, verdict: str | None, trials: list[dict[str, Any]]) -> dict[str, Any]:
        chosen = {"selected": trials[0], "regret": max(x["auroc"] for x in trials)
                  - trials[0]["auroc"], "ensemble_top": 0.9,
                  "by_scorer": {"mahalanobis": {"decisiveness": {"trust": "uncertain"}}}}
        if verdict is not None:
            chosen["decisiveness"] = {"trust": verdict}
        return {"task": task, "kind": "one-class", "trials": trials,
                "oracle": max(x["auroc"] for x in trials), "mean": 0.8, "truth": None,
                "pixel": {"knn": 0.85}, "objectives": {"dsv": chosen}, "study_objective": "dsv"}

    good = r("a", "decisive", [t(0, 0.95, 0.6), t(1, 0.90, 0.7)])
    bad = r("b", "uncertain", [t(0, 0.70, 0.9), t(1, 0.90, 0.8)])
    old = r("c", None, [t(0, 0.90, 0.9)])
    rows = [judged(x, None) for x in (good, bad, old)]
    assert [x["trust"] for x in rows] == ["decisive", "uncertain", "not recorded"]
    # the oracle and the ensemble are split by the same run's verdict
    assert judged(bad, None, "oracle")["trust"] == "uncertain"
    # the README's advice: the ensemble (0.9) where uncertain, the choice where decisive
    # or where no verdict was recorded
    assert judged(bad, None, "advice")["auroc"] == 0.9
    assert judged(bad, None, "advice")["label"] == "top-3 ensemble"
    assert [judged(x, None, "advice")["auroc"] for x in (good, old)] == [0.95, 0.90]
    # read under another scorer: that scorer's verdict, where the run kept it
    assert judged(rescored(good, "mahalanobis"), None)["trust"] == "uncertain"
    print_by_trust({"d": rows})
    table = capsys.readouterr().out
    assert "| d | decisive | 1 | 0.000 | 0.000 | 0/1 | 1/1 | 1/1 |" in table
    assert "| d | uncertain | 1 | 0.200 | 0.200 | 1/1 | 0/1 | 0/1 |" in table
    assert "| d | not recorded | 1 |" in table
