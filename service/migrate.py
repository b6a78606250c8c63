"""Alembic helpers: the schema is owned by migrations/, never by ``create_all``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

ROOT = Path(__file__).resolve().parents[1]


def migrations_dir() -> Path:
    """The schema's migrations: the copy an installed wheel ships as
    ``service._migrations``, else ./migrations of the source tree (editable installs, the
    images' /app). The wheel's comes first: beside an installed package, ROOT is
    site-packages, where a ``migrations`` folder would be another project's."""
    shipped = Path(__file__).resolve().parent / "_migrations"
    if (shipped / "env.py").is_file():
        return shipped
    tree = ROOT / "migrations"
    if (tree / "env.py").is_file():
        return tree
    raise RuntimeError(f"no migrations beside {__file__}: neither {tree} nor {shipped}")


def alembic_config(database_url: str | None = None) -> Config:
    # No alembic.ini needed: an installed wheel has none. Its logging section is only for
    # the `alembic` command line, which a source tree's alembic.ini still serves.
    cfg = Config()
    cfg.attributes["skip_logging"] = True  # called from our processes: keep their logging
    cfg.set_main_option("script_location", str(migrations_dir()))
    if database_url:
        cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade_head(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(conn: Connection) -> str | None:
    """The database's schema revision (None if never migrated); quiet, for /readyz."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one_or_none()
