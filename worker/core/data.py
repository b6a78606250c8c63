"""The images an engine run works on: uint8 arrays moved once to float tensors at the
working size on the device, and the train-set splits X (embedded as is) and Y (augmented)
that the validation losses compare (method.md §2, §4)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ssad_common.search_space import auto_image_size
from worker.core.objectives import augmented_count


@dataclass(frozen=True)
class PreparedData:
    """Train and test images as float tensors in [0, 1] at the working size, on the device."""

    train: Tensor
    test: Tensor

    @property
    def channels(self) -> int:
        return int(self.train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.shape[-1])


def to_working_tensor(images: np.ndarray, size: int, device: torch.device) -> Tensor:
    """uint8 (N, C, H, W) → float (N, C, size, size) in [0, 1] on ``device`` (antialiased)."""
    out = []
    for start in range(0, len(images), 1024):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + 1024])).to(device)
        chunk = chunk.float().div_(255.0)
        if chunk.shape[-2:] != (size, size):
            chunk = F.interpolate(chunk, size=(size, size), mode="bilinear",
                                  antialias=True, align_corners=False).clamp_(0, 1)
        out.append(chunk)
    return torch.cat(out)


def prepare(
    train: np.ndarray, test: np.ndarray, device: torch.device, image_size: int | None = None
) -> PreparedData:
    """Validate the pair and move both sets to the working size on the device, once."""
    if train.ndim != 4 or test.ndim != 4:
        raise ValueError("train and test must be uint8 (N, C, H, W)")
    if train.shape[1] != test.shape[1]:
        raise ValueError(
            f"train has {train.shape[1]} channel(s) and test has {test.shape[1]}: "
            "both sets must be grey or both RGB"
        )
    if len(train) < 2 or len(test) < 1:
        raise ValueError("need at least 2 train images and 1 test image")
    size = image_size or auto_image_size(int(train.shape[2]), int(train.shape[3]))
    return PreparedData(to_working_tensor(train, size, device),
                        to_working_tensor(test, size, device))


def evaluation_sets(
    n_train: int, contamination: float, max_train: int, g: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Indices of the train images forming X, and of those augmented to form Y."""
    if n_train > max_train:
        x_idx = torch.randperm(n_train, generator=g, device=device)[:max_train]
    else:
        x_idx = torch.arange(n_train, device=device)
    n_y = augmented_count(len(x_idx), contamination)
    y_idx = x_idx[torch.randint(0, len(x_idx), (n_y,), generator=g, device=device)]
    return x_idx, y_idx
