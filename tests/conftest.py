from __future__ import annotations

import numpy as np
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 digits (no download): train = zeros, test = zeros + others.

    Returns uint8 (N, 1, 8, 8) train and test arrays, and test labels (1 = not a zero), which
    only tests that measure the engine itself may read.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images / 16 * 255).astype(np.uint8)[:, None]
    zeros, others = x[d.target == 0], x[d.target != 0]
    test = np.concatenate([zeros[100:], others[:20]])
    labels = np.r_[np.zeros(len(zeros) - 100), np.ones(20)].astype(np.int64)
    return zeros[:100], test, labels


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.rand((16, 1, 32, 32), generator=g)
