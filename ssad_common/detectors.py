"""The detectors a job may choose (issue 12 §2), torch-free: the API checks a request's
choice and charges its compute against the tenant's quota with these; the engine's
networks are in worker/core/detector.py.

* ``small`` (default): a 16-wide ResNet whose stem brings every working size down to 32 px,
  sized for a CPU; working size from the images (32, 64 or 128) or 16–256 px if asked.
* ``resnet18``: ResNet-18 trained from scratch (DSV's protocol), sized for a GPU; working
  size 128–256 px (default 224 for images at least that large, else 128).

A job's compute is counted in training images of the small detector:
n_trials × train_steps × batch_size × :func:`compute_factor`. The factor is the detector's
training FLOPs per image (forward and backward) over the small detector's at 32 px,
measured with torch's FLOP counter (tests/test_detectors.py checks it): the small one costs
about the same at every working size (its stem downsamples), ResNet-18 grows with the
square of the size, 141.5× at 224 px.
"""

from __future__ import annotations

from typing import Final, get_args

from ssad_common.jobspec import DEFAULT_DETECTOR, DetectorName
from ssad_common.search_space import auto_image_size

DETECTORS: Final[tuple[DetectorName, ...]] = get_args(DetectorName)

#: Working sizes (px) each detector accepts.
SIZE_RANGE: Final[dict[str, tuple[int, int]]] = {"small": (16, 256), "resnet18": (128, 256)}

#: ResNet-18's training FLOPs per image at 224 px over the small detector's at 32 px.
RESNET18_FACTOR_AT_224: Final = 141.5


def working_size(detector: str, requested: int | None, height: int, width: int) -> int:
    """The working size a job's images are resized to (ValueError: out of range)."""
    low, high = SIZE_RANGE[detector]
    if requested is not None:
        if not low <= requested <= high:
            raise ValueError(f"image_size must be in [{low}, {high}] for the {detector} "
                             f"detector, got {requested}")
        return requested
    if detector == "resnet18":
        return 224 if max(height, width) >= 224 else 128
    return auto_image_size(height, width)


def compute_factor(detector: str, size: int) -> float:
    """Training cost per image relative to the small detector at 32 px."""
    if detector == "resnet18":
        return RESNET18_FACTOR_AT_224 * (size / 224) ** 2
    return 1.0


__all__ = ["DEFAULT_DETECTOR", "DETECTORS", "SIZE_RANGE", "DetectorName", "compute_factor",
           "working_size"]
