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

    from ssad_common.db import make_engine

    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            storage = conn.execute(text(
                "SELECT attstorage FROM pg_attribute WHERE attrelid = 'blob_chunks'::regclass "
                "AND attname = 'data'")).scalar_one()
    finally:
        engine.dispose()
    assert storage == "e"  # EXTERNAL (was "x", EXTENDED: compressed)


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_job_kind_is_backfilled_from_the_spec_and_nothing_else_is_lost(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Migration 0007: a scoring job's spec says so, a tuning job's never did; the column
    takes the kind, and the jobs' events survive (on SQLite the table is altered in place:
    a batch copy of ``jobs`` with foreign keys on would cascade to them)."""
    from sqlalchemy import text

    from ssad_common.db import make_engine

    if kind == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres")
        url = server.url(server.create_database())
    else:
        url = f"sqlite:///{tmp_path / 'm.db'}"
    assert alembic(url, "upgrade", "0006").returncode == 0
    tenant = "00000000-0000-0000-0000-000000000000"  # 0002's default tenant
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO blobs (sha256, size_bytes, n_chunks, created_at) "
                              "VALUES ('x', 0, 0, CURRENT_TIMESTAMP)"))
            conn.execute(text(
                "INSERT INTO datasets (id, tenant_id, name, sha256, n_samples, channels, "
                "height, width, size_bytes, names, created_at) VALUES ('d', :t, 'd', 'x', 2, "
                "1, 8, 8, 128, '[]', CURRENT_TIMESTAMP)"), {"t": tenant})
            for job_id, spec in (("tune", '{"n_trials": 3}'),
                                 ("score", '{"kind": "score", "source_job_id": "tune"}')):
                conn.execute(text(
                    "INSERT INTO jobs (id, tenant_id, status, train_dataset_id, "
                    "test_dataset_id, spec, n_trials, trials_completed, attempt, "
                    "cancel_requested, created_at) VALUES (:id, :t, 'queued', 'd', 'd', "
                    ":spec, 1, 0, 0, false, CURRENT_TIMESTAMP)"),
                    {"id": job_id, "t": tenant, "spec": spec})
                conn.execute(text(
                    "INSERT INTO job_events (job_id, at, status, attempt, message) VALUES "
                    "(:id, CURRENT_TIMESTAMP, 'queued', 0, 'queued')"), {"id": job_id})
        p = alembic(url, "upgrade", "head")
        assert p.returncode == 0, p.stderr
        with engine.connect() as conn:
            kinds = dict(conn.execute(text("SELECT id, kind FROM jobs")).all())
            events = conn.execute(text("SELECT count(*) FROM job_events")).scalar_one()
        assert kinds == {"tune": "tune", "score": "score"}
        assert events == 2
    finally:
        engine.dispose()


def test_upgrading_a_populated_sqlite_database_keeps_every_child_row(tmp_path: Path) -> None:
    """SQLite alters tables by copying them (0002 does so to ``jobs``); with foreign keys on
    that copy's DROP TABLE cascaded to every job's events and trials. A database with data
    at the first revision keeps all of it through to head."""
    from sqlalchemy import text

    from ssad_common.db import make_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    assert alembic(url, "upgrade", "0001").returncode == 0
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO blobs VALUES ('x', 0, 0, CURRENT_TIMESTAMP)"))
            conn.execute(text(
                "INSERT INTO datasets (id, name, sha256, n_samples, channels, height, width, "
                "size_bytes, names, created_at) VALUES ('d', 'd', 'x', 2, 1, 8, 8, 128, '[]', "
                "CURRENT_TIMESTAMP)"))
            conn.execute(text(
                "INSERT INTO jobs (id, status, train_dataset_id, test_dataset_id, spec, "
                "n_trials, trials_completed, attempt, cancel_requested, created_at) VALUES "
                "('j', 'succeeded', 'd', 'd', '{}', 1, 1, 1, 0, CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO job_events (job_id, at, status, attempt) VALUES "
                              "('j', CURRENT_TIMESTAMP, 'queued', 0), "
                              "('j', CURRENT_TIMESTAMP, 'succeeded', 1)"))
        p = alembic(url, "upgrade", "head")
        assert p.returncode == 0, p.stderr
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 1
            assert conn.execute(text("SELECT count(*) FROM job_events")).scalar_one() == 2
    finally:
        engine.dispose()
