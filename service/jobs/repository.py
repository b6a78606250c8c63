"""Every SQL statement the API runs about jobs (the worker's live in worker/manager.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from sqlalchemy import bindparam, delete, exists, func, select
from sqlalchemy.orm import Session

from ssad_common.lifecycle import TERMINAL, JobStatus, record_event, transition
from ssad_common.models import Job, JobArtifact, JobEvent, JobTrial, TrialScore, utcnow


def insert_job(session: Session, job: Job, message: str) -> None:
    session.add(job)
    session.flush()
    record_event(session, job.id, job.status, job.attempt, message)


def get_job(session: Session, tenant_id: str, job_id: str) -> Job | None:
    """The tenant's job; another tenant's is None, exactly as a missing one."""
    job = session.get(Job, job_id)
    return job if job is not None and job.tenant_id == tenant_id else None


class ResultState(NamedTuple):
    """What the routes serving cached bodies need of a job: whose it is, whether it has
    succeeded, and its best trial."""

    tenant_id: str
    status: JobStatus
    best_trial_number: int | None


#: A job's :class:`ResultState` by id: three columns of one row by primary key, not the
#: whole row with its JSON (spec, best, selection, progress). Also run on the event loop
#: by service/reads.py.
RESULT_STATE = (select(Job.tenant_id, Job.status, Job.best_trial_number)
                .where(Job.id == bindparam("id")))


def result_state(session: Session, job_id: str) -> ResultState | None:
    """Job ``job_id``'s owner, status and best trial number (None: no such job); the
    caller checks the owner (service.visible_state)."""
    row = session.execute(RESULT_STATE, {"id": job_id}).one_or_none()
    return None if row is None else ResultState(*row)


def list_jobs(session: Session, tenant_id: str, limit: int, offset: int, status: str | None,
              kind: str | None = None) -> tuple[Sequence[Job], int]:
    q = select(Job).where(Job.tenant_id == tenant_id)
    count = select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id)
    if status:
        q, count = q.where(Job.status == status), count.where(Job.status == status)
    if kind:
        q, count = q.where(Job.kind == kind), count.where(Job.kind == kind)
    rows = session.scalars(q.order_by(Job.created_at.desc(), Job.id).limit(limit)
                           .offset(offset)).all()
    return rows, session.scalar(count) or 0


def cancel_if_queued(session: Session, job_id: str) -> bool:
    """Queued → cancelled, if it still is (one conditional statement: a worker may be
    claiming it concurrently)."""
    return transition(session, job_id, JobStatus.cancelled, expected=JobStatus.queued,
                      message="cancelled before it started", finished_at=utcnow(),
                      cancel_requested=True)


def request_cancel_if_running(session: Session, job_id: str) -> bool:
    """Running → flagged; the worker sees it at its next heartbeat and ends the job."""
    return transition(session, job_id, JobStatus.running, expected=JobStatus.running,
                      message="cancel requested", cancel_requested=True)


def active_score_jobs(session: Session, tenant_id: str, job_id: str) -> list[str]:
    """Ids of the tenant's scoring jobs still queued or running with ``job_id``'s
    detector."""
    return list(session.scalars(select(Job.id).where(
        Job.tenant_id == tenant_id, Job.kind == "score",
        Job.spec["source_job_id"].as_string() == job_id,
        Job.status.in_([JobStatus.queued, JobStatus.running]))).all())


def delete_ended_job(session: Session, job_id: str) -> bool:
    """Delete the job if it has ended (one conditional statement; a job never leaves an
    ended status, so no worker can be writing to it). Its events, trials, their scores and
    its artifacts go with it: every child table's foreign key is ON DELETE CASCADE (SQLite
    enforces them with ``PRAGMA foreign_keys=ON``, ssad_common/db.py)."""
    deleted = session.execute(delete(Job).where(
        Job.id == job_id, Job.status.in_(sorted(TERMINAL)))
        .returning(Job.id)).scalar_one_or_none()
    session.expire_all()  # the ORM's copy of the row (and its children) is gone
    return deleted is not None


def list_trials(session: Session, job_id: str) -> Sequence[JobTrial]:
    return session.scalars(select(JobTrial).where(JobTrial.job_id == job_id)
                           .order_by(JobTrial.number)).all()


def get_trial(session: Session, job_id: str, number: int) -> JobTrial | None:
    return session.get(JobTrial, (job_id, number))


def trial_scores(session: Session, job_id: str, number: int) -> list[tuple[int, float]]:
    # Core on the session's connection: no ORM row bookkeeping for 10^4-10^5 rows.
    result = session.connection().execute(
        select(TrialScore.index, TrialScore.score)
        .where(TrialScore.job_id == job_id, TrialScore.trial_number == number)
        .order_by(TrialScore.index))
    return [(i, s) for i, s in result]


def list_events(session: Session, job_id: str) -> Sequence[JobEvent]:
    return session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                           .order_by(JobEvent.id)).all()


def has_artifact(session: Session, job_id: str, name: str) -> bool:
    return bool(session.scalar(select(exists().where(JobArtifact.job_id == job_id,
                                                     JobArtifact.name == name))))


def get_artifact(session: Session, job_id: str, name: str) -> JobArtifact | None:
    return session.get(JobArtifact, (job_id, name))
