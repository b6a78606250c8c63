"""The lifecycle as data (ssad_common/lifecycle.py): transition() refuses a move the table does
not allow, writes nothing when its fenced update misses, and appends exactly one event when
it hits; on Postgres and on SQLite."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from ssad_common.db import make_engine, session_factory
from ssad_common.lifecycle import (
    ALLOWED_TRANSITIONS,
    TERMINAL,
    IllegalTransition,
    JobStatus,
    transition,
)
from ssad_common.models import Blob, Dataset, Job, JobEvent, Tenant, utcnow


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def _job(engine: Engine, status: JobStatus, attempt: int) -> str:
    """A job row in ``status`` at ``attempt``, with no events yet."""
    tenant, dataset, job = (str(uuid.uuid4()) for _ in range(3))
    with session_factory(engine).begin() as s:
        s.add(Tenant(id=tenant, name=tenant[:8]))
        s.add(Blob(sha256="0" * 64, size_bytes=0, n_chunks=0))
        s.flush()
        s.add(Dataset(id=dataset, tenant_id=tenant, name="d", sha256="0" * 64, n_samples=1,
                      channels=1, height=1, width=1, size_bytes=0, names=["a"]))
        s.flush()
        s.add(Job(id=job, tenant_id=tenant, status=status, train_dataset_id=dataset,
                  test_dataset_id=dataset, spec={}, n_trials=1, attempt=attempt))
    return job


def _move(engine: Engine, job_id: str, to: JobStatus, **kwargs: Any) -> bool:
    with session_factory(engine).begin() as s:
        return transition(s, job_id, to, **kwargs)


def _state(engine: Engine, job_id: str) -> tuple[str, int, list[tuple[str, int, str | None]]]:
    """The job's raw status and attempt (as stored: plain strings) and its events."""
    with engine.connect() as conn:
        status, attempt = conn.execute(text("SELECT status, attempt FROM jobs WHERE id = :i"),
                                       {"i": job_id}).one()
        events = conn.execute(select(JobEvent.status, JobEvent.attempt, JobEvent.message)
                              .where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
    return status, attempt, [(e.status, e.attempt, e.message) for e in events]


DISALLOWED = [(a, b) for a, b in itertools.product(JobStatus, JobStatus)
              if b not in ALLOWED_TRANSITIONS[a]]


def test_the_table_forbids_leaving_an_end_and_skipping_running() -> None:
    assert all(not ALLOWED_TRANSITIONS[s] for s in TERMINAL)
    assert (JobStatus.queued, JobStatus.succeeded) in DISALLOWED
    assert (JobStatus.queued, JobStatus.failed) in DISALLOWED
    assert (JobStatus.cancelled, JobStatus.queued) in DISALLOWED


@pytest.mark.parametrize(("current", "to"), DISALLOWED)
def test_a_disallowed_move_raises_before_any_statement(current: JobStatus,
                                                        to: JobStatus) -> None:
    with Session() as unbound, pytest.raises(IllegalTransition):  # no database to reach
        transition(unbound, "j", to, expected=current, message="m")


def test_one_disallowed_expected_status_is_enough_to_raise() -> None:
    with Session() as unbound, pytest.raises(IllegalTransition):
        transition(unbound, "j", JobStatus.cancelled,
                   expected=[JobStatus.queued, JobStatus.succeeded], message="m")


def test_a_disallowed_move_writes_nothing(engine: Engine) -> None:
    job = _job(engine, JobStatus.queued, 0)
    with pytest.raises(IllegalTransition):
        _move(engine, job, JobStatus.succeeded, expected=JobStatus.queued, message="m")
    assert _state(engine, job) == ("queued", 0, [])


@pytest.mark.parametrize("miss", ["wrong attempt", "wrong status"])
def test_a_missed_fenced_update_changes_nothing_and_appends_no_event(engine: Engine,
                                                                     miss: str) -> None:
    job = _job(engine, JobStatus.running, 2)
    if miss == "wrong attempt":  # a zombie: the job was claimed again since
        moved = _move(engine, job, JobStatus.failed, expected=JobStatus.running, fence=1,
                      message="late", error="late", finished_at=utcnow())
    else:  # the API cancelling a job a worker has just claimed
        moved = _move(engine, job, JobStatus.cancelled, expected=JobStatus.queued,
                      message="late", finished_at=utcnow())
    assert moved is False
    assert _state(engine, job) == ("running", 2, [])
    with session_factory(engine)() as s:
        row = s.get(Job, job)
        assert row is not None and row.error is None and row.finished_at is None


def test_a_hit_moves_the_job_sets_its_values_and_appends_exactly_one_event(
        engine: Engine) -> None:
    job = _job(engine, JobStatus.running, 2)
    assert _move(engine, job, JobStatus.failed, expected=JobStatus.running, fence=2,
                 message="boom", error="boom", finished_at=utcnow()) is True
    assert _state(engine, job) == ("failed", 2, [("failed", 2, "boom")])
    with session_factory(engine)() as s:
        row = s.get(Job, job)
        assert row is not None and row.error == "boom" and row.finished_at is not None
        assert row.status is JobStatus.failed  # read back as the enum
        event = s.scalars(select(JobEvent).where(JobEvent.job_id == job)).one()
        assert event.status is JobStatus.failed
    # ended: a second move from running now misses, and appends nothing
    assert _move(engine, job, JobStatus.cancelled, expected=JobStatus.running,
                 message="again") is False
    assert len(_state(engine, job)[2]) == 1


def test_the_event_carries_the_attempt_the_update_wrote(engine: Engine) -> None:
    """A claim increments the attempt in the same statement: its event says the new one."""
    job = _job(engine, JobStatus.queued, 3)
    assert _move(engine, job, JobStatus.running,
                 expected=[JobStatus.queued, JobStatus.running], message="claimed by w",
                 attempt=Job.attempt + 1) is True
    assert _state(engine, job) == ("running", 4, [("running", 4, "claimed by w")])
