"""Configuration of every ssad-tune process, from ``SSAD_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

OPTUNA_SCHEMA = "optuna"


class Settings(BaseSettings):
    """One settings object per process (API, worker, embedded). See the README's table."""

    model_config = SettingsConfigDict(env_prefix="SSAD_", extra="ignore")

    database_url: str = Field("sqlite:///ssad.db", description="SQLAlchemy URL")
    host: str = "127.0.0.1"
    port: int = 8000
    embedded_worker: bool = Field(True, description="python -m service also starts a worker")
    auth: Literal["required", "off"] = Field(
        "required", description="required: every /v1 request needs `Authorization: Bearer "
        "<key>`; off: single-user mode, everything belongs to the default tenant")
    worker_device: str = "auto"
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

    log_format: Literal["text", "json"] = Field(
        "text", description="json: one object per line, with the job id on a worker's lines")

    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    max_attempts: int = 3
    poll_seconds: float = 1.0
    cache_dir: str = ".ssad-cache"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def optuna_storage_url(database_url: str) -> str:
    """Where a job's Optuna study lives: its own schema (``optuna``) on Postgres, its own
    file (``<name>-optuna.db``) beside an SQLite database, never among Alembic's tables.

    The URL works as is for ``optuna-dashboard <url>``.
    """
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        db = url.database or ""
        if db in ("", ":memory:"):
            raise ValueError("an in-memory SQLite database cannot hold Optuna studies")
        stem = db[:-3] if db.endswith(".db") else db
        return str(url.set(database=f"{stem}-optuna.db"))
    if url.get_backend_name() == "postgresql":
        return url.update_query_dict(
            {"options": f"-csearch_path={OPTUNA_SCHEMA}"}
        ).render_as_string(hide_password=False)
    raise ValueError(f"unsupported database {url.get_backend_name()!r}: use postgresql or sqlite")
