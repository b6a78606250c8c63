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
    # for a connection gets 503 with Retry-After. The reads clients poll (service/reads.py)
    # have a pool of their own, of up to db_pool_size connections.
    db_pool_size: int = 10
    db_max_overflow: int = 20
    db_pool_timeout_seconds: float = 10.0

    max_upload_bytes: int = 512 * 1024**2
    max_backbone_bytes: int = Field(256 * 1024**2, description="the largest backbone file "
                                    "(ResNet-18's encoder is about 45 MB)")
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
        "train_steps × batch_size × the detector's cost per image (1 for the small one; "
        "ssad_common.detectors.compute_factor) (403 ComputeQuotaExceeded beyond it)")
    idempotency_ttl_hours: float = 24.0
    # Parallel trials (a job's `parallelism`): what a job gets when it does not say, and the
    # most it may ask for (422 beyond it). 1 suits the embedded single-worker mode; a fleet
    # of N workers sets the default nearer N.
    default_parallelism: int = Field(1, ge=1)
    max_parallelism: int = Field(16, ge=1)

    # Webhooks (service/webhooks.py): each API process sends the notices of ended jobs.
    webhook_dispatch: bool = Field(True, description="this process sends webhook notices")
    webhook_allow_private: bool = Field(
        False, description="let notify_url reach loopback, private and link-local addresses "
        "(refused by default: SSRF)")
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="per attempt")
    webhook_retry_seconds: float = Field(
        24 * 3600.0, gt=0, description="a notice not delivered this long after the job "
        "ended is marked failed")
    webhook_backoff_seconds: float = Field(2.0, gt=0, description="first retry's delay; "
                                           "doubled after each failed attempt")
    webhook_max_backoff_seconds: float = Field(600.0, gt=0)
    webhook_poll_seconds: float = Field(1.0, gt=0, description="how often due notices are "
                                        "looked for")
    webhook_senders: int = Field(4, ge=1, description="requests in flight at once")
    # Report links (service/report.py): a signed, expiring URL a browser can open without
    # an Authorization header.
    link_secret: str | None = Field(
        None, description="key that signs report links; unset: one made on first use and "
        "kept in the database (shared by every API replica)")
    link_ttl_seconds: int = Field(24 * 3600, ge=60, le=30 * 24 * 3600,
                                  description="how long a report link stays valid")

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
