"""What one job may cost, checked when it is created (torch-free).

A job's cost is set by a few request fields and the train set's size (method.md §2, §4):

* |Y|, the augmented train images each trial embeds and scores, is |X|·r/(1−r) with
  r = ``contamination`` and |X| = min(train images, 2000). It grows without bound as r → 1
  (r = 0.999 on 120 images: 119,880 images per trial), so it is capped by
  ``SSAD_MAX_AUGMENTED_IMAGES`` (422 beyond it, naming the largest r that fits).
* ``batch_size``: a batch is drawn with replacement from the train set, so a batch larger
  than the set only repeats images at a cost in memory (4096 on 2 images: 6.7 GB and a NaN
  loss). It is clamped to the train set's size; the job's ``spec`` says so
  (``batch_size`` is the one used, ``requested_batch_size`` the one asked for).
* Compute: n_trials × train_steps × batch_size training images, times the detector's cost
  per image relative to the default one (``ssad_common.detectors.compute_factor``: 1 for
  the small detector, about 141 for ResNet-18 at 224 px), against the tenant's
  ``max_compute_per_job`` (``SSAD_MAX_COMPUTE_PER_JOB``, or the tenant's own quota set with
  ``ssad-tune tenants quota NAME --compute-per-job N``): 403 ``ComputeQuotaExceeded``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.errors import ComputeQuotaExceeded, InvalidRequest
from service.settings import ApiSettings
from ssad_common.search_space import MAX_EMBED_TRAIN, augmented_count


@dataclass(frozen=True)
class Cost:
    batch_size: int  # the one the job will use
    n_x: int
    n_y: int
    training_images: int  # n_trials × train_steps × batch_size
    factor: float = 1.0  # the detector's cost per image (ssad_common/detectors.py)

    @property
    def compute(self) -> int:
        """Training images of the default detector this job costs."""
        return math.ceil(self.training_images * self.factor)


def check_request(*, n_trials: int, train_steps: int, batch_size: int, contamination: float,
                  n_train: int, settings: ApiSettings, factor: float = 1.0) -> Cost:
    """422 ``InvalidRequest`` if |Y| is over its cap; the cost with the batch clamped."""
    n_x = min(n_train, MAX_EMBED_TRAIN)
    n_y = augmented_count(n_x, contamination)
    cap = settings.max_augmented_images
    if n_y > cap:
        # round(n_x·r/(1−r)) <= cap holds for r <= cap/(n_x+cap); floor to 3 decimals.
        r_max = int(1000 * cap / (n_x + cap)) / 1000
        raise InvalidRequest(
            f"contamination={contamination} on {n_train} train images makes |Y| = {n_y} "
            f"augmented images per trial (|X|·r/(1−r) with |X| = {n_x}), over the limit of "
            f"{cap} (SSAD_MAX_AUGMENTED_IMAGES): use contamination <= {r_max}")
    batch = min(batch_size, n_train)
    return Cost(batch_size=batch, n_x=n_x, n_y=n_y,
                training_images=n_trials * train_steps * batch, factor=factor)


def check_compute(cost: Cost, *, n_trials: int, train_steps: int, quota: int,
                  detector: str = "small") -> None:
    if cost.compute > quota:
        weighted = ("" if cost.factor == 1.0 else
                    f" × {cost.factor:.1f} (the {detector} detector's cost per image) = "
                    f"{cost.compute:,}")
        raise ComputeQuotaExceeded(
            f"this job would train on n_trials × train_steps × batch_size = {n_trials} × "
            f"{train_steps} × {cost.batch_size} = {cost.training_images:,} images{weighted}, "
            f"over this tenant's quota of {quota:,} per job: lower one of them, or ask an "
            "operator to raise it (ssad-tune tenants quota NAME --compute-per-job N)")
