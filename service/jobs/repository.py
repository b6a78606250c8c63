"""Every SQL statement the API runs about jobs (the worker's live in worker/manager.py)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.models import Job, JobEvent, JobStatus, JobTrial, TrialScore, utcnow


def insert_job(session: Session, job: Job, message: str) -> None:
    session.add(job)
    session.flush()
    session.add(JobEvent(job_id=job.id, status=job.status, attempt=job.attempt,
                         message=message))


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def list_jobs(session: Session, limit: int, offset: int, status: str | None
              ) -> tuple[Sequence[Job], int]:
    q = select(Job)
    count = select(func.count()).select_from(Job)
    if status:
        q, count = q.where(Job.status == status), count.where(Job.status == status)
    rows = session.scalars(q.order_by(Job.created_at.desc(), Job.id).limit(limit)
                           .offset(offset)).all()
    return rows, session.scalar(count) or 0


def cancel_if_queued(session: Session, job_id: str) -> bool:
    """Queued → cancelled in one conditional statement (a worker may be claiming it)."""
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.queued.value)
        .values(status=JobStatus.cancelled.value, finished_at=utcnow(), cancel_requested=True)
        .returning(Job.attempt))
    attempt = res.scalar_one_or_none()
    if attempt is None:
        return False
    session.add(JobEvent(job_id=job_id, status=JobStatus.cancelled.value, attempt=attempt,
                         message="cancelled before it started"))
    return True


def request_cancel_if_running(session: Session, job_id: str) -> bool:
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.running.value)
        .values(cancel_requested=True).returning(Job.attempt))
    attempt = res.scalar_one_or_none()
    if attempt is None:
        return False
    session.add(JobEvent(job_id=job_id, status=JobStatus.running.value, attempt=attempt,
                         message="cancel requested"))
    return True


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
