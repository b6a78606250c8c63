"""Decoded dataset arrays and uploaded backbones on the worker's local disk
(``SSAD_CACHE_DIR``), by sha256."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np

from worker.manager import DatasetRef, JobManager


class ArrayCache:
    """Decoded dataset arrays on local disk, by sha256 (verified on every fill)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def file(self, sha256: str, suffix: str, manager: JobManager) -> Path:
        """The blob ``sha256`` as a local file (filled once, its hash verified)."""
        path = self.root / f"{sha256}{suffix}"
        if not path.exists():
            data = manager.load_blob(sha256)
            if hashlib.sha256(data).hexdigest() != sha256:
                raise RuntimeError(f"blob {sha256} is corrupt (hash mismatch)")
            self.root.mkdir(parents=True, exist_ok=True)
            # Unique per writer: workers in several containers share one cache volume
            # (docker compose --scale), where process ids repeat.
            tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return path

    def load(self, ref: DatasetRef, manager: JobManager) -> np.ndarray:
        path = self.file(ref.sha256, ".npy", manager)
        arr = np.load(path, allow_pickle=False)
        if arr.dtype != np.uint8 or arr.shape != (ref.n_samples, ref.channels, ref.height,
                                                  ref.width):
            path.unlink(missing_ok=True)
            raise RuntimeError(f"cached array {path} does not match dataset {ref.id}")
        return arr
