"""The API's settings (``SSAD_*``): where it listens, who may call it, its limits and quotas."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field

from ssad_common.settings import CommonSettings


class ApiSettings(CommonSettings):
    """One per API process (``python -m service``, uvicorn's factory, the admin CLI)."""

    host: str = "127.0.0.1"
    port: int = 8000
    embedded_worker: bool = Field(True, description="python -m service also starts a worker")
    auth: Literal["required", "off"] = Field(
        "required", description="required: every /v1 request needs `Authorization: Bearer "
        "<key>`; off: single-user mode, everything belongs to the default tenant. Unset, "
        "`python -m service` on SQLite (the embedded mode) runs with off")
    # The API's connection pool (Postgres): a request that waits longer than the timeout
    # for a connection gets 503 with Retry-After.
    db_pool_size: int = 10
    db_max_overflow: int = 20
    db_pool_timeout_seconds: float = 10.0

    max_upload_bytes: int = 512 * 1024**2
    max_images: int = 200_000
    max_pixels_per_image: int = 1024 * 1024
    max_decoded_bytes: int = 2 * 1024**3
    max_trials_per_job: int = 500
    max_train_steps: int = 100_000
    max_augmented_images: int = Field(
        2000, description="|Y|, the augmented train images a trial embeds: |X|·r/(1−r) with r "
        "the job's contamination and |X| = min(train images, 2000); 422 beyond it")
    # Per-tenant quotas (a tenant's own row may override each): 429 (active jobs) or 403
    # (stored bytes, trials, compute) beyond them.
    max_active_jobs: int = 8
    max_stored_bytes: int = 20 * 1024**3
    max_compute_per_job: int = Field(
        50_000_000, description="training images one job may process: n_trials × "
        "train_steps × batch_size (403 ComputeQuotaExceeded beyond it)")
    idempotency_ttl_hours: float = 24.0
    # Parallel trials (a job's `parallelism`): what a job gets when it does not say, and the
    # most it may ask for (422 beyond it). 1 suits the embedded single-worker mode; a fleet
    # of N workers sets the default nearer N.
    default_parallelism: int = Field(1, ge=1)
    max_parallelism: int = Field(16, ge=1)

    def for_embedded_mode(self) -> ApiSettings:
        """What ``python -m service`` runs with: on SQLite (single user, one machine) no keys
        unless SSAD_AUTH says so. Anything else that builds the app (uvicorn's factory, the
        images) keeps the safe default, required, whatever the database."""
        if self.embedded and "auth" not in self.model_fields_set:
            return self.model_copy(update={"auth": "off"})
        return self


@lru_cache(maxsize=1)
def get_settings() -> ApiSettings:
    return ApiSettings()
