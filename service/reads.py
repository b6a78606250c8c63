"""The reads clients repeat, served without the ORM and without the thread pool.

``GET /v1/jobs/{id}`` (polled while a job runs), its progress stream's polls, the score
routes' ownership check (a cached body is served once the job is known to be the caller's)
and the API-key lookup on them are most of a busy API's requests. Through the ORM each cost
a session, a pooled connection's pre-ping and two trips through the thread pool: about 5 ms
of CPU against about 1 ms for a bare FastAPI endpoint (docs/benchmarks.md §8). On Postgres
they run here instead: one statement on psycopg's async driver, on the event loop, from a
small pool of autocommit connections of their own. Nothing is cached: each read sees every
committed row, so a write another request has committed (a 2xx) is read back at once,
exactly as through the ORM. Identical reads that arrive together share one statement
(:class:`Coalesced`), which starts after the last of them arrived.

The statements are the models' own (``select(Job.__table__)``, compiled once for the
psycopg dialect) and every value goes through its column type's result processor, so a
job read here is the same :class:`Job` (enum status, UTC datetimes) the ORM would load,
only transient. On any other database (SQLite, the embedded single-user mode) the same reads
run on the ORM session in one trip to the thread pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import psycopg
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Select, bindparam, select
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.orm import Session, sessionmaker

from service.errors import ServiceUnavailable
from service.jobs.repository import RESULT_STATE, ResultState
from service.tenants import KEY_TENANT
from ssad_common.models import Job

log = logging.getLogger("ssad.api")
AnySelect = Select[*tuple[Any, ...]]
T = TypeVar("T")


_JOB = Job.__table__
_JOB_BY_ID = select(_JOB).where(_JOB.c.id == bindparam("id"))
#: The mapped attribute of each of the jobs table's columns, in the table's order.
_JOB_ATTRS = [Job.__mapper__.get_property_by_column(c).key for c in _JOB.columns]
_NEW_JOB: Callable[[], Job] = Job.__mapper__.class_manager.new_instance


def _job(values: Sequence[Any]) -> Job:
    """A transient :class:`Job` holding ``values``, built as the ORM's loader builds one
    (its state, then the values straight into its ``__dict__``): ``Job(**values)`` would
    fire an attribute event per column, about 15 times the cost."""
    job = _NEW_JOB()
    job.__dict__.update(zip(_JOB_ATTRS, values, strict=True))
    return job


def _result_state(values: Sequence[Any]) -> ResultState:
    return ResultState(*values)


def _tenant(values: Sequence[Any]) -> str:
    return str(values[0])


class Coalesced:
    """Identical reads that wait together share one trip to the database.

    Under load, many requests for the same job (a dashboard's polls, a fleet fetching one
    job's scores) reach a process within one turn of its event loop. Each would send the
    same statement. Here the first schedules the read to start at the loop's next turn,
    and every identical read that arrives until then waits for it, so one statement
    answers them all. A read that arrives after it started waits for the next one, never
    for a result fetched before it arrived: every caller still sees each write committed
    before its request came in (what a read of its own would see). An error (a 503) goes
    to each of them; a caller that goes away does not cancel the read for the others.
    """

    def __init__(self) -> None:
        self._waiting: dict[Hashable, asyncio.Task[Any]] = {}  # not started yet
        self._running: set[asyncio.Task[Any]] = set()  # strong references until done

    async def run(self, key: Hashable, read: Callable[[], Coroutine[Any, Any, T]]) -> T:
        task = self._waiting.get(key)
        if task is None or task.done():  # (done: cancelled before it started)
            # A new task's first step runs at the loop's next turn.
            task = asyncio.get_running_loop().create_task(self._start(key, read))
            self._waiting[key] = task
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        result: T = await asyncio.shield(task)
        return result

    async def _start(self, key: Hashable, read: Callable[[], Coroutine[Any, Any, T]]) -> T:
        del self._waiting[key]  # from now on, arrivals wait for the next read
        return await read()


class Reads:
    """The hot reads, on the ORM session in the thread pool (any database)."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self._factory = factory
        self._coalesced = Coalesced()

    async def job(self, job_id: str) -> Job | None:
        """The job row (whoever's it is: the caller checks the tenant). The callers one
        statement serves share one :class:`Job`: a snapshot, which none of them changes."""
        return await self._one(_JOB_BY_ID, {"id": job_id}, _job)

    async def result_state(self, job_id: str) -> ResultState | None:
        return await self._one(RESULT_STATE, {"id": job_id}, _result_state)

    async def key_tenant(self, key_hash: str) -> str | None:
        """The tenant of an unrevoked API key, by the key's SHA-256."""
        return await self._one(KEY_TENANT, {"hash": key_hash}, _tenant)

    async def _one(self, stmt: AnySelect, params: dict[str, Any],
                   build: Callable[[Sequence[Any]], T]) -> T | None:
        """``build`` of ``stmt``'s first row, read and built once for the identical reads
        (same statement, parameters and ``build``) that arrived before it started
        (:class:`Coalesced`)."""
        async def read() -> T | None:
            row = await self._read(stmt, params)
            return None if row is None else build(row)

        key = (stmt, build, tuple(sorted(params.items())))
        return await self._coalesced.run(key, read)

    async def _read(self, stmt: AnySelect, params: dict[str, Any]) -> Sequence[Any] | None:
        def read() -> Sequence[Any] | None:
            with self._factory() as session:
                row = session.execute(stmt, params).first()
                return None if row is None else tuple(row)

        return await run_in_threadpool(read)

    async def close(self) -> None:
        pass


class _Dropped(Exception):
    """The server closed the connection under a statement (a restart, an idle timeout)."""


class _Connections:
    """At most ``size`` autocommit connections, kept idle between reads. Not psycopg_pool:
    its connections are opened in the background with growing back-off, so during an
    outage a read would wait its whole timeout for a 503, and after one the pool could
    take tens of seconds to reconnect. Here a read that needs a connection opens it
    itself: refused is a 503 at once, and the first read after the server is back gets
    through."""

    def __init__(self, conninfo: str, size: int, timeout_s: float) -> None:
        self._conninfo = conninfo
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(size)
        self._idle: list[psycopg.AsyncConnection[Any]] = []

    @asynccontextmanager
    async def connection(self, fresh: bool) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """An idle connection (``fresh``: a new one), returned afterwards if still sound."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            log.warning("no database connection for a read within %s s", self._timeout_s)
            raise ServiceUnavailable("all database connections are busy; retry shortly"
                                     ) from None
        conn = None
        try:
            if self._idle and not fresh:
                conn = self._idle.pop()
            else:
                try:
                    conn = await psycopg.AsyncConnection.connect(
                        self._conninfo, autocommit=True, application_name="ssad-reads",
                        connect_timeout=max(2, round(self._timeout_s)))
                except psycopg.OperationalError as exc:
                    log.warning("database unavailable: %s", exc)
                    raise ServiceUnavailable("the database is unavailable; retry shortly"
                                             ) from None
            yield conn
        finally:
            if conn is not None:
                idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                if idle and not conn.closed:
                    self._idle.append(conn)
                else:  # broken, or cancelled mid-statement
                    await conn.close()
            self._slots.release()

    async def drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()


class PostgresReads(Reads):
    """The hot reads on psycopg's async driver (see the module's docstring)."""

    def __init__(self, factory: sessionmaker[Session], url: str, dialect: Dialect,
                 max_size: int, timeout_s: float) -> None:
        super().__init__(factory)
        conninfo = make_url(url).set(drivername="postgresql").render_as_string(
            hide_password=False)
        self._connections = _Connections(conninfo, max_size, timeout_s)
        self._statements: dict[AnySelect, tuple[str, list[Callable[[Any], Any] | None]]] = {}
        for stmt in (_JOB_BY_ID, RESULT_STATE, KEY_TENANT):
            compiled = stmt.compile(dialect=dialect)
            self._statements[stmt] = (str(compiled), [
                c.type.result_processor(dialect, None) for c in stmt.selected_columns])

    async def close(self) -> None:
        await self._connections.drop_idle()

    async def _read(self, stmt: AnySelect, params: dict[str, Any]) -> Sequence[Any] | None:
        sql, processors = self._statements[stmt]
        try:
            row = await self._fetch(sql, params, fresh=False)
        except _Dropped:
            # A server restart drops every idle connection at once: forget them all and
            # retry once on a new one (a read is safe to repeat).
            await self._connections.drop_idle()
            try:
                row = await self._fetch(sql, params, fresh=True)
            except _Dropped:
                raise ServiceUnavailable("the database connection was lost; retry"
                                         ) from None
        if row is None:
            return None
        return tuple(v if p is None else p(v) for v, p in zip(row, processors, strict=True))

    async def _fetch(self, sql: str, params: dict[str, Any], fresh: bool) -> Any:
        async with self._connections.connection(fresh) as conn:
            try:
                return await (await conn.execute(sql, params)).fetchone()
            except psycopg.OperationalError as exc:
                if conn.broken:
                    raise _Dropped from exc
                raise


def make_reads(factory: sessionmaker[Session], url: str, dialect: Dialect,
               max_size: int, timeout_s: float) -> Reads:
    """:class:`PostgresReads` on Postgres, else :class:`Reads`."""
    if dialect.name != "postgresql":
        return Reads(factory)
    return PostgresReads(factory, url, dialect, max_size, timeout_s)
