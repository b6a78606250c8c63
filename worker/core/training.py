"""Training a detector (method.md §2): original vs augmented images, cross-entropy. One
step, shared by a search trial (:mod:`worker.core.trial`) and end-to-end tuning
(:mod:`worker.core.end_to_end`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssad_common.jobspec import DEFAULT_BATCH_SIZE, DEFAULT_TRAIN_STEPS
from ssad_common.search_space import MAX_EMBED_TRAIN
from worker.core.detector import Detector, DetectorConfig
from worker.core.device import autocast
from worker.core.scoring import DEFAULT_SCORER, SCORERS


class TrialPruned(Exception):
    """Raised when the ``report`` callback asks to stop a trial early."""


class TrialInterrupted(Exception):
    """Raised when ``should_stop`` says so (job cancelled, worker stopping, lease lost)."""


@dataclass(frozen=True)
class TrainSettings:
    """How one detector is trained and evaluated. Defaults are sized for a 2-core CPU: see the
    README's "Defaults" section for the measured cost per trial."""

    steps: int = DEFAULT_TRAIN_STEPS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = 1e-3
    width: int = 16
    arch: str = "small"  # the encoder: small (CPU default) or resnet18 (worker/core/detector.py)
    image_size: int | None = None  # working size; None = auto from the input size
    max_embed_train: int = MAX_EMBED_TRAIN  # |X| cap for the loss and the scorer's Gaussian
    scorer: str = DEFAULT_SCORER
    #: other scorers whose scores each trial also keeps (TrialResult.extra_scores; benchmarks)
    also_score: tuple[str, ...] = ()
    amp: bool = True  # bfloat16 autocast for training on CUDA (on a CPU: nothing)
    backbone: str | None = None  # local encoder weights file (weights_only=True)
    eval_every: int = 0  # report intermediate losses every N steps (0 = never)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError("lr must be a positive number")
        for scorer in (self.scorer, *self.also_score):
            if scorer not in SCORERS:
                raise ValueError(f"unknown scorer {scorer!r}; known: {list(SCORERS)}")
        if self.max_embed_train < 2:
            raise ValueError("max_embed_train must be >= 2")


def build_detector(
    channels: int, image_size: int, settings: TrainSettings, device: torch.device
) -> Detector:
    """A fresh detector for images of this shape, with the backbone's weights if one is set."""
    model = Detector(DetectorConfig(channels, image_size, settings.width, arch=settings.arch))
    if settings.backbone:
        model.load_backbone(settings.backbone)
    model = model.to(device)
    if device.type == "cuda":  # convolutions run fastest on NHWC tensors there
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


class DetectorTraining:
    """The detector's optimiser and its training step on ``train`` images with a fixed
    augmentation: a batch drawn with ``g``, its augmented copy, cross-entropy between the
    two classes, one Adam update."""

    def __init__(self, model: Detector, augment: nn.Module, train: Tensor,
                 settings: TrainSettings, g: torch.Generator, amp: bool) -> None:
        self.model, self.augment, self.train, self.g, self.amp = model, augment, train, g, amp
        self.device = train.device
        self.batch_size = settings.batch_size
        self.optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
        self.labels = torch.cat([torch.zeros(self.batch_size, dtype=torch.long),
                                 torch.ones(self.batch_size, dtype=torch.long)]).to(self.device)
        self.cuda = self.device.type == "cuda"
        self._augment_s = 0.0  # CPU: seconds spent augmenting, over all steps
        # CUDA: a pair of events per step, read once at the end: timing the augmentation
        # with a host clock would wait for the device at every step.
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @property
    def augment_s(self) -> float:
        """Seconds spent augmenting so far (on CUDA this waits for the device once)."""
        if not self._events:
            return self._augment_s
        self._events[-1][1].synchronize()
        return sum(a.elapsed_time(b) for a, b in self._events) / 1000.0

    def step(self) -> Tensor:
        """One update; returns the batch's loss (still on the device). On CUDA nothing in
        here waits for the device."""
        self.model.train()
        batch = self.train[torch.randint(0, len(self.train), (self.batch_size,),
                                         generator=self.g, device=self.device)]
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
        else:
            t_aug = time.perf_counter()
        with torch.no_grad():
            augmented = self.augment(batch, self.g)
        if self.cuda:
            end.record()
            self._events.append((start, end))
        else:
            self._augment_s += time.perf_counter() - t_aug
        inputs = torch.cat([batch, augmented])
        if self.cuda:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp):
            loss = F.cross_entropy(self.model(inputs), self.labels)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        return loss
