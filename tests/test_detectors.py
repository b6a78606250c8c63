"""The detectors a job may choose (issue 12 §2): the small CPU-sized one and ResNet-18 at
128-256 px. The compute factor the quota charges matches the FLOPs torch counts, the
working-size rules are the API's and the engine's, and a ResNet-18 trial runs, is stored
and scores new images (on CPU here; on CUDA in bench/gpu.sh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ssad_common.detectors import SIZE_RANGE, compute_factor, working_size
from worker.core.data import prepare
from worker.core.detector import Detector, DetectorConfig
from worker.core.export import ScoringModel
from worker.core.training import TrainSettings
from worker.core.trial import run_trial


def train_flops(arch: str, size: int, channels: int = 1) -> float:
    """Training FLOPs per image (forward and backward), counted by torch."""
    model = Detector(DetectorConfig(channels, size, arch=arch))
    x = torch.rand(2, channels, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


def test_the_compute_factor_is_the_counted_flops_ratio() -> None:
    base = train_flops("small", 32)
    for size in (128, 192, 224, 256):
        measured = train_flops("resnet18", size) / base
        assert measured == pytest.approx(compute_factor("resnet18", size), rel=0.05), size
    # The small detector's stem brings every size to 32 px: about the same cost at each.
    for size in (16, 48, 64, 128, 256):
        assert train_flops("small", size) / base <= 1.15 * compute_factor("small", size)


def test_working_size_rules() -> None:
    assert working_size("small", None, 28, 28) == 32
    assert working_size("small", None, 300, 300) == 128
    assert working_size("small", 48, 28, 28) == 48
    assert working_size("resnet18", None, 28, 28) == 128
    assert working_size("resnet18", None, 300, 250) == 224
    assert working_size("resnet18", 160, 28, 28) == 160
    low, high = SIZE_RANGE["resnet18"]
    for bad in (low - 1, high + 1):
        with pytest.raises(ValueError, match="image_size must be in"):
            working_size("resnet18", bad, 28, 28)


@pytest.mark.parametrize("channels", [1, 3])
def test_resnet18_embeds_at_its_sizes(channels: int) -> None:
    model = Detector(DetectorConfig(channels, 128, arch="resnet18")).eval()
    with torch.no_grad():
        z = model.embed(torch.rand(3, channels, 128, 128))
        logits = model(torch.rand(3, channels, 128, 128))
    assert z.shape == (3, 512) and logits.shape == (3, 2)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="unknown detector"):
        DetectorConfig(1, 128, arch="resnet50")


def test_a_resnet18_trial_runs_is_stored_and_scores(
        digits: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    train, test, _ = digits
    data = prepare(train[:40], test[:12], torch.device("cpu"), 128)
    settings = TrainSettings(steps=2, batch_size=4, arch="resnet18")
    r = run_trial(data, "cutout", {"patch_size": 0.1}, settings, seed=0)
    assert r.scores.shape == (12,) and np.isfinite(r.scores).all()
    assert r.model is not None and r.model.config.arch == "resnet18"
    back = ScoringModel.from_bytes(r.model.to_bytes())
    assert back.config == r.model.config
    again = back.score(test[:12], torch.device("cpu"))
    np.testing.assert_allclose(again, r.scores, rtol=1e-4, atol=1e-4)


def test_detectors_stored_before_the_choice_load_as_small() -> None:
    model = Detector(DetectorConfig(1, 32, width=8))
    stored = ScoringModel.capture(model, "logit")
    payload = stored.to_bytes()
    loaded = ScoringModel.from_bytes(payload)
    assert loaded.config.arch == "small"
    import io

    old = torch.load(io.BytesIO(payload), weights_only=True)
    del old["config"]["arch"]  # as written before the choice existed
    buf = io.BytesIO()
    torch.save(old, buf)
    assert ScoringModel.from_bytes(buf.getvalue()).config.arch == "small"


def test_a_jobs_detector_reaches_the_engine() -> None:
    from ssad_common.jobspec import TuneSpec
    from worker.runner import study_settings

    spec = TuneSpec(train_dataset_id="a", test_dataset_id="b", n_trials=2, objective="dsv",
                    contamination=0.1, train_steps=10, batch_size=8, seed=0,
                    detector="resnet18", image_size=160)
    assert study_settings(spec).train.arch == "resnet18"
    old = TuneSpec(train_dataset_id="a", test_dataset_id="b", n_trials=2, objective="dsv",
                   contamination=0.1, train_steps=10, batch_size=8, seed=0)
    assert (old.detector, old.image_size, study_settings(old).train.arch) == (
        "small", None, "small")
