"""The trained detector in eval mode: embeddings, the multilevel scorer's features and logit
margins in batches, and the embeddings X, Y, Z that every validation loss compares
(method.md §2)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from worker.core.detector import Detector
from worker.core.scoring import multilevel_features

BATCH = 512


def _batched(forward: Callable[[Tensor], Tensor], images: Tensor, batch: int) -> Tensor:
    return torch.cat([forward(images[i:i + batch]).float()
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def embed_all(model: Detector, images: Tensor, batch: int = BATCH) -> Tensor:
    """Embeddings of ``images`` in eval mode, in batches (float32)."""
    model.eval()
    return _batched(model.embed, images, batch)


@torch.no_grad()
def embed_levels(model: Detector, images: Tensor, batch: int = BATCH) -> list[Tensor]:
    """:meth:`Detector.level_features` of ``images`` in eval mode, in batches (float32),
    one (N, dim) tensor per level."""
    model.eval()
    parts = [[m.float() for m in model.level_features(images[i:i + batch])]
             for i in range(0, len(images), batch)]
    return [torch.cat(level) for level in zip(*parts, strict=True)]


def levels_of(model: Detector, images: Tensor, batch: int = BATCH) -> np.ndarray:
    """The multilevel scorer's features of ``images`` (worker/core/scoring.py), float64."""
    return multilevel_features([m.cpu().numpy() for m in embed_levels(model, images, batch)])


@torch.no_grad()
def augmented_logits(model: Detector, images: Tensor, batch: int = BATCH) -> Tensor:
    """The classifier's "augmented" logit margin, an alternative anomaly score."""
    model.eval()
    logits = _batched(model, images, batch)
    return logits[:, 1] - logits[:, 0]


def embed_xyz(
    model: Detector,
    x_images: Tensor,
    y_images: Tensor,
    z_images: Tensor,
    augment: Callable[[Tensor, torch.Generator], Tensor],
    g: torch.Generator,
    differentiable: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """X = embeddings of ``x_images`` (train, as is), Y = of ``y_images`` augmented with
    ``g``, Z = of ``z_images`` (test), all in eval mode (batch statistics must not leak
    between the three). With ``differentiable`` the graph of Y is kept, so a loss on them
    reaches the augmentation's hyperparameters."""
    x = embed_all(model, x_images)
    with torch.set_grad_enabled(differentiable):
        y = _batched(model.embed, augment(y_images, g), BATCH)
    z = embed_all(model, z_images)
    return x, y, z
