"""Evaluating a trained detector without labels (method.md §2, §4): every objective's loss on
the embeddings X, Y, Z, and the test scores with the scorer's fit kept for new data."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from worker.core.data import PreparedData
from worker.core.detector import Detector
from worker.core.export import ScoringModel
from worker.core.inference import augmented_logits, embed_xyz, levels_of
from worker.core.objectives import OBJECTIVES
from worker.core.scoring import mahalanobis_apply, mahalanobis_fit


@dataclass(frozen=True)
class Evaluation:
    losses: dict[str, float]
    scores: np.ndarray
    timings: dict[str, float]
    model: ScoringModel | None = None
    extra_scores: dict[str, np.ndarray] = field(default_factory=dict)


Fit = tuple[np.ndarray, np.ndarray]  # a Gaussian's (location, precision)


def fit_and_score(scorer: str, model: Detector, data: PreparedData, x_idx: Tensor, x: Tensor,
                  z: Tensor) -> tuple[np.ndarray, Fit | None]:
    """The test scores under ``scorer``, fitted on the train images ``x_idx`` (their
    embeddings ``x``; ``z``: the test set's), and the fit a stored detector keeps (None:
    the logit needs none)."""
    if scorer == "mahalanobis":
        fit = mahalanobis_fit(x.cpu().numpy())
        return mahalanobis_apply(*fit, z.cpu().numpy()), fit
    if scorer == "multilevel":
        fit = mahalanobis_fit(levels_of(model, data.train[x_idx]))
        return mahalanobis_apply(*fit, levels_of(model, data.test)), fit
    return augmented_logits(model, data.test).cpu().numpy().astype(np.float64), None


def evaluate(
    model: Detector,
    data: PreparedData,
    augment: torch.nn.Module,
    x_idx: Tensor,
    y_idx: Tensor,
    scorer: str,
    g: torch.Generator,
    also: Sequence[str] = (),
) -> Evaluation:
    """Embeddings X, Y, Z of the trained detector → every objective's loss, and the test
    scores (method.md §2, §4); ``also``: other scorers' scores of the same detector, for
    benchmarks (``Evaluation.extra_scores``)."""
    t_embed = time.perf_counter()
    x, y, z = embed_xyz(model, data.train[x_idx], data.train[y_idx], data.test, augment, g)
    embed_s = time.perf_counter() - t_embed

    t_loss = time.perf_counter()
    with torch.no_grad():
        losses = {name: float(o(x, y, z)) for name, o in OBJECTIVES.items()}
    loss_s = time.perf_counter() - t_loss

    t_score = time.perf_counter()
    scores, fit = fit_and_score(scorer, model, data, x_idx, x, z)
    kept = ScoringModel.capture(model, scorer, *(fit or ()))
    score_s = time.perf_counter() - t_score
    extra = {name: fit_and_score(name, model, data, x_idx, x, z)[0] for name in also}
    return Evaluation(losses, scores,
                      {"embed_s": embed_s, "loss_s": loss_s, "score_s": score_s}, kept, extra)


@torch.no_grad()
def subsample_loss(
    model: Detector,
    data: PreparedData,
    augment: torch.nn.Module,
    x_idx: Tensor,
    y_idx: Tensor,
    loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    g: torch.Generator,
    cap: int = 256,
) -> float:
    """The objective on at most ``cap`` train and test images (for pruning decisions)."""
    n_y = max(1, round(len(y_idx) * min(1.0, cap / len(x_idx))))
    x, y, z = embed_xyz(model, data.train[x_idx[:cap]], data.train[y_idx[:n_y]],
                        data.test[:cap], augment, g)
    return float(loss_fn(x, y, z))
