"""What the best trial's augmentation does, as a PNG: a row of train images and below each its
augmented version (rendered by the worker, which has the augmentation code and torch)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageDraw

from ssad_common.search_space import ParamValue
from worker.core.augmentations import build_augmentation


def augmentation_sample(train: torch.Tensor, family: str, params: dict[str, ParamValue],
                        n: int = 8, seed: int = 0, cell: int = 96, gap: int = 4) -> bytes:
    """PNG: ``n`` train images (float (N, C, S, S) in [0, 1], any device) on top, each one
    augmented by ``family`` with ``params`` below it, each scaled to ``cell`` pixels."""
    idx = torch.linspace(0, len(train) - 1, min(n, len(train))).round().long().to(train.device)
    originals = train[idx]
    g = torch.Generator(device=train.device).manual_seed(seed)
    with torch.no_grad():
        augmented = build_augmentation(family, params).to(train.device)(originals, g)
    rows = [originals, augmented]
    header = 22
    step = cell + gap
    canvas = Image.new("RGB", (step * len(idx) - gap, header + 2 * step - gap), "white")
    for r, batch in enumerate(rows):
        arr = (batch.clamp(0, 1).mul(255).round().byte().cpu().numpy())
        for c, img in enumerate(arr):
            pic = Image.fromarray(img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1))
            canvas.paste(pic.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST),
                         (c * step, header + r * step))
    label = f"{family} " + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
    ImageDraw.Draw(canvas).text((4, 4), f"top: train   bottom: {label}", fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _fmt(v: ParamValue) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
