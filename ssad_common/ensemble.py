"""The top-k ensemble (issue 11 §4): the mean of z-scored test scores of a job's k best
selectable trials. Plain numpy, so the API serves it (``GET /v1/jobs/{id}/scores?ensemble=k``)
and the worker's benchmark measures it with the same arithmetic."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: ``?ensemble=k`` bounds: 2 configurations at least, and few enough to read quickly.
MIN_K, MAX_K = 2, 10


def zscore_mean(scores: Sequence[np.ndarray]) -> np.ndarray:
    """Mean over configurations of each one's scores standardised to mean 0 and unit
    standard deviation (a constant score vector contributes zeros)."""
    if not scores:
        raise ValueError("no scores to ensemble")
    z = [(s - s.mean()) / (s.std() + 1e-12) for s in scores]
    return np.mean(z, axis=0)
