"""Every job query a worker runs: claim, heartbeat, record a trial, finish, fail, cancel,
release, requeue stale. The loop that schedules work (worker/loop.py) contains no SQL.

Every write by a worker is fenced by the attempt number it claimed: the statement only
matches ``status = 'running' AND attempt = :attempt``, so a worker whose lease expired and
whose job was claimed again (a zombie) has its late writes refused (:class:`LostLease`).
Torch-free.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import Engine, case, delete, func, insert, select, update
from sqlalchemy.orm import Session

from ssad_common.blobs import read_blob
from ssad_common.db import is_transient, session_factory, transaction
from ssad_common.lifecycle import JobStatus, TrialState, record_event, transition
from ssad_common.models import (
    MODEL_ARTIFACT,
    MODEL_CONTENT_TYPE,
    Dataset,
    Job,
    JobArtifact,
    JobTrial,
    TrialScore,
    utcnow,
)
from ssad_common.strategy import SCREEN, selectable

log = logging.getLogger("ssad.worker")


class LostLease(Exception):
    """This worker no longer holds the job's current attempt; it must drop the job."""


@dataclass(frozen=True)
class DatasetRef:
    id: str
    sha256: str
    n_samples: int
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class ClaimedJob:
    """What crosses from the database into the job runner: ids and the spec, no ORM rows."""

    id: str
    attempt: int
    spec: Mapping[str, Any]
    train: DatasetRef
    test: DatasetRef
    lost_leases: int = 0
    kind: str = "tune"  # the jobs.kind column: which model of ssad_common/jobspec.py spec follows

    @property
    def releases(self) -> int:
        """Earlier claims that ended in a release (free hand-backs) rather than a lost lease."""
        return max(0, self.attempt - 1 - self.lost_leases)


@dataclass(frozen=True)
class Heartbeat:
    cancel_requested: bool


P = ParamSpec("P")
R = TypeVar("R")


def retry_transient(method: Callable[Concatenate[JobManager, P], R]
                    ) -> Callable[Concatenate[JobManager, P], R]:
    """Retry a manager call while the database is unreachable (e.g. Postgres restarting),
    with backoff, for up to the lease: beyond it the job is someone else's anyway. Every
    decorated call is one transaction that is safe to repeat."""

    @functools.wraps(method)
    def wrapper(self: JobManager, *args: P.args, **kwargs: P.kwargs) -> R:
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.25
        while True:
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:
                if not is_transient(exc) or time.monotonic() + delay > deadline:
                    raise
                log.warning("%s: database unavailable (%s); retrying in %.1fs",
                            method.__name__, type(exc).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    return wrapper


def _ref(d: Dataset) -> DatasetRef:
    return DatasetRef(d.id, d.sha256, d.n_samples, d.channels, d.height, d.width)


class JobManager:
    def __init__(self, engine: Engine, lease_seconds: float = 60.0, max_attempts: int = 3):
        self.engine = engine
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts
        self.retry_seconds = lease_seconds
        self._sessions = session_factory(engine)

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        yield from transaction(self._sessions)

    def _fenced(self, s: Session, job_id: str, attempt: int, **values: Any) -> Job:
        """Update the job only if this attempt still holds it; returns the row (locked)."""
        row = s.execute(
            update(Job).where(Job.id == job_id, Job.attempt == attempt,
                              Job.status == JobStatus.running)
            .values(**values).returning(Job.id)).scalar_one_or_none()
        if row is None:
            raise _lost(job_id, attempt)
        job = s.get(Job, job_id, populate_existing=True)
        assert job is not None
        return job

    @staticmethod
    def _end(s: Session, job_id: str, attempt: int, to: JobStatus, message: str,
             **values: Any) -> None:
        """Move the job this attempt still holds out of ``running`` (or LostLease)."""
        if not transition(s, job_id, to, expected=JobStatus.running, fence=attempt,
                          message=message, **values):
            raise _lost(job_id, attempt)

    # ------------------------------------------------------------------ claiming

    def claim_next_job(self, worker_id: str) -> ClaimedJob | None:
        """Claim the oldest queued job: lock it (``FOR UPDATE SKIP LOCKED`` on Postgres, so
        racing workers pick different jobs), then move it to running. SQLite serialises
        writers but does not lock on reading: if another worker moved the job in between,
        the conditional move misses and the next oldest is tried."""
        now = utcnow()
        oldest = (select(Job.id).where(Job.status == JobStatus.queued)
                  .order_by(Job.created_at, Job.id).limit(1).with_for_update(skip_locked=True))
        with self._tx() as s:
            while True:
                job_id = s.scalar(oldest)
                if job_id is None:
                    return None
                if transition(s, job_id, JobStatus.running, expected=JobStatus.queued,
                              message=f"claimed by {worker_id}", attempt=Job.attempt + 1,
                              worker_id=worker_id, lease_expires_at=now + self.lease,
                              heartbeat_at=now, started_at=func.coalesce(Job.started_at, now)):
                    break
            job = s.get(Job, job_id, populate_existing=True)
            assert job is not None
            train = s.get(Dataset, job.train_dataset_id)
            test = s.get(Dataset, job.test_dataset_id)
            assert train is not None and test is not None
            return ClaimedJob(job_id, job.attempt, dict(job.spec), _ref(train), _ref(test),
                              lost_leases=job.lost_leases, kind=job.kind)

    def requeue_stale(self) -> list[str]:
        """Running jobs whose lease expired (their worker died or went silent) go back to the
        queue, or fail once ``max_attempts`` of their leases have expired. Only expired
        leases count: a job its worker gave back (:meth:`release`: SIGTERM, a database
        outage) is not charged. Returns the affected ids."""
        now = utcnow()
        with self._tx() as s:
            stale = s.execute(
                select(Job.id, Job.attempt, Job.lost_leases, Job.cancel_requested)
                .where(Job.status == JobStatus.running, Job.lease_expires_at < now)
                .with_for_update(skip_locked=True)).all()
            moved = []
            for job_id, attempt, lost_before, cancel in stale:
                lost = lost_before + 1
                if cancel:
                    status, msg = JobStatus.cancelled, "cancelled (its worker stopped)"
                elif lost >= self.max_attempts:
                    status = JobStatus.failed
                    msg = (f"failed: its worker stopped responding {lost} time(s) "
                           f"(max_attempts={self.max_attempts})")
                else:
                    status = JobStatus.queued
                    msg = (f"requeued: lease of attempt {attempt} expired "
                           f"({lost} of max_attempts={self.max_attempts})")
                values: dict[str, Any] = {"worker_id": None, "lease_expires_at": None,
                                          "lost_leases": lost, "trial_progress": None}
                if status != JobStatus.queued:
                    values.update(finished_at=now, error=msg if status == JobStatus.failed
                                  else None)
                if transition(s, job_id, status, expected=JobStatus.running, fence=attempt,
                              message=msg, **values):
                    moved.append(job_id)
                    log.warning("job %s: %s", job_id, msg)
            return moved

    # ------------------------------------------------------------------ while running

    def heartbeat(self, job_id: str, attempt: int,
                  progress: Mapping[str, Any] | None = None) -> Heartbeat:
        """Renew the lease (fenced); with ``progress``, also store the running trial's
        progress (``{"number", "step", "steps", "loss"}``) for the API to show."""
        now = utcnow()
        values: dict[str, Any] = {"heartbeat_at": now, "lease_expires_at": now + self.lease}
        if progress is not None:
            values["trial_progress"] = {**progress, "at": now.isoformat()}
        with self._tx() as s:
            job = self._fenced(s, job_id, attempt, **values)
            return Heartbeat(cancel_requested=job.cancel_requested)

    @retry_transient
    def is_cancel_requested(self, job_id: str) -> bool:
        with self._tx() as s:
            return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    @retry_transient
    def load_blob(self, sha256: str) -> bytes:
        with self._tx() as s:
            data = read_blob(s, sha256)
        if data is None:
            raise LookupError(f"dataset blob {sha256} is missing")
        return data

    @retry_transient
    def record_trial(
        self, job_id: str, attempt: int, number: int, *, augmentation: str,
        params: Mapping[str, Any], validation_loss: float, losses: Mapping[str, float],
        timings: Mapping[str, float], scores: Sequence[float], model: bytes | None = None,
        stage: str | None = None, train_steps: int | None = None,
    ) -> None:
        """Store one finished trial, its scores and the job's progress in one transaction;
        if it is the best trial so far, ``model`` (its detector) becomes the job's ``model``
        artifact. A repeat (a retry after the commit's acknowledgement was lost) stores
        nothing."""
        with self._tx() as s:
            if not self._fenced_new_trial(s, job_id, attempt, number):
                return
            s.add(JobTrial(job_id=job_id, number=number, attempt=attempt,
                           state=TrialState.COMPLETE,
                           augmentation=augmentation, params=dict(params),
                           validation_loss=validation_loss, losses=dict(losses),
                           timings=dict(timings), duration_s=float(timings.get("total_s", 0.0)),
                           stage=stage, train_steps=train_steps))
            s.flush()
            s.execute(insert(TrialScore), [
                {"job_id": job_id, "trial_number": number, "index": i, "score": float(v)}
                for i, v in enumerate(scores)])
            best = self._update_progress(s, job_id)
            if model is not None and best is not None and best.number == number:
                self._put_artifact(s, job_id, MODEL_ARTIFACT, MODEL_CONTENT_TYPE, model,
                                   {"trial_number": number, "augmentation": augmentation,
                                    "params": dict(params),
                                    "validation_loss": validation_loss})

    @retry_transient
    def record_failed_trial(self, job_id: str, attempt: int, number: int, *,
                            augmentation: str, params: Mapping[str, Any], reason: str,
                            stage: str | None = None, train_steps: int | None = None) -> None:
        """Store a trial that could not finish (state FAIL) with its reason; it used up
        its ``train_steps`` of the plan."""
        with self._tx() as s:
            if not self._fenced_new_trial(s, job_id, attempt, number):
                return
            s.add(JobTrial(job_id=job_id, number=number, attempt=attempt, state=TrialState.FAIL,
                           augmentation=augmentation, params=dict(params),
                           validation_loss=None, losses={}, timings={}, duration_s=0.0,
                           error=reason[:4000], stage=stage, train_steps=train_steps))
            s.flush()
            self._update_progress(s, job_id)
            record_event(s, job_id, JobStatus.running, attempt,
                         f"trial {number} failed: {reason}"[:4000])

    def _fenced_new_trial(self, s: Session, job_id: str, attempt: int, number: int) -> bool:
        """Renew the lease (or LostLease); False if trial ``number`` is already stored (a
        retried write whose first commit did land)."""
        now = utcnow()
        self._fenced(s, job_id, attempt, heartbeat_at=now, lease_expires_at=now + self.lease)
        return s.get(JobTrial, (job_id, number)) is None

    @staticmethod
    def _put_artifact(s: Session, job_id: str, name: str, content_type: str, data: bytes,
                      meta: Mapping[str, Any]) -> None:
        s.execute(delete(JobArtifact).where(JobArtifact.job_id == job_id,
                                            JobArtifact.name == name))
        s.add(JobArtifact(job_id=job_id, name=name, content_type=content_type, data=data,
                          meta=dict(meta)))

    @retry_transient
    def store_artifact(self, job_id: str, attempt: int, name: str, content_type: str,
                       data: bytes, meta: Mapping[str, Any]) -> None:
        with self._tx() as s:
            self._fenced(s, job_id, attempt, heartbeat_at=utcnow())
            self._put_artifact(s, job_id, name, content_type, data, meta)

    @retry_transient
    def load_artifact(self, job_id: str, name: str) -> tuple[bytes, dict[str, Any]] | None:
        with self._tx() as s:
            row = s.get(JobArtifact, (job_id, name))
            return None if row is None else (row.data, dict(row.meta))

    def _update_progress(self, s: Session, job_id: str) -> JobTrial | None:
        best = self._best_trial(s, job_id)
        # Steps done: the plan's steps used up, failed trials' too; the pace (seconds per
        # step) comes from the completed ones only.
        completed, steps, seconds = s.execute(select(
            func.count().filter(JobTrial.state == TrialState.COMPLETE),
            func.coalesce(func.sum(JobTrial.train_steps), 0),
            func.coalesce(func.sum(case((JobTrial.train_steps.is_not(None)
                                         & (JobTrial.state == TrialState.COMPLETE),
                                         JobTrial.duration_s), else_=0.0)), 0.0),
        ).where(JobTrial.job_id == job_id)).one()
        s.execute(update(Job).where(Job.id == job_id).values(
            trials_completed=completed, train_steps_done=int(steps),
            train_seconds_done=float(seconds),
            best=None if best is None else _best_json(best),
            best_trial_number=None if best is None else best.number))
        return best

    @retry_transient
    def stored_trial_loss(self, job_id: str, number: int) -> float | None:
        """The loss of a trial already stored for this job (a worker may have died after
        storing it but before Optuna recorded it as complete)."""
        with self._tx() as s:
            return s.scalar(select(JobTrial.validation_loss).where(
                JobTrial.job_id == job_id, JobTrial.number == number))

    @staticmethod
    def _best_trial(s: Session, job_id: str) -> JobTrial | None:
        """The lowest-loss trial; a staged screen's (short) trial only if no other
        completed: ssad_common.strategy.selectable's order, in SQL (one row, every trial)."""
        return s.scalars(select(JobTrial).where(
            JobTrial.job_id == job_id, JobTrial.validation_loss.is_not(None))
            .order_by(case((JobTrial.stage == SCREEN, 1), else_=0),
                      JobTrial.validation_loss, JobTrial.number).limit(1)).first()

    @retry_transient
    def selectable_trials(self, job_id: str, k: int
                          ) -> list[tuple[JobTrial, list[float] | None]]:
        """The selectable trials, best first (ssad_common.strategy.selectable), the first
        ``k`` with their scores in test order."""
        with self._tx() as s:
            rows = selectable(s.scalars(select(JobTrial).where(
                JobTrial.job_id == job_id, JobTrial.state == TrialState.COMPLETE)))
            out: list[tuple[JobTrial, list[float] | None]] = []
            for i, r in enumerate(rows):
                scores = None if i >= k else list(s.scalars(select(TrialScore.score).where(
                    TrialScore.job_id == job_id, TrialScore.trial_number == r.number)
                    .order_by(TrialScore.index)))
                s.expunge(r)
                out.append((r, scores))
            return out

    # ------------------------------------------------------------------ endings

    @retry_transient
    def finish(self, job_id: str, attempt: int,
               selection: Mapping[str, Any] | None = None) -> None:
        """The best stored trial (lowest loss) becomes the result, with ``selection`` (how
        decisive the choice was): written once, fenced."""
        with self._tx() as s:
            self._fenced(s, job_id, attempt, heartbeat_at=utcnow())  # lock, or LostLease
            best = self._best_trial(s, job_id)
            if best is None:
                raise RuntimeError("no completed trial to choose from")
            self._end(s, job_id, attempt, JobStatus.succeeded,
                      f"best trial {best.number}: {best.augmentation} "
                      f"(loss {best.validation_loss:.4g})",
                      finished_at=utcnow(), best=_best_json(best),
                      best_trial_number=best.number, lease_expires_at=None, trial_progress=None,
                      selection=None if selection is None else dict(selection))

    @retry_transient
    def fail(self, job_id: str, attempt: int, reason: str) -> None:
        with self._tx() as s:
            self._end(s, job_id, attempt, JobStatus.failed, reason[:4000],
                      finished_at=utcnow(), error=reason[:4000], lease_expires_at=None,
                      trial_progress=None)

    @retry_transient
    def mark_cancelled(self, job_id: str, attempt: int) -> None:
        with self._tx() as s:
            self._end(s, job_id, attempt, JobStatus.cancelled, "cancelled while running",
                      finished_at=utcnow(), lease_expires_at=None, trial_progress=None)

    @retry_transient
    def release(self, job_id: str, attempt: int, reason: str) -> None:
        """Give a job back to the queue (the worker is stopping, the database went away);
        its trials are kept. Free: a release does not count against ``max_attempts`` (only
        expired leases do), and the next claim's new attempt number still fences out this
        one."""
        with self._tx() as s:
            self._end(s, job_id, attempt, JobStatus.queued, reason, worker_id=None,
                      lease_expires_at=None, trial_progress=None)


def _lost(job_id: str, attempt: int) -> LostLease:
    return LostLease(f"job {job_id} attempt {attempt} is no longer held by this worker")


def _best_json(t: JobTrial) -> dict[str, Any]:
    return {"augmentation": t.augmentation, "params": t.params,
            "validation_loss": t.validation_loss}


__all__ = ["ClaimedJob", "DatasetRef", "Heartbeat", "JobManager", "LostLease"]
