"""A job's lifecycle as data: which status may follow which (:data:`ALLOWED_TRANSITIONS`),
and the one function that moves a job from one to the next (:func:`transition`).

Every status change of a job, by the API or by a worker, is a call to :func:`transition`:
a move the table does not allow is a programming error (:class:`IllegalTransition`); an
allowed one is one conditional ``UPDATE`` (the job must still be in an expected status and,
for a worker, still be held by its attempt: the fencing token) and, only when that update
hit the row, one :class:`~ssad_common.models.JobEvent` in the same transaction (and, for a
terminal state of a job with a ``notify_url``, its webhook delivery: ssad_common/webhooks.py).

The enums are declared beside the tables (ssad_common/models.py: the columns' types) and
re-exported here. Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from ssad_common.models import Job, JobEvent, JobStatus, TrialState
from ssad_common.webhooks import queue_notice

TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

#: Which status may follow which. ``running → running`` is an event that changes no status
#: (a cancel request); ``running → queued`` gives a job back (lease lost, worker stopping).
ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled}),
    JobStatus.running: frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled,
                                  JobStatus.queued, JobStatus.running}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}


class IllegalTransition(ValueError):
    """A move :data:`ALLOWED_TRANSITIONS` does not allow: a bug in the caller."""


def record_event(session: Session, job_id: str, status: JobStatus, attempt: int,
                 message: str) -> None:
    """Append one entry to the job's history without moving it (its creation, a failed
    trial); a status change is :func:`transition`'s."""
    session.add(JobEvent(job_id=job_id, status=status, attempt=attempt, message=message))


def transition(session: Session, job_id: str, to: JobStatus, *,
               expected: JobStatus | Iterable[JobStatus], message: str,
               fence: int | None = None, **values: Any) -> bool:
    """Move job ``job_id`` to ``to`` if it is still in ``expected`` (and, with ``fence``,
    still at that attempt), setting ``values`` too (e.g. ``finished_at``, lease fields);
    append the event (with the attempt the row holds after the update) only if it was.
    Returns whether the job moved. Raises :class:`IllegalTransition` if the table forbids
    a move from any of ``expected`` to ``to``."""
    current = frozenset({expected} if isinstance(expected, JobStatus) else expected)
    illegal = sorted(s for s in current if to not in ALLOWED_TRANSITIONS[s])
    if not current or illegal:
        raise IllegalTransition(f"job {job_id}: {', '.join(illegal) or 'nothing'} → {to} "
                                "is not an allowed move")
    where = [Job.id == job_id, Job.status.in_(sorted(current))]
    if fence is not None:
        where.append(Job.attempt == fence)
    row = session.execute(update(Job).where(*where).values(status=to, **values).returning(
        Job.attempt, Job.notify_url, Job.tenant_id, Job.kind, Job.best)).one_or_none()
    if row is None:
        return False
    record_event(session, job_id, to, row.attempt, message)
    if to in TERMINAL and row.notify_url:
        queue_notice(session, job_id=job_id, tenant_id=row.tenant_id, url=row.notify_url,
                     kind=row.kind, status=to, message=message, best=row.best)
    return True


__all__ = ["ALLOWED_TRANSITIONS", "TERMINAL", "IllegalTransition", "JobStatus", "TrialState",
           "record_event", "transition"]
