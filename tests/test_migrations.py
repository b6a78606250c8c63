"""The schema is Alembic's: upgrade head, models match migrations, downgrade works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.pg import PostgresServer


def alembic(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alembic", *args], cwd=ROOT,
                          env={**os.environ, "SSAD_DATABASE_URL": url}, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_upgrade_check_downgrade(kind: str, request: pytest.FixtureRequest,
                                 tmp_path: Path) -> None:
    if kind == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres")
        url = server.url(server.create_database())
    else:
        url = f"sqlite:///{tmp_path / 'm.db'}"
    for args in (["upgrade", "head"], ["check"], ["downgrade", "base"], ["upgrade", "head"],
                 ["check"]):
        p = alembic(url, *args)
        assert p.returncode == 0, (args, p.stdout, p.stderr)
    assert "No new upgrade operations detected" in p.stdout + p.stderr


def test_blob_chunks_are_stored_uncompressed_on_postgres(pg_url: str) -> None:
    """pglz compresses image arrays by almost nothing and more than doubles the insert
    time of a large upload (migration 0005): chunks are STORAGE EXTERNAL."""
    from sqlalchemy import text

    from common.db import make_engine

    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            storage = conn.execute(text(
                "SELECT attstorage FROM pg_attribute WHERE attrelid = 'blob_chunks'::regclass "
                "AND attname = 'data'")).scalar_one()
    finally:
        engine.dispose()
    assert storage == "e"  # EXTERNAL (was "x", EXTENDED: compressed)
