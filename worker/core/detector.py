"""The detector of method.md §2: a ResNet-style encoder, an MLP head and a 2-way classifier.

The encoder is trained from scratch by default. Inputs of any size from 28 to 256 px are
resized (by the caller, see :func:`worker.core.data.to_working_tensor`) to a working size.
Two encoders (``DetectorConfig.arch``):

* ``small`` (the CPU default): a 16-wide ResNet whose stem downsamples working sizes above
  32 px to 32 px, so that the residual stages cost the same for every input size;
* ``resnet18``: the ResNet-18 of DSV's protocol (7×7 stride-2 stem, max-pool, four stages
  of two basic blocks, 64 to 512 channels), trained from scratch at a working size of
  128–256 px: sized for a GPU.

The embedding used by the objectives and the ``mahalanobis`` scorer is the encoder's pooled
feature, L2-normalised; the ``multilevel`` scorer reads the pooled features after the stem
and after every block, unnormalised (:meth:`Detector.level_features`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssad_common.detectors import DETECTORS


@dataclass(frozen=True)
class DetectorConfig:
    in_channels: int
    image_size: int
    width: int = 16  # the small encoder's; resnet18's is fixed (64)
    head_dim: int = 128
    arch: str = "small"

    def __post_init__(self) -> None:
        if self.arch not in DETECTORS:
            raise ValueError(f"unknown detector {self.arch!r}; known: {list(DETECTORS)}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if not 16 <= self.image_size <= 512:
            raise ValueError(f"image_size must be in [16, 512], got {self.image_size}")
        if self.width < 4:
            raise ValueError(f"width must be >= 4, got {self.width}")


class BasicBlock(nn.Module):
    """A ResNet basic block (two 3×3 convolutions with batch norm and a shortcut)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Encoder(nn.Module):
    """ResNet-style encoder: stem to 32 px, then stages halving the map down to 8 px or less.

    Working size 32 → stem stride 1; 64 → stride 2; 128 → stride 2 + max-pool; and so on.
    """

    def __init__(self, in_channels: int, image_size: int, width: int) -> None:
        super().__init__()
        stem: list[nn.Module] = []
        size = image_size
        stride = 2 if size > 40 else 1
        stem += [nn.Conv2d(in_channels, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
                 nn.ReLU(inplace=True)]
        size = (size + stride - 1) // stride
        while size > 40:
            stem.append(nn.MaxPool2d(3, 2, 1))
            size = (size + 1) // 2
        self.stem = nn.Sequential(*stem)
        blocks: list[nn.Module] = [BasicBlock(width, width, 1)]
        channels = width
        while size > 8:
            blocks.append(BasicBlock(channels, channels * 2, 2))
            channels *= 2
            size = (size + 1) // 2
        self.stages = nn.Sequential(*blocks)
        self.out_dim = channels

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1)


class ResNet18Encoder(nn.Module):
    """ResNet-18 (He et al. 2016) without its classifier: 7×7 stride-2 stem and max-pool,
    then [2, 2, 2, 2] basic blocks at 64, 128, 256 and 512 channels; 512-d pooled feature."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        blocks: list[nn.Module] = []
        c_in = 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.stages = nn.Sequential(*blocks)
        self.out_dim = 512

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1)


class Detector(nn.Module):
    """Encoder → MLP head → 2-way classifier (0 = original, 1 = augmented)."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder: Encoder | ResNet18Encoder = (
            ResNet18Encoder(config.in_channels) if config.arch == "resnet18"
            else Encoder(config.in_channels, config.image_size, config.width))
        d = self.encoder.out_dim
        self.head = nn.Sequential(
            nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True), nn.Linear(d, config.head_dim)
        )
        self.classifier = nn.Linear(config.head_dim, 2)

    @staticmethod
    def _normalise_input(x: Tensor) -> Tensor:
        return (x - 0.5) / 0.25

    def features(self, x: Tensor) -> Tensor:
        """The encoder's pooled feature (before the head), not normalised."""
        return self.encoder(self._normalise_input(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (N, 2)."""
        return self.classifier(self.head(self.features(x)))

    def embed(self, x: Tensor) -> Tensor:
        """L2-normalised embedding: what the objectives and the Mahalanobis scorer see."""
        return F.normalize(self.features(x), dim=1)

    def level_features(self, x: Tensor) -> list[Tensor]:
        """The encoder's feature maps after the stem and after every block, each globally
        average-pooled (unnormalised): what the multilevel scorer fits a Gaussian to, one
        per level. The last is :meth:`features`."""
        h = self.encoder.stem(self._normalise_input(x))
        levels = [F.adaptive_avg_pool2d(h, 1).flatten(1)]  # pooled at once: no map is kept
        for block in self.encoder.stages:
            h = block(h)
            levels.append(F.adaptive_avg_pool2d(h, 1).flatten(1))
        return levels

    def load_backbone(self, path: str | Path) -> None:
        """Load encoder weights from a local file saved with ``torch.save(state_dict)``.

        The file is read with ``weights_only=True`` (never unpickles arbitrary objects). It
        must hold a state dict of this encoder architecture (same width, channels and
        working size), e.g. one saved from a previous run.
        """
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"backbone weights file not found: {path}") from None
        except Exception as exc:
            raise ValueError(f"cannot read backbone weights {path}: {exc}") from None
        if isinstance(state, dict) and "encoder" in state and isinstance(state["encoder"], dict):
            state = state["encoder"]
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a state dict")
        try:
            self.encoder.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"{path} does not match the encoder (width={self.config.width}, "
                f"channels={self.config.in_channels}, image_size={self.config.image_size}): "
                f"{str(exc).splitlines()[0]}"
            ) from None
