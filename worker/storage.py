"""Each job's Optuna study storage, opened safely by many workers at once.

Opening an :class:`optuna.storages.RDBStorage` creates Optuna's tables when they are
missing (``create_all``, then a version row and its own Alembic stamp). Two workers doing
that at once on a fresh Postgres database collide (a unique violation on ``CREATE TYPE``,
or on the version row), and the job used to fail. Here:

* on Postgres the creation runs under a transaction-level advisory lock
  (``pg_advisory_xact_lock``), so workers open the storage one at a time; the lock goes
  with the transaction, so a worker that dies holding it releases it;
* on SQLite the database's own write lock already serialises DDL; the only window left
  (check-then-create) ends in "table already exists", which the retry below resolves;
* any database error while opening is retried with backoff (the creation races end in
  unique violations); if an outage outlasts the retries, :class:`StorageUnavailable` is
  raised, and the runner gives the job back to the queue (free, see
  ``JobManager.release``, up to ``runner.MAX_OUTAGE_RELEASES``); any other lasting error
  (no permission to create tables, say) is raised as it is and fails the job with it.

Why not create Optuna's tables in our Alembic migration: Optuna's schema is versioned by
Optuna itself (its own version table and migrations): a newer Optuna in the worker image may
add tables at run time, which the lock covers too, while a migration of ours would only
cover the Optuna present when it ran.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import optuna
from sqlalchemy import pool, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from ssad_common.db import is_transient, make_engine
from ssad_common.settings import optuna_storage_url

log = logging.getLogger("ssad.worker")

#: The advisory lock key every ssad-tune worker takes while opening Optuna's storage.
STORAGE_LOCK_KEY = 0x55AD_7E0_0971  # "ssad tune, issue 9"; any fixed bigint works

#: The storage last opened, by database URL: a worker serves one database, so one is kept
#: (an in-process caller switching databases, e.g. the tests, closes the previous one's
#: connections rather than holding them open).
_opened: tuple[str, optuna.storages.RDBStorage] | None = None
_guard = threading.Lock()


class StorageUnavailable(Exception):
    """Optuna's storage could not be opened (the database refused, after retries)."""


@contextmanager
def creation_lock(database_url: str) -> Iterator[None]:
    """Hold the storage-creation lock (Postgres); a no-op on SQLite (see the module doc)."""
    if make_url(database_url).get_backend_name() != "postgresql":
        yield
        return
    engine = make_engine(database_url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": STORAGE_LOCK_KEY})
            yield
    finally:
        engine.dispose()


def open_study_storage(database_url: str, attempts: int = 6,
                       first_delay: float = 0.25) -> optuna.storages.RDBStorage:
    """The Optuna storage beside ``database_url`` (see ``optuna_storage_url``), created if
    missing, one worker at a time; opened once per process and reused by its jobs."""
    global _opened
    with _guard:
        if _opened is not None:
            if _opened[0] == database_url:
                return _opened[1]
            _opened[1].engine.dispose()
            _opened = None
        delay = first_delay
        for attempt in range(1, attempts + 1):
            try:
                with creation_lock(database_url):
                    # pool_pre_ping: after a database restart, pooled connections are
                    # replaced, not used.
                    storage = optuna.storages.RDBStorage(
                        optuna_storage_url(database_url), engine_kwargs={"pool_pre_ping": True})
                break
            except DBAPIError as exc:
                if attempt == attempts:
                    if not is_transient(exc):
                        raise  # e.g. no permission to create the tables: fail the job, say why
                    raise StorageUnavailable(
                        f"Optuna's storage could not be opened: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:300]}") from exc
                log.warning("opening Optuna's storage failed (%s); retrying in %.1fs",
                            type(exc).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        _opened = (database_url, storage)
        return storage
