"""The end-to-end tuner: the patch size moves by gradient and stays in its range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.core.data import prepare
from worker.core.end_to_end import EndToEndSettings, tune_end_to_end
from worker.core.training import TrainSettings


@pytest.mark.parametrize("objective", ["st-ssad", "tail-energy"])
def test_end_to_end_learns_and_stays_in_range(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray], objective: str,
) -> None:
    train, test, _ = digits
    data = prepare(train[:60], test[:40], torch.device("cpu"))
    settings = EndToEndSettings(rounds=5, detector_steps=2, aug_lr=0.5, eval_images=32,
                                train=TrainSettings(batch_size=8, width=8),
                                initial={"patch_size": 0.05}, objective=objective)
    r = tune_end_to_end(data, settings)
    sizes = [t["patch_size"] for t in r.trajectory]
    assert len(sizes) == 5
    assert all(0.005 <= s <= 0.5 for s in sizes)
    assert len(set(sizes)) == 5  # every round moved the hyperparameter
    assert r.params["patch_size"] == sizes[-1]
    assert r.scores.shape == (40,) and np.isfinite(r.scores).all()
    again = tune_end_to_end(data, settings)
    assert again.trajectory == r.trajectory  # seeded


def test_end_to_end_needs_a_differentiable_family() -> None:
    with pytest.raises(ValueError, match="differentiable"):
        EndToEndSettings(augmentation="cutout")
