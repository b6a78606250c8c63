"""One trial (method.md §2, §4): augmentation → train detector → embeddings → loss → scores.

``run_trial`` is pure: arrays and settings in, a :class:`TrialResult` out; no database, no
HTTP, no Optuna. Same inputs and seed give the same result on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ssad_common.jobspec import DEFAULT_CONTAMINATION, DEFAULT_OBJECTIVE
from ssad_common.search_space import ParamValue
from worker.core.augmentations import Augmentation, build_augmentation
from worker.core.data import PreparedData, evaluation_sets
from worker.core.detector import Detector
from worker.core.device import make_generator, seed_everything, synchronize
from worker.core.evaluation import evaluate, subsample_loss
from worker.core.export import ScoringModel
from worker.core.objectives import get_objective
from worker.core.training import (
    DetectorTraining,
    TrainSettings,
    TrialInterrupted,
    TrialPruned,
    build_detector,
)


@dataclass(frozen=True)
class TrialResult:
    """What one trial produced. ``scores`` are in test-set order, higher = more anomalous."""

    augmentation: str
    params: dict[str, ParamValue]
    objective: str
    validation_loss: float
    losses: dict[str, float]  # every registered objective on the same embeddings
    scores: np.ndarray
    timings: dict[str, float]
    n_x: int
    n_y: int
    seed: int
    #: The trained detector and its scorer fit (to score new data later); None if the
    #: caller asked not to keep it.
    model: ScoringModel | None = None
    train_steps: int = 0  # how long the detector trained
    stage: str | None = None  # set by the study: screen or refine (staged strategy)
    #: TrainSettings.also_score's scores of the same detector, by scorer
    extra_scores: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class TrialStart:
    """A trial's seeded starting point: the augmentation, the training loop (which holds
    the untrained detector and the generator), and the train images embedded clean (X) and
    augmented (Y)."""

    augment: Augmentation
    training: DetectorTraining
    x_idx: Tensor
    y_idx: Tensor

    @property
    def model(self) -> Detector:
        return self.training.model

    @property
    def g(self) -> torch.Generator:
        return self.training.g


def start_trial(data: PreparedData, augmentation: str, params: Mapping[str, Any],
                settings: TrainSettings, contamination: float = DEFAULT_CONTAMINATION,
                seed: int = 0) -> TrialStart:
    """Everything a trial draws from its seed, in the order :func:`run_trial` draws it, so a
    recorded trial can be trained again exactly (bench.scorers)."""
    augment = build_augmentation(augmentation, params)
    device = data.train.device
    seed_everything(seed)
    g = make_generator(device, seed)
    model = build_detector(data.channels, data.image_size, settings, device)
    augment = augment.to(device)
    training = DetectorTraining(model, augment, data.train, settings, g, amp=settings.amp)
    x_idx, y_idx = evaluation_sets(len(data.train), contamination, settings.max_embed_train,
                                   g, device)
    return TrialStart(augment, training, x_idx, y_idx)


def run_trial(
    data: PreparedData,
    augmentation: str,
    params: Mapping[str, Any],
    settings: TrainSettings,
    objective: str = DEFAULT_OBJECTIVE,
    contamination: float = DEFAULT_CONTAMINATION,
    seed: int = 0,
    report: Callable[[int, float], bool] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    progress_seconds: float = 1.0,
) -> TrialResult:
    """Train one detector with one augmentation and evaluate it without labels.

    ``report(step, loss)`` is called every ``settings.eval_every`` steps with the objective
    on a subsample; if it returns True the trial stops with :class:`TrialPruned`.
    ``should_stop()`` is checked before every training step; if it returns True the trial
    stops with :class:`TrialInterrupted`. ``progress(step, steps, training_loss)`` is called
    after the first and the last step and at most every ``progress_seconds`` in between
    (reading the loss waits for the device, so not at every step).
    """
    t_start = time.perf_counter()
    loss_fn = get_objective(objective)
    start = start_trial(data, augmentation, params, settings, contamination, seed)
    model, augment, training, g = start.model, start.augment, start.training, start.g
    x_idx, y_idx, device = start.x_idx, start.y_idx, data.train.device

    t_train = last_progress = time.perf_counter()
    for step in range(1, settings.steps + 1):
        if should_stop is not None and should_stop():
            raise TrialInterrupted(f"stopped at step {step}")
        loss = training.step()
        if progress is not None and (step in (1, settings.steps) or
                                     time.perf_counter() - last_progress >= progress_seconds):
            progress(step, settings.steps, float(loss.detach()))
            last_progress = time.perf_counter()
        if report is not None and settings.eval_every and step % settings.eval_every == 0 \
                and step < settings.steps:
            interim = subsample_loss(model, data, augment, x_idx, y_idx, loss_fn, g)
            if report(step, interim):
                raise TrialPruned(f"pruned at step {step} (loss {interim:.4f})")
    synchronize(device)
    train_s = time.perf_counter() - t_train

    evaluation = evaluate(model, data, augment, x_idx, y_idx, settings.scorer, g,
                          also=settings.also_score)
    total_s = time.perf_counter() - t_start
    timings = {"total_s": total_s, "train_s": train_s, "augment_s": training.augment_s,
               **evaluation.timings}
    timings["setup_s"] = total_s - sum(v for k, v in timings.items()
                                       if k not in ("total_s", "augment_s"))
    return TrialResult(
        augmentation=augmentation,
        params=dict(augment.params),
        objective=objective,
        validation_loss=evaluation.losses[objective],
        losses=evaluation.losses,
        scores=evaluation.scores,
        timings=timings,
        n_x=len(x_idx),
        n_y=len(y_idx),
        seed=seed,
        model=evaluation.model,
        train_steps=settings.steps,
        extra_scores=evaluation.extra_scores,
    )
