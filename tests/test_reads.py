"""The reads clients poll (service/reads.py): on Postgres they bypass the ORM and the thread
pool, so they must return exactly what the ORM loads, see every committed write at once, and
survive a connection the server dropped. On a real Postgres and on SQLite."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest
from sqlalchemy import inspect, make_url, text

from service import migrate, tenants
from service.jobs.render import job_out, snapshot_json
from service.reads import Coalesced, PostgresReads, Reads, make_reads
from ssad_common.db import make_engine, session_factory, session_scope
from ssad_common.lifecycle import JobStatus
from ssad_common.models import Job
from tests.helpers import (
    assert_error,
    client,
    finish_job_with_scores,
    make_key,
    npz,
    tiny_job,
    upload,
)
from tests.pg import PostgresServer, free_port

IMAGES = np.random.default_rng(0).integers(0, 256, (12, 8, 8), dtype=np.uint8)
SELECTION = {"best_trial": 1, "best_family": "rotate", "runner_up_family": "cutout",
             "runner_up_trial": 0, "family_gap": 0.2, "family_gap_unit": "loss",
             "family_gap_share": 1.0, "top_k": 2, "top_trials": [1, 0], "flagged_share": 0.2,
             "agreement_jaccard": 0.5, "agreement_spearman": 0.25, "candidates": 2,
             "trust": "uncertain"}


def read_all(db_url: str, *calls: tuple[str, Any]) -> tuple[type[Reads], list[Any]]:
    """Open the reads the API would open on ``db_url``, make each ``(method, arg)`` call
    on one event loop, close them."""
    engine = make_engine(db_url)

    async def run() -> tuple[type[Reads], list[Any]]:
        reads = make_reads(session_factory(engine), db_url, engine.dialect, 2, 10.0)
        try:
            return type(reads), [await getattr(reads, m)(a) for m, a in calls]
        finally:
            await reads.close()

    try:
        return asyncio.run(run())
    finally:
        engine.dispose()


def a_finished_job(db_url: str) -> str:
    with client(db_url) as c:
        train = upload(c, npz(IMAGES[:6]), "train.npz").json()["id"]
        test = upload(c, npz(IMAGES[6:]), "test.npz").json()["id"]
        job = c.post("/v1/jobs", json=tiny_job(train, test)).json()["id"]
    finish_job_with_scores(db_url, job, [("cutout", {"size": 0.2}, 0.5, [0.1] * 6),
                                         ("rotate", {}, 0.3, [0.2] * 6)],
                           selection=SELECTION)
    return job


def test_a_job_read_on_the_loop_is_the_job_the_orm_loads(db_url: str) -> None:
    job_id = a_finished_job(db_url)
    kind, (job, state, missing) = read_all(db_url, ("job", job_id), ("result_state", job_id),
                                           ("job", "no-such-job"))
    assert kind is (PostgresReads if db_url.startswith("postgresql") else Reads)
    engine = make_engine(db_url)
    try:
        with session_scope(engine) as s:
            loaded = s.get(Job, job_id)
            assert loaded is not None
            for column in Job.__table__.columns:  # every value, with its Python type
                ours, orm = getattr(job, column.key), getattr(loaded, column.key)
                assert (ours, type(ours)) == (orm, type(orm)), column.key
            assert job_out(job) == job_out(loaded)
            assert loaded.best is not None and loaded.started_at is not None
            assert inspect(job).transient  # in no session: nothing can write it back
    finally:
        engine.dispose()
    assert state == (loaded.tenant_id, JobStatus.succeeded, 1)
    assert isinstance(state.status, JobStatus)
    assert missing is None
    # The route's body: JobOut's JSON, rendered once per snapshot; another snapshot of the
    # same job (a later read) is rendered afresh.
    body = snapshot_json(job)
    assert json.loads(body) == json.loads(job_out(job).model_dump_json())
    assert snapshot_json(job) is body
    _, (later,) = read_all(db_url, ("job", job_id))
    later.status = JobStatus.cancelled
    assert json.loads(snapshot_json(later))["status"] == "cancelled"
    assert snapshot_json(job) is body


def test_a_key_is_looked_up_by_its_hash_and_a_revoked_one_is_not_found(db_url: str) -> None:
    key = make_key(db_url, "acme")
    digest = tenants.lookup_hash(key)
    assert digest is not None and tenants.lookup_hash("not-a-key") is None
    engine = make_engine(db_url)
    try:
        with session_scope(engine) as s:
            (stored, _), = [(k, p) for k, p in tenants.list_keys(s) if k.key_hash == digest]
            tenant_id, key_id = stored.tenant_id, stored.id
        _, (found,) = read_all(db_url, ("key_tenant", digest))
        assert found == tenant_id
        with session_scope(engine) as s:
            tenants.revoke_key(s, key_id)
    finally:
        engine.dispose()
    _, (after,) = read_all(db_url, ("key_tenant", digest))
    assert after is None


def test_the_polled_routes_see_each_committed_write_at_once(db_url: str) -> None:
    """Through HTTP, with API keys on: the job and its scores read on the loop, then the
    delete a request commits is a 404 on the very next request, as is another tenant's."""
    key, other = make_key(db_url, "acme"), make_key(db_url, "other")
    with client(db_url, auth="required") as c:
        c.headers["Authorization"] = f"Bearer {key}"
        train = upload(c, npz(IMAGES[:6]), "train.npz").json()["id"]
        test = upload(c, npz(IMAGES[6:]), "test.npz").json()["id"]
        job = c.post("/v1/jobs", json=tiny_job(train, test)).json()["id"]
        assert c.get(f"/v1/jobs/{job}").json()["status"] == "queued"
        assert c.get(f"/v1/jobs/{job}/scores").status_code == 409
        finish_job_with_scores(db_url, job, [("cutout", {"size": 0.2}, 0.5, [0.1] * 6)])
        assert c.get(f"/v1/jobs/{job}").json()["status"] == "succeeded"
        scores = c.get(f"/v1/jobs/{job}/scores")
        assert scores.status_code == 200 and len(scores.json()["scores"]) == 6
        for wrong in (other, "ssad_" + "x" * 43, "nope"):
            for path in (f"/v1/jobs/{job}", f"/v1/jobs/{job}/scores"):
                r = c.get(path, headers={"Authorization": f"Bearer {wrong}"})
                assert r.status_code == (404 if wrong == other else 401), (wrong, r.text)
        assert c.delete(f"/v1/jobs/{job}").status_code == 204
        for path in (f"/v1/jobs/{job}", f"/v1/jobs/{job}/scores"):  # cached body or not
            assert c.get(path).status_code == 404


def test_connections_the_server_dropped_are_replaced_not_reported(pg_url: str) -> None:
    """What a server restart does: every idle connection of a warmed pool is gone at once.
    The next reads still answer (each idle one is forgotten, not tried in turn)."""
    job_id = a_finished_job(pg_url)
    engine = make_engine(pg_url)

    async def run() -> list[Any]:
        reads = make_reads(session_factory(engine), pg_url, engine.dialect, 4, 10.0)
        try:
            # different reads (identical ones would share one statement): opens up to 4
            await asyncio.gather(*[reads.job(f"{job_id}{'-x' * i}") for i in range(8)])
            with engine.begin() as conn:
                dropped = conn.execute(text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'ssad-reads'")).scalar_one()
            after = [await reads.result_state(job_id) for _ in range(4)]
            return [dropped, after, await reads.job(job_id)]
        finally:
            await reads.close()

    try:
        dropped, after, job = asyncio.run(run())
    finally:
        engine.dispose()
    assert dropped >= 2
    assert [s.status for s in after] == [JobStatus.succeeded] * 4
    assert job is not None and job.id == job_id


def test_an_unreachable_database_is_a_503_at_once_and_reads_resume_with_it(
        postgres: PostgresServer) -> None:
    """A read that cannot connect answers 503 in the error shape without waiting for the
    pool's timeout (60 s here); once the database answers, so do the reads."""
    url = postgres.url(postgres.create_database())
    dead = make_url(url).set(host="127.0.0.1", port=free_port()).render_as_string(False)
    with client(dead, db_pool_timeout_seconds=60, webhook_dispatch=False) as c:
        started = time.monotonic()
        for path in ("/v1/jobs/some-job", "/v1/jobs/some-job/scores", "/v1/jobs/j/stream"):
            assert_error(c.get(path), 503, "ServiceUnavailable", "unavailable")
        assert time.monotonic() - started < 30
    migrate.upgrade_head(url)
    with client(url) as c:
        assert_error(c.get("/v1/jobs/some-job"), 404, "NotFound")


class Counted:
    """A read that counts its calls, each answering its own number; with ``gate``, each
    call waits for it once it has started (``started`` is set)."""

    def __init__(self, gate: asyncio.Event | None = None, fail: bool = False) -> None:
        self.calls, self.gate, self.fail = 0, gate, fail
        self.started = asyncio.Event()

    def __call__(self) -> Callable[[], Coroutine[Any, Any, int]]:
        async def read() -> int:
            self.calls += 1
            number = self.calls
            self.started.set()
            if self.gate is not None:
                await self.gate.wait()
            if self.fail:
                raise RuntimeError(f"read {number} failed")
            return number
        return read


def test_identical_reads_that_wait_together_share_one_read_and_others_do_not() -> None:
    async def run() -> None:
        shared, read = Coalesced(), Counted()
        assert await asyncio.gather(*[shared.run("a", read()) for _ in range(20)]) == [1] * 20
        assert read.calls == 1
        other = Counted()
        got = await asyncio.gather(shared.run("a", read()), shared.run("b", other()))
        assert got == [2, 1] and (read.calls, other.calls) == (2, 1)  # one read per key
        assert await shared.run("a", read()) == 3  # one after the other: a read each

    asyncio.run(run())


def test_a_read_that_arrives_after_the_shared_one_started_gets_a_read_of_its_own() -> None:
    """What keeps "read back at once": the shared read never answers a caller that arrived
    after it was sent, since a write could have committed in between."""
    async def run() -> None:
        shared, gate = Coalesced(), asyncio.Event()
        read = Counted(gate)
        first = asyncio.ensure_future(shared.run("job", read()))
        await read.started.wait()  # the first read is in flight
        second = asyncio.ensure_future(shared.run("job", read()))
        await asyncio.sleep(0)
        gate.set()
        assert (await first, await second) == (1, 2)
        assert read.calls == 2

    asyncio.run(run())


def test_an_error_reaches_every_waiter_and_a_waiter_that_leaves_cancels_nothing() -> None:
    async def run() -> None:
        shared, gate = Coalesced(), asyncio.Event()
        failing = Counted(gate, fail=True)
        waiters = [asyncio.ensure_future(shared.run("k", failing())) for _ in range(3)]
        await failing.started.wait()
        waiters[0].cancel()  # a client that went away
        gate.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert [str(r) for r in results[1:]] == ["read 1 failed"] * 2
        assert failing.calls == 1
        ok = Counted()  # the key is free again: the next read runs
        assert await shared.run("k", ok()) == 1

    asyncio.run(run())


@pytest.mark.parametrize("method", ["job", "result_state"])
def test_concurrent_polls_of_one_job_send_one_statement(pg_url: str, method: str) -> None:
    """On the real driver: 16 concurrent reads of one job use one connection of the pool
    (one statement), and each caller gets the whole row."""
    job_id = a_finished_job(pg_url)
    engine = make_engine(pg_url)

    async def run() -> tuple[list[Any], int]:
        reads = make_reads(session_factory(engine), pg_url, engine.dialect, 8, 10.0)
        try:
            got = await asyncio.gather(*[getattr(reads, method)(job_id) for _ in range(16)])
            with engine.connect() as conn:
                opened = conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                    "'ssad-reads' AND datname = current_database()")).scalar_one()
            return got, opened
        finally:
            await reads.close()

    try:
        got, opened = asyncio.run(run())
    finally:
        engine.dispose()
    assert opened == 1
    if method == "job":
        assert {(j.id, j.status) for j in got} == {(job_id, JobStatus.succeeded)}
        assert all(j is got[0] for j in got)  # one snapshot, built once, for all of them
    else:
        assert set(got) == {got[0]} and got[0].status == JobStatus.succeeded
