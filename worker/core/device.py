"""Where an engine run's tensors live and how it is made repeatable there: device choice,
bfloat16 autocast, synchronisation for honest timings, seeding, out-of-memory reasons."""

from __future__ import annotations

import random
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch


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


def autocast(device: torch.device, amp: bool) -> AbstractContextManager[object]:
    """bfloat16 autocast when ``amp`` is asked for and the device is CUDA; else nothing."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (so a wall-clock timing covers it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for one trial."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


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
