"""The multilevel scorer: a Gaussian on the encoder's pooled features at every level; its
fit kept with a stored detector so new images score as the test set did; the stored format
before it still loads; benchmarks' second scorer on the same detector."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from ssad_common.jobspec import DEFAULT_SCORER
from worker.core.data import prepare, to_working_tensor
from worker.core.detector import Detector, DetectorConfig
from worker.core.export import ScoringModel
from worker.core.inference import embed_all, levels_of
from worker.core.scoring import mahalanobis_apply, multilevel_features
from worker.core.training import TrainSettings
from worker.core.trial import run_trial

TINY = TrainSettings(steps=6, batch_size=16, width=8)


def test_multilevel_features_are_every_level_side_by_side() -> None:
    a, b = np.ones((3, 2), np.float32), np.arange(12.0).reshape(3, 4)
    both = multilevel_features([a, b])
    assert both.shape == (3, 6) and both.dtype == np.float64
    np.testing.assert_array_equal(both[:, 2:], b)
    with pytest.raises(ValueError, match="at least one level"):
        multilevel_features([])


@pytest.mark.parametrize("arch,size", [("small", 32), ("resnet18", 128)])
def test_levels_end_with_the_embeddings_feature(arch: str, size: int) -> None:
    torch.manual_seed(0)
    model = Detector(DetectorConfig(1, size, width=4, arch=arch)).eval()
    x = torch.rand(3, 1, size, size)
    with torch.no_grad():
        levels = model.level_features(x)
        feature = model.features(x)
    # the stem, then one per block: 1 + 3 blocks (small at 32 px), 1 + 8 (ResNet-18)
    assert len(levels) == (4 if arch == "small" else 9)
    torch.testing.assert_close(levels[-1], feature)
    assert all(m.shape[0] == 3 and m.ndim == 2 for m in levels)


def test_stored_multilevel_detector_scores_new_images_as_the_trial_did(
        digits: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    train, test, _ = digits
    cpu = torch.device("cpu")
    data = prepare(train, test, cpu)
    r = run_trial(data, "cutpaste", {"patch_size": 0.1},
                  TrainSettings(steps=6, batch_size=16, width=8, scorer="multilevel"), seed=1)
    assert r.model is not None and r.model.scorer == "multilevel"
    payload = r.model.to_bytes()
    assert torch.load(io.BytesIO(payload), weights_only=True)["format"] == 2
    back = ScoringModel.from_bytes(payload)
    assert back.scorer == "multilevel" and back.location is not None
    # the Gaussian is on every level (8 + 8 + 16 + 32 wide at width 8), not the embedding only
    assert back.location.shape == (64,)
    # scoring the test set again with the stored detector reproduces the trial's scores
    np.testing.assert_allclose(back.score(test, cpu), r.scores, rtol=1e-6)
    # the trial's fit is on the train images: they score lower than images it never saw
    assert back.precision is not None
    train_features = levels_of(back.detector(cpu), to_working_tensor(train, 32, cpu))
    assert np.median(mahalanobis_apply(back.location, back.precision, train_features)) \
        < np.median(r.scores)


def test_a_detector_stored_in_the_first_format_still_loads() -> None:
    model = Detector(DetectorConfig(1, 32, width=4))
    dim = model.features(torch.zeros(1, 1, 32, 32)).shape[1]
    first = {"format": 1, "scorer": "mahalanobis",
             "config": {"in_channels": 1, "image_size": 32, "width": 4, "head_dim": 128,
                        "arch": "small"},
             "state_dict": model.state_dict(), "location": torch.zeros(dim),
             "precision": torch.eye(dim, dtype=torch.float64)}
    buf = io.BytesIO()
    torch.save(first, buf)
    back = ScoringModel.from_bytes(buf.getvalue())
    assert back.scorer == "mahalanobis"
    images = np.random.default_rng(0).integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    cpu = torch.device("cpu")
    # a Gaussian on the embedding, as format 1 always meant: with a zero mean and an
    # identity precision, the norm of the (unit) embedding, 1
    unit = embed_all(back.detector(cpu), to_working_tensor(images, 32, cpu)).numpy()
    np.testing.assert_allclose(back.score(images, cpu), mahalanobis_apply(np.zeros(dim),
                                                                          np.eye(dim), unit))
    np.testing.assert_allclose(back.score(images, cpu), 1.0, rtol=1e-5)
    stranger = ScoringModel(back.config, back.state_dict, "telepathy")
    with pytest.raises(ValueError, match="unknown scorer"):
        stranger.score(images, torch.device("cpu"))


def test_a_trial_also_keeps_another_scorers_scores_of_the_same_detector(
        digits: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    train, test, _ = digits
    data = prepare(train, test, torch.device("cpu"))
    both = run_trial(data, "rotate", {}, TrainSettings(steps=6, batch_size=16, width=8,
                                                        scorer="multilevel",
                                                        also_score=("mahalanobis",)), seed=2)
    alone = run_trial(data, "rotate", {}, TrainSettings(steps=6, batch_size=16, width=8,
                                                         scorer="mahalanobis"), seed=2)
    assert set(both.extra_scores) == {"mahalanobis"}
    np.testing.assert_array_equal(both.extra_scores["mahalanobis"], alone.scores)
    assert not np.allclose(both.scores, alone.scores)
    assert both.losses == alone.losses  # the scorer never changes the choice's inputs
    with pytest.raises(ValueError, match="unknown scorer"):
        TrainSettings(also_score=("telepathy",))
    assert alone.model is not None  # a Gaussian on the embedding is stored as format 1
    assert torch.load(io.BytesIO(alone.model.to_bytes()), weights_only=True)["format"] == 1
    # what a job gets without asking (docs/benchmarks.md §7, *The scorer*)
    assert DEFAULT_SCORER == "multilevel"
    assert TrainSettings().scorer == "multilevel"
