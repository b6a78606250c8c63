"""How far to trust a study's choice, without labels (issue 11 §4).

Two signals, from what every study already has:

* **family gap**: the selection score (:func:`ssad_common.strategy.ranked`: the rank
  under the objective plus the rank under MMD) of the best trial of the runner-up family
  minus the best trial's, also as a share of the spread of the scores among the
  candidates. A small gap says another family did about as well: the choice between them
  is close to a coin.
* **agreement**: do the top configurations flag the same test images? Each of the top-k
  candidates flags its ``contamination`` share of highest-scoring test images;
  agreement is the mean Jaccard overlap of the best's flagged set with each runner-up's,
  and the mean Spearman correlation of their scores. When the top configurations disagree,
  which images are anomalous depends on a choice the loss barely made.

The verdict, ``trust`` (:func:`ssad_common.strategy.trust`), is read from the agreement
alone: on the development runs the agreement separated the good choices from the bad ones
and the family gap did not.

:func:`ensemble_scores` is the mean of the z-scored scores of the top-k candidates.
Pure numpy: the worker calls it when a job finishes, the benchmark on every task.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from ssad_common.ensemble import zscore_mean
from ssad_common.strategy import trust

#: How many of the best candidates the agreement and the ensemble use.
TOP_K = 3


@dataclass(frozen=True)
class Candidate:
    """A completed, selectable trial: its family, selection score (lower is better) and
    test scores (needed for the top ``k`` only)."""

    number: int
    augmentation: str
    score: float
    scores: np.ndarray | None


def _scores(c: Candidate) -> np.ndarray:
    if c.scores is None:
        raise ValueError(f"trial {c.number} has no scores")
    return c.scores


def _flagged(scores: np.ndarray, share: float) -> set[int]:
    n = max(1, round(len(scores) * share))
    return set(np.argsort(-scores, kind="stable")[:n].tolist())


#: What ``family_gap`` counts: the candidates' scores are rank sums (the selection rule;
#: jobs stored from 2026-12-02 to 03, when the best was the lowest loss, say "loss").
GAP_UNIT = "rank points"


def decisiveness(candidates: Sequence[Candidate], contamination: float,
                 k: int = TOP_K) -> dict[str, Any]:
    """The family gap and the agreement of the top ``k`` of ``candidates`` (best first, as
    :func:`ssad_common.strategy.ranked` orders them). Fields are None where they cannot be
    computed (one family, one candidate)."""
    ranked = list(candidates)
    if not ranked:
        raise ValueError("no candidate to judge")
    if any(a.score > b.score for a, b in itertools.pairwise(ranked)):
        raise ValueError("candidates must come best (lowest score) first")
    best = ranked[0]
    values = np.array([c.score for c in ranked])
    spread = float(values.max() - values.min())
    runner = next((c for c in ranked if c.augmentation != best.augmentation), None)
    gap = None if runner is None else float(runner.score - best.score)
    top = ranked[:k]
    jaccard, rho = [], []
    if any(c.scores is None for c in top):
        raise ValueError(f"the top {k} candidates need their scores")
    best_scores = _scores(best)
    flagged = _flagged(best_scores, contamination)
    for other in top[1:]:
        theirs = _flagged(_scores(other), contamination)
        jaccard.append(len(flagged & theirs) / len(flagged | theirs))
        r = float(spearmanr(best_scores, _scores(other)).statistic)
        rho.append(r if np.isfinite(r) else 0.0)  # constant scores: no rank agreement
    agreement = float(np.mean(jaccard)) if jaccard else None
    return {
        "best_trial": best.number, "best_family": best.augmentation,
        "runner_up_family": None if runner is None else runner.augmentation,
        "runner_up_trial": None if runner is None else runner.number,
        "family_gap": gap,
        "family_gap_unit": None if gap is None else GAP_UNIT,
        # Every candidate tied (spread 0): another family did exactly as well, share 0.
        "family_gap_share": None if gap is None else gap / spread if spread else 0.0,
        "top_k": len(top), "top_trials": [c.number for c in top],
        "flagged_share": contamination,
        "agreement_jaccard": agreement,
        "agreement_spearman": float(np.mean(rho)) if rho else None,
        "candidates": len(ranked),
        "trust": trust(agreement),
    }


def ensemble_scores(candidates: Sequence[Candidate], k: int = TOP_K) -> np.ndarray:
    """Mean of the z-scored test scores of the first ``k`` of ``candidates`` (best first)."""
    ranked = list(candidates)[:k]
    if not ranked:
        raise ValueError("no candidate to ensemble")
    return zscore_mean([_scores(c) for c in ranked])
