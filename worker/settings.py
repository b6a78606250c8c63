"""The worker's settings (``SSAD_*``): its device, lease, heartbeat, polling and cache."""

from __future__ import annotations

from ssad_common.settings import CommonSettings


class WorkerSettings(CommonSettings):
    """One per worker process (``python -m worker``)."""

    worker_device: str = "auto"
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    max_attempts: int = 3
    poll_seconds: float = 1.0
    cache_dir: str = ".ssad-cache"
