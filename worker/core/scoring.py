"""Anomaly scorers (method.md §2): higher score = more anomalous."""

from __future__ import annotations

import numpy as np
from sklearn.covariance import LedoitWolf

from worker.search_space import DEFAULT_SCORER, SCORER_NAMES


def mahalanobis_scores(train_embeddings: np.ndarray, test_embeddings: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each test embedding to a Gaussian fitted on the train
    embeddings with Ledoit–Wolf shrinkage (the CutPaste / DSV scorer)."""
    x = np.asarray(train_embeddings, dtype=np.float64)
    z = np.asarray(test_embeddings, dtype=np.float64)
    if x.ndim != 2 or z.ndim != 2 or x.shape[1] != z.shape[1]:
        raise ValueError(f"embeddings must be 2-D with equal width, got {x.shape}, {z.shape}")
    if len(x) < 2:
        raise ValueError("the Mahalanobis scorer needs at least two train embeddings")
    lw = LedoitWolf(assume_centered=False).fit(x)
    diff = z - lw.location_
    d2 = np.einsum("ij,jk,ik->i", diff, lw.precision_, diff)
    return np.sqrt(np.clip(d2, 0.0, None))


SCORERS = SCORER_NAMES

__all__ = ["DEFAULT_SCORER", "SCORERS", "mahalanobis_scores"]
