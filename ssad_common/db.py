"""Engine and session handling. Services never commit: the request's session dependency
commits on success and rolls back on any error."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
            # WAL lets the API read while the worker writes; foreign keys are off by default.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


def is_transient(exc: BaseException) -> bool:
    """The database is unreachable or the connection dropped (a restart, a network blip):
    worth retrying, unlike a constraint violation or a bug. Looks through the exception's
    cause and context: Optuna re-raises storage errors as its own, and an error raised
    while handling a lost connection (Optuna's ``tell`` does) is that outage too."""
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo and len(seen) < 16:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OperationalError | InterfaceError):
            return True
        if isinstance(e, DBAPIError) and e.connection_invalidated:
            return True
        todo += [e.__cause__, e.__context__]
    return False


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)


def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Yield a session; commit if the caller finished cleanly, else roll back."""
    session = factory()
    done = False
    try:
        yield session
        done = True
    finally:
        end_transaction(session, done)


def end_transaction(session: Session, done: bool) -> None:
    """Commit (``done``: the work finished cleanly) or roll back, then close."""
    try:
        if done:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """``with session_scope(engine) as s:`` one transaction, for scripts and tools."""
    yield from transaction(session_factory(engine))
