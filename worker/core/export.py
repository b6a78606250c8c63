"""A trained detector with its fitted scorer, as bytes: what a job keeps of its best trial
so new images can be scored later exactly as its test set was (same weights, same working
size, same Ledoit–Wolf fit on the train images' embeddings, or on their multilevel
features).

The bytes are a ``torch.save`` of plain containers of tensors, numbers and strings only, so
they load with ``weights_only=True`` (no unpickling of arbitrary objects).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from worker.core.data import to_working_tensor
from worker.core.detector import Detector, DetectorConfig
from worker.core.inference import augmented_logits, embed_all, levels_of
from worker.core.scoring import mahalanobis_apply

#: Format 2 is a detector scored by ``multilevel``, which a version that knows only format 1
#: must refuse rather than score by its logit; every other detector is still written as 1.
FORMAT = 1
MULTILEVEL_FORMAT = 2
FORMATS = (FORMAT, MULTILEVEL_FORMAT)


@dataclass(frozen=True)
class ScoringModel:
    config: DetectorConfig
    state_dict: dict[str, Tensor]
    scorer: str  # "mahalanobis", "multilevel" or "logit"
    location: np.ndarray | None = None  # the Gaussian's fit (mahalanobis, multilevel)
    precision: np.ndarray | None = None

    @classmethod
    def capture(cls, model: Detector, scorer: str, location: np.ndarray | None = None,
                precision: np.ndarray | None = None) -> ScoringModel:
        return cls(model.config, {k: v.detach().to("cpu", copy=True)
                                  for k, v in model.state_dict().items()},
                   scorer, location, precision)

    def to_bytes(self) -> bytes:
        payload = {
            "format": MULTILEVEL_FORMAT if self.scorer == "multilevel" else FORMAT,
            "scorer": self.scorer,
            "config": {"in_channels": self.config.in_channels,
                       "image_size": self.config.image_size, "width": self.config.width,
                       "head_dim": self.config.head_dim, "arch": self.config.arch},
            "state_dict": self.state_dict,
            "location": None if self.location is None else torch.from_numpy(self.location),
            "precision": None if self.precision is None else torch.from_numpy(self.precision),
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ScoringModel:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") not in FORMATS:
            raise ValueError("not a stored ssad-tune detector (unknown format)")
        loc, prec = payload["location"], payload["precision"]
        return cls(DetectorConfig(**payload["config"]), dict(payload["state_dict"]),
                   str(payload["scorer"]), None if loc is None else loc.numpy(),
                   None if prec is None else prec.numpy())

    def detector(self, device: torch.device) -> Detector:
        model = Detector(self.config)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()

    def score(self, images: np.ndarray, device: torch.device) -> np.ndarray:
        """Anomaly scores of uint8 (N, C, H, W) images, higher = more anomalous."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be (N, {self.config.in_channels}, H, W) to match "
                             f"the detector, got {images.shape}")
        model = self.detector(device)
        x = to_working_tensor(images, self.config.image_size, device)
        if self.scorer == "mahalanobis":
            assert self.location is not None and self.precision is not None
            z = embed_all(model, x).cpu().numpy()
            return mahalanobis_apply(self.location, self.precision, z)
        if self.scorer == "multilevel":
            assert self.location is not None and self.precision is not None
            return mahalanobis_apply(self.location, self.precision, levels_of(model, x))
        if self.scorer != "logit":
            raise ValueError(f"a stored detector with an unknown scorer {self.scorer!r}")
        return np.asarray(augmented_logits(model, x).cpu().numpy(), dtype=np.float64)
