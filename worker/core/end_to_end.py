"""End-to-end augmentation tuning (method.md §5, after ST-SSAD): one training run.

For a differentiable family (the differentiable CutOut, ``cutdiff``), alternate

1. ``detector_steps`` detector updates with the augmentation fixed (original vs augmented,
   cross-entropy, exactly as in a search trial), and
2. one gradient step on the augmentation's hyperparameters (patch size, aspect, held in
   their ranges by a sigmoid) through the validation loss, with the detector fixed.

The result is the learned hyperparameters, their trajectory, the final validation loss and
per-image test scores from the final detector.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ssad_common.jobspec import DEFAULT_CONTAMINATION
from ssad_common.search_space import FAMILIES, ParamValue
from worker.core.augmentations import CutDiff, build_augmentation
from worker.core.data import PreparedData, evaluation_sets
from worker.core.device import make_generator, seed_everything
from worker.core.evaluation import evaluate
from worker.core.inference import embed_xyz
from worker.core.objectives import augmented_count, get_objective
from worker.core.training import DetectorTraining, TrainSettings, build_detector

DIFFERENTIABLE = tuple(name for name, f in FAMILIES.items() if f.differentiable)


@dataclass(frozen=True)
class EndToEndSettings:
    rounds: int = 40
    detector_steps: int = 10
    augmentation: str = "cutdiff"
    initial: dict[str, ParamValue] = field(default_factory=dict)
    aug_lr: float = 0.1
    objective: str = "st-ssad"
    contamination: float = DEFAULT_CONTAMINATION
    eval_images: int = 256  # train and test images per hyperparameter step
    seed: int = 0
    train: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self) -> None:
        if self.augmentation not in DIFFERENTIABLE:
            raise ValueError(
                f"end-to-end tuning needs a differentiable family ({list(DIFFERENTIABLE)}), "
                f"got {self.augmentation!r}"
            )
        if self.rounds < 1 or self.detector_steps < 1:
            raise ValueError("rounds and detector_steps must be >= 1")
        if not (self.aug_lr > 0 and math.isfinite(self.aug_lr)):
            raise ValueError("aug_lr must be a positive number")
        get_objective(self.objective)


@dataclass(frozen=True)
class EndToEndResult:
    augmentation: str
    params: dict[str, ParamValue]
    validation_loss: float
    losses: dict[str, float]
    scores: np.ndarray
    trajectory: list[dict[str, float]]
    timings: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"augmentation": self.augmentation, "params": self.params,
                "validation_loss": self.validation_loss, "losses": self.losses,
                "trajectory": self.trajectory, "timings": self.timings}


def tune_end_to_end(data: PreparedData, settings: EndToEndSettings) -> EndToEndResult:
    """Alternate detector updates and hyperparameter gradient steps; see the module doc."""
    t_start = time.perf_counter()
    device = data.train.device
    loss_fn = get_objective(settings.objective)
    seed_everything(settings.seed)
    g = make_generator(device, settings.seed)
    augment = build_augmentation(settings.augmentation, settings.initial)
    assert isinstance(augment, CutDiff)
    augment = augment.to(device)
    model = build_detector(data.channels, data.image_size, settings.train, device)
    # The detector trains in float32 here (``train.amp`` applies to search trials only).
    training = DetectorTraining(model, augment, data.train, settings.train, g, amp=False)
    aug_opt = torch.optim.Adam(augment.parameters(), lr=settings.aug_lr)
    n_train, n_test = len(data.train), len(data.test)
    trajectory: list[dict[str, float]] = []
    train_s = hyper_s = 0.0

    for round_ in range(1, settings.rounds + 1):
        t0 = time.perf_counter()
        for _ in range(settings.detector_steps):
            training.step()
        t1 = time.perf_counter()
        train_s += t1 - t0

        # One step on the augmentation's hyperparameters, detector frozen (eval mode: batch
        # statistics must not leak between X, Y and Z).
        k = min(settings.eval_images, n_train)
        x_idx = torch.randperm(n_train, generator=g, device=device)[:k]
        z_idx = torch.randperm(n_test, generator=g, device=device)[: settings.eval_images]
        n_y = max(32, augmented_count(k, settings.contamination))
        y_idx = x_idx[torch.randint(0, k, (n_y,), generator=g, device=device)]
        val = loss_fn(*embed_xyz(model, data.train[x_idx], data.train[y_idx],
                                 data.test[z_idx], augment, g, differentiable=True),
                      contamination=settings.contamination)  # n_y's floor changes |Y|/|X|
        aug_opt.zero_grad(set_to_none=True)
        val.backward()
        aug_opt.step()
        model.zero_grad(set_to_none=True)
        hyper_s += time.perf_counter() - t1
        trajectory.append({"round": float(round_), "validation_loss": float(val.detach()),
                           **{k_: float(v) for k_, v in augment.current_params().items()}})

    x_idx, y_idx = evaluation_sets(n_train, settings.contamination,
                                   settings.train.max_embed_train, g, device)
    final = evaluate(model, data, augment, x_idx, y_idx, settings.train.scorer, g)
    timings = {"total_s": time.perf_counter() - t_start, "train_s": train_s,
               "hyper_s": hyper_s, **final.timings}
    return EndToEndResult(
        augmentation=settings.augmentation,
        params=augment.current_params(),
        validation_loss=final.losses[settings.objective],
        losses=final.losses,
        scores=final.scores,
        trajectory=trajectory,
        timings=timings,
    )
