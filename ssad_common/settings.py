"""What every ssad-tune process reads from ``SSAD_*`` environment variables: the database
and the log format. The API adds its own (``service/settings.py``), the worker its own
(``worker/settings.py``); the variable names are the same as ever."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

OPTUNA_SCHEMA = "optuna"


class CommonSettings(BaseSettings):
    """The settings both deployables read. See the README's table."""

    model_config = SettingsConfigDict(env_prefix="SSAD_", extra="ignore")

    database_url: str = Field("sqlite:///ssad.db", description="SQLAlchemy URL")
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one object per line, with the job id on a worker's lines")

    @property
    def embedded(self) -> bool:
        """The zero-setup mode: an SQLite file, one machine, one worker."""
        return self.database_url.startswith("sqlite")


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
