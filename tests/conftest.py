from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from service import migrate
from tests.pg import PostgresServer, running_postgres

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


# --------------------------------------------------------------------------- databases


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def pg_template(postgres: PostgresServer) -> str:
    """A migrated database that each test clones (CREATE DATABASE ... TEMPLATE)."""
    name = postgres.create_database()
    migrate.upgrade_head(postgres.url(name))
    return name


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    migrate.upgrade_head(f"sqlite:///{path}")
    return path


def fresh_database(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, migrated, empty database of ``kind`` (postgres or sqlite) for one test."""
    if kind == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres")
        return server.url(server.create_database(request.getfixturevalue("pg_template")))
    template: Path = request.getfixturevalue("sqlite_template")
    target = tmp_path / "ssad.db"
    shutil.copy(template, target)
    return f"sqlite:///{target}"


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs on a real Postgres and on SQLite."""
    return fresh_database(request.param, request, tmp_path)


@pytest.fixture
def pg_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Postgres only (for what SQLite cannot show, e.g. concurrent claimers)."""
    return fresh_database("postgres", request, tmp_path)


# --------------------------------------------------------------------------- lanes

POSTGRES_FIXTURES = {"postgres", "pg_template", "pg_url", "own_postgres"}
# Modules whose tests start processes (API, workers, the CLI, alembic, a browser) or train
# detectors for real: the fast lane leaves them to `make test`.
SERVER_MODULES = {"test_acknowledged", "test_client", "test_client_library", "test_deploy",
                  "test_docs_page", "test_examples", "test_faults", "test_migrations",
                  "test_operations", "test_parallel", "test_queue", "test_report_browser",
                  "test_scoring",
                  "test_worker"}
# ...or fuzz the whole API (schemathesis: many requests per operation).
SLOW_MODULES = {"test_detectors", "test_end_to_end", "test_fuzz", "test_multilevel",
                "test_study", "test_trial", "test_tune"}
# ...or one test of a module that starts processes:
SERVER_TESTS = {"test_keys_cli", "test_the_api_process_never_imports_torch",
                "test_a_slow_receiver_delays_neither_the_job_nor_other_notices",
                "test_a_worker_trains_from_the_backbone_and_refuses_one_that_does_not_fit"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the Postgres server (``postgres``), starts processes
    (``server``) or trains for real (``slow``), so the fast lane (``make test-fast``) can
    leave them out; ``make test`` runs everything."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("db_url") == "postgres"
        if names & POSTGRES_FIXTURES or on_postgres:
            item.add_marker(pytest.mark.postgres)
        module = item.path.stem
        if module in SERVER_MODULES or item.name.split("[")[0] in SERVER_TESTS:
            item.add_marker(pytest.mark.server)
        if module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
