"""Label-free thresholds on a job's anomaly scores (higher = more anomalous).

Two rules, both computed from the scores alone:

* ``contamination``: flag the top ``contamination`` fraction of the test set, the fraction
  the job was told to expect (its ``contamination`` parameter). Right when that guess is
  right; it always flags the same count, whatever the data.
* ``mad`` (the suggested rule): flag scores above ``median + 3.5 × 1.4826 × MAD``, the
  robust z-score outlier rule of Iglewicz and Hoaglin. The median and the median absolute
  deviation describe the bulk of the test set and barely move when up to half of it is
  anomalous, so the threshold is set by the normal images, and the number flagged follows
  the data instead of a guess. 3.5 is the customary cut-off (a normal sample exceeds it
  with probability ≈ 5 × 10⁻⁴). When the scores have no spread (MAD = 0) the rule falls
  back to the standard deviation.

Neither rule looks at labels; which one to trust is the user's call, and the response
reports both.

A scoring job's images are judged by the thresholds of the tuning job it came from (computed
on that job's test set, its normal reference): a batch of a few images has no bulk of its
own, so rules computed on the batch alone would flag nothing (or, for ``contamination``, a
fixed count whatever the images). :func:`apply_thresholds` counts new scores against them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAD_Z = 3.5
MAD_SCALE = 1.4826  # MAD of a normal distribution × this = its standard deviation
SUGGESTED_RULE = "mad"


@dataclass(frozen=True)
class Threshold:
    rule: str
    threshold: float
    n_flagged: int
    description: str


def mad_threshold(scores: np.ndarray) -> Threshold:
    med = float(np.median(scores))
    spread = MAD_SCALE * float(np.median(np.abs(scores - med)))
    if spread <= 0:
        spread = float(np.std(scores))
    thr = med + MAD_Z * spread
    return Threshold("mad", thr, int(np.sum(scores > thr)),
                     f"median + {MAD_Z} x 1.4826 x MAD of the scores "
                     f"(median {med:.4g}, scaled MAD {spread:.4g})")


def contamination_threshold(scores: np.ndarray, contamination: float) -> Threshold:
    n = len(scores)
    k = min(n, max(1, round(n * contamination)))
    ordered = np.sort(scores)[::-1]
    # Halfway between the k-th highest score and the next: exactly k flagged (ties aside).
    thr = float(ordered[k - 1] if k == n else (ordered[k - 1] + ordered[k]) / 2)
    return Threshold("contamination", thr, int(np.sum(scores > thr)),
                     f"the top {contamination:g} of the test set ({k} of {n} images), the "
                     "fraction the job was told to expect")


def apply_thresholds(scores: np.ndarray, rules: dict[str, tuple[float, str]]
                     ) -> dict[str, Threshold]:
    """Thresholds set elsewhere (rule name → (threshold, description)), with the number of
    ``scores`` above each."""
    return {name: Threshold(name, thr, int(np.sum(scores > thr)), description)
            for name, (thr, description) in rules.items()}


def thresholds(scores: np.ndarray, contamination: float) -> dict[str, Threshold]:
    if len(scores) == 0:
        raise ValueError("no scores")
    return {"mad": mad_threshold(scores),
            "contamination": contamination_threshold(scores, contamination)}
