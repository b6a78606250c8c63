"""One trial (method.md §2, §4): augmentation → train detector → embeddings → loss → scores.

``run_trial`` is pure: arrays and settings in, a :class:`TrialResult` out; no database, no
HTTP, no Optuna. Same inputs and seed give the same result on CPU.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.jobspec import DEFAULT_BATCH_SIZE, DEFAULT_TRAIN_STEPS
from common.search_space import (
    DEFAULT_CONTAMINATION,
    MAX_EMBED_TRAIN,
    ParamValue,
    auto_image_size,
)
from worker.core.augmentations import build_augmentation
from worker.core.detector import Detector, DetectorConfig
from worker.core.export import ScoringModel
from worker.core.objectives import OBJECTIVES, augmented_count, get_objective
from worker.core.scoring import DEFAULT_SCORER, SCORERS, mahalanobis_apply, mahalanobis_fit


class TrialPruned(Exception):
    """Raised when the ``report`` callback asks to stop a trial early."""


class TrialInterrupted(Exception):
    """Raised when ``should_stop`` says so (job cancelled, worker stopping, lease lost)."""


def out_of_memory_reason(exc: BaseException) -> str | None:
    """A user-facing reason if ``exc`` is the device (or host) running out of memory, after
    releasing the allocator's cached blocks so the next trial starts clean; else None."""
    text = str(exc)
    oom = (isinstance(exc, (torch.OutOfMemoryError, MemoryError))
           or (isinstance(exc, RuntimeError) and ("out of memory" in text
                                                  or "can't allocate memory" in text)))
    if not oom:
        return None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    return (f"out of memory ({first}); a smaller batch_size, fewer or smaller images, or a "
            "device with more memory would fit")


@dataclass(frozen=True)
class TrainSettings:
    """How one detector is trained and evaluated. Defaults are sized for a 2-core CPU: see the
    README's "Defaults" section for the measured cost per trial."""

    steps: int = DEFAULT_TRAIN_STEPS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = 1e-3
    width: int = 16
    image_size: int | None = None  # working size; None = auto from the input size
    max_embed_train: int = MAX_EMBED_TRAIN  # |X| cap for the loss and the scorer's Gaussian
    scorer: str = DEFAULT_SCORER
    amp: bool = False  # bfloat16 autocast for training, CUDA only
    backbone: str | None = None  # local encoder weights file (weights_only=True)
    eval_every: int = 0  # report intermediate losses every N steps (0 = never)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError("lr must be a positive number")
        if self.scorer not in SCORERS:
            raise ValueError(f"unknown scorer {self.scorer!r}; known: {list(SCORERS)}")
        if self.max_embed_train < 2:
            raise ValueError("max_embed_train must be >= 2")


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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for one trial."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def embed_all(model: Detector, images: Tensor, batch: int = 512) -> Tensor:
    """Embeddings of ``images`` in eval mode, in batches (float32)."""
    model.eval()
    return torch.cat([model.embed(images[i:i + batch]).float()
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def augmented_logits(model: Detector, images: Tensor, batch: int = 512) -> Tensor:
    """The classifier's "augmented" logit margin, an alternative anomaly score."""
    model.eval()
    out = [model(images[i:i + batch]).float() for i in range(0, len(images), batch)]
    logits = torch.cat(out)
    return logits[:, 1] - logits[:, 0]


def build_detector(data: PreparedData, settings: TrainSettings, device: torch.device) -> Detector:
    model = Detector(DetectorConfig(data.channels, data.image_size, settings.width))
    if settings.backbone:
        model.load_backbone(settings.backbone)
    return model.to(device)


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


def run_trial(
    data: PreparedData,
    augmentation: str,
    params: Mapping[str, Any],
    settings: TrainSettings,
    objective: str = "dsv",
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
    augment = build_augmentation(augmentation, params)
    device = data.train.device
    seed_everything(seed)
    g = make_generator(device, seed)
    model = build_detector(data, settings, device)
    augment = augment.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    n_train = len(data.train)
    x_idx, y_idx = evaluation_sets(n_train, contamination, settings.max_embed_train, g, device)
    use_amp = settings.amp and device.type == "cuda"
    labels = torch.cat([torch.zeros(settings.batch_size, dtype=torch.long),
                        torch.ones(settings.batch_size, dtype=torch.long)]).to(device)

    augment_s = 0.0
    t_train = last_progress = time.perf_counter()
    model.train()
    for step in range(1, settings.steps + 1):
        if should_stop is not None and should_stop():
            raise TrialInterrupted(f"stopped at step {step}")
        batch = data.train[torch.randint(0, n_train, (settings.batch_size,), generator=g,
                                         device=device)]
        t_aug = time.perf_counter()
        with torch.no_grad():
            augmented = augment(batch, g)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        augment_s += time.perf_counter() - t_aug
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext()
        with ctx:
            loss = F.cross_entropy(model(torch.cat([batch, augmented])), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if progress is not None and (step in (1, settings.steps) or
                                     time.perf_counter() - last_progress >= progress_seconds):
            progress(step, settings.steps, float(loss.detach()))
            last_progress = time.perf_counter()
        if report is not None and settings.eval_every and step % settings.eval_every == 0 \
                and step < settings.steps:
            interim = _subsample_loss(model, data, augment, x_idx, y_idx, loss_fn, g)
            model.train()
            if report(step, interim):
                raise TrialPruned(f"pruned at step {step} (loss {interim:.4f})")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t_train

    evaluation = evaluate(model, data, augment, x_idx, y_idx, settings.scorer, g)
    total_s = time.perf_counter() - t_start
    timings = {"total_s": total_s, "train_s": train_s, "augment_s": augment_s,
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
    )


@dataclass(frozen=True)
class Evaluation:
    losses: dict[str, float]
    scores: np.ndarray
    timings: dict[str, float]
    model: ScoringModel | None = None


def evaluate(
    model: Detector,
    data: PreparedData,
    augment: torch.nn.Module,
    x_idx: Tensor,
    y_idx: Tensor,
    scorer: str,
    g: torch.Generator,
) -> Evaluation:
    """Embeddings X, Y, Z of the trained detector → every objective's loss, and the test
    scores (method.md §2, §4)."""
    t_embed = time.perf_counter()
    x = embed_all(model, data.train[x_idx])
    with torch.no_grad():
        y = embed_all(model, augment(data.train[y_idx], g))
    z = embed_all(model, data.test)
    embed_s = time.perf_counter() - t_embed

    t_loss = time.perf_counter()
    with torch.no_grad():
        losses = {name: float(o(x, y, z)) for name, o in OBJECTIVES.items()}
    loss_s = time.perf_counter() - t_loss

    t_score = time.perf_counter()
    if scorer == "mahalanobis":
        location, precision = mahalanobis_fit(x.cpu().numpy())
        scores = mahalanobis_apply(location, precision, z.cpu().numpy())
        kept = ScoringModel.capture(model, scorer, location, precision)
    else:
        scores = augmented_logits(model, data.test).cpu().numpy().astype(np.float64)
        kept = ScoringModel.capture(model, scorer)
    score_s = time.perf_counter() - t_score
    return Evaluation(losses, scores,
                      {"embed_s": embed_s, "loss_s": loss_s, "score_s": score_s}, kept)


@torch.no_grad()
def _subsample_loss(
    model: Detector,
    data: PreparedData,
    augment: torch.nn.Module,
    x_idx: Tensor,
    y_idx: Tensor,
    loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    g: torch.Generator,
    cap: int = 256,
) -> float:
    """The objective on at most ``cap`` train and test images (for pruning decisions)."""
    n_y = max(1, round(len(y_idx) * min(1.0, cap / len(x_idx))))
    x = embed_all(model, data.train[x_idx[:cap]])
    y = embed_all(model, augment(data.train[y_idx[:n_y]], g))
    z = embed_all(model, data.test[:cap])
    return float(loss_fn(x, y, z))


def resolve_device(spec: str) -> torch.device:
    """``auto`` → the first CUDA device if present, else CPU; or ``cpu``/``cuda``/``cuda:N``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {spec!r}: use auto, cpu, cuda or cuda:N")
    return device
