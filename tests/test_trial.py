"""One trial: determinism, outputs, detector sizes, backbone loading, pruning hook."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ssad_common.search_space import OBJECTIVE_NAMES, auto_image_size
from worker.core.data import prepare
from worker.core.detector import Detector, DetectorConfig
from worker.core.device import resolve_device
from worker.core.training import TrainSettings, TrialPruned, build_detector
from worker.core.trial import run_trial

TINY = TrainSettings(steps=6, batch_size=16, width=8)


@pytest.fixture(scope="module")
def data(digits: tuple[np.ndarray, np.ndarray, np.ndarray]):  # type: ignore[no-untyped-def]
    train, test, _ = digits
    return prepare(train, test, torch.device("cpu"))


def test_same_seed_same_result_on_cpu(data) -> None:  # type: ignore[no-untyped-def]
    a = run_trial(data, "cutpaste", {"patch_size": 0.1}, TINY, seed=3)
    b = run_trial(data, "cutpaste", {"patch_size": 0.1}, TINY, seed=3)
    c = run_trial(data, "cutpaste", {"patch_size": 0.1}, TINY, seed=4)
    assert a.validation_loss == b.validation_loss
    assert a.losses == b.losses
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.array_equal(a.scores, c.scores)


def test_trial_outputs(data) -> None:  # type: ignore[no-untyped-def]
    r = run_trial(data, "rotate", {}, TINY, objective="st-ssad", contamination=0.2, seed=0)
    assert r.augmentation == "rotate" and r.params == {"angle": 90.0}
    assert r.scores.shape == (len(data.test),) and np.isfinite(r.scores).all()
    # The objective only picks which loss is reported: training and the losses are the same.
    dsv = run_trial(data, "rotate", {}, TINY, objective="dsv", contamination=0.2, seed=0)
    assert dsv.losses == r.losses and dsv.losses["dsv"] != r.losses["st-ssad"]
    assert (dsv.validation_loss, r.validation_loss) == (r.losses["dsv"], r.losses["st-ssad"])
    assert set(r.losses) == set(OBJECTIVE_NAMES)
    assert r.n_x == len(data.train) and r.n_y == round(len(data.train) * 0.2 / 0.8)
    assert {"train_s", "augment_s", "embed_s", "loss_s", "score_s", "total_s"} <= set(r.timings)
    assert r.timings["augment_s"] < r.timings["train_s"] <= r.timings["total_s"]


def test_logit_scorer(data) -> None:  # type: ignore[no-untyped-def]
    r = run_trial(data, "invert", {}, TrainSettings(steps=6, batch_size=16, width=8,
                                                     scorer="logit"))
    assert r.scores.shape == (len(data.test),) and np.isfinite(r.scores).all()


def test_training_learns_to_separate_original_from_augmented(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """Test set = held-out originals + their inverted copies. After training on "original vs
    inverted", the classifier's logit must rank every inverted copy above the originals;
    an untrained or broken loop would not."""
    train, _, _ = digits
    held_out = train[80:]
    test = np.concatenate([held_out, 255 - held_out])
    data = prepare(train[:80], test, torch.device("cpu"))
    r = run_trial(data, "invert", {}, TrainSettings(steps=40, batch_size=16, width=8,
                                                     scorer="logit"))
    originals, inverted = r.scores[: len(held_out)], r.scores[len(held_out):]
    assert inverted.min() > originals.max()


def test_pruning_callback_stops_the_trial(data) -> None:  # type: ignore[no-untyped-def]
    seen: list[int] = []

    def report(step: int, loss: float) -> bool:
        seen.append(step)
        assert np.isfinite(loss)
        return step >= 4

    settings = TrainSettings(steps=10, batch_size=16, width=8, eval_every=2)
    with pytest.raises(TrialPruned):
        run_trial(data, "cutout", {}, settings, report=report)
    assert seen == [2, 4]


@pytest.mark.parametrize("size", [28, 32, 64, 128, 256])
def test_detector_handles_28_to_256_px(size: int) -> None:
    model = Detector(DetectorConfig(in_channels=3, image_size=size, width=8)).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        logits, emb = model(x), model.embed(x)
    assert logits.shape == (2, 2)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)


def test_auto_image_size() -> None:
    assert [auto_image_size(s, s) for s in (8, 28, 32, 64, 128, 300)] == [32, 32, 32, 64, 128,
                                                                        128]


def test_backbone_weights_load_safely(tmp_path: Path, data) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(123)  # not the trial's seed: the saved weights differ from its init
    saved = Detector(DetectorConfig(1, 32, 8)).encoder.state_dict()
    good = tmp_path / "enc.pt"
    torch.save(saved, good)
    settings = TrainSettings(steps=2, batch_size=8, width=8, backbone=str(good))
    loaded = build_detector(1, 32, settings, torch.device("cpu")).encoder.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    fresh = build_detector(1, 32, TrainSettings(width=8), torch.device("cpu")).encoder
    assert not all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())
    # The trial trains from the loaded weights, not from its own seeded initialisation.
    with_backbone = run_trial(data, "invert", {}, settings)
    without = run_trial(data, "invert", {}, TrainSettings(steps=2, batch_size=8, width=8))
    assert with_backbone.losses != without.losses
    other = tmp_path / "wide.pt"
    torch.save(Detector(DetectorConfig(1, 32, 16)).encoder.state_dict(), other)
    with pytest.raises(ValueError, match="does not match"):
        Detector(DetectorConfig(1, 32, 8)).load_backbone(other)

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("unpickled!",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(ValueError, match="cannot read"):
        Detector(DetectorConfig(1, 32, 8)).load_backbone(evil)
    with pytest.raises(ValueError, match="not found"):
        Detector(DetectorConfig(1, 32, 8)).load_backbone(tmp_path / "missing.pt")


def test_prepare_refuses_channel_mismatch_and_tiny_sets() -> None:
    grey = np.zeros((4, 1, 8, 8), np.uint8)
    rgb = np.zeros((4, 3, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="channel"):
        prepare(grey, rgb, torch.device("cpu"))
    with pytest.raises(ValueError, match="at least"):
        prepare(grey[:1], grey, torch.device("cpu"))


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            resolve_device("cuda:0")
