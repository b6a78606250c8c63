"""Every job query a worker runs: claim, heartbeat, record a trial, finish, fail, cancel,
release, requeue stale. The loop that schedules work (worker/loop.py) contains no SQL.

A worker claims a *slot* of a job (a job runs up to ``parallelism`` trials at once, one per
slot, all in one Optuna study). Every write by a worker is fenced by the attempt number its
slot claimed: the slot's row must still exist and the job still be running, so a worker
whose lease expired (a zombie), or whose job another slot ended, has its late writes refused
(:class:`LostLease`). Torch-free.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import Engine, and_, case, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from ssad_common.blobs import read_blob
from ssad_common.db import is_transient, session_factory, transaction
from ssad_common.lifecycle import JobStatus, TrialState, record_event, transition
from ssad_common.models import (
    MODEL_ARTIFACT,
    MODEL_CONTENT_TYPE,
    TRIAL_MODEL_PREFIX,
    Dataset,
    Job,
    JobArtifact,
    JobSlot,
    JobTrial,
    TrialScore,
    utcnow,
)
from ssad_common.slots import slot_count, stored_trial_count
from ssad_common.strategy import ranked, selectable

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
    parallelism: int = 1  # how many slots (workers) the job may have at once

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


@dataclass
class GateHold:
    """What a slot sees inside :meth:`JobManager.trial_gate`: the trials the job's *other*
    live slots have reserved; it sets ``number`` to the trial it reserves (or
    :data:`FINISHING`, or None for none)."""

    reserved: frozenset[int]
    number: int | None = None

    def reserve(self, number: int | None) -> None:
        self.number = number


class JobManager:
    """The job queue in the database. The unit a worker claims is a *slot* of a job: a job
    with ``parallelism`` P has up to P live slots (``job_slots`` rows), each with its own
    attempt number (the job's claim counter), lease and heartbeat; every write a worker
    makes is fenced by its slot (the row must still exist and the job still be running).
    Writes lock the job's row first and then the slot's, so concurrent slots of one job
    serialise on it and never deadlock; a heartbeat touches only its slot."""

    def __init__(self, engine: Engine, lease_seconds: float = 60.0, max_attempts: int = 3):
        self.engine = engine
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts
        self.retry_seconds = lease_seconds
        self._sessions = session_factory(engine)

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        yield from transaction(self._sessions)

    def _fenced(self, s: Session, job_id: str, attempt: int) -> Job:
        """Lock the job's row, then renew this slot's lease: the slot must still be alive
        and the job running (or LostLease). Returns the job."""
        job = s.execute(select(Job).where(Job.id == job_id).with_for_update()
                        .execution_options(populate_existing=True)).scalar_one_or_none()
        if job is None or job.status != JobStatus.running:
            raise _lost(job_id, attempt)
        now = utcnow()
        alive = s.execute(
            update(JobSlot).where(JobSlot.job_id == job_id, JobSlot.attempt == attempt)
            .values(heartbeat_at=now, lease_expires_at=now + self.lease)
            .returning(JobSlot.attempt)).scalar_one_or_none()
        if alive is None:
            raise _lost(job_id, attempt)
        return job

    def _end(self, s: Session, job_id: str, attempt: int, to: JobStatus, message: str,
             **values: Any) -> None:
        """Move the job this slot holds (fenced here) out of ``running``; see _close."""
        self._fenced(s, job_id, attempt)
        _close(s, job_id, attempt, to, message, **values)

    def _drop_slot(self, s: Session, job: Job, attempt: int, message: str) -> None:
        """End one slot of a running job; the last one gives the job back to the queue."""
        s.execute(delete(JobSlot).where(JobSlot.job_id == job.id, JobSlot.attempt == attempt))
        if _live_slots(s, job.id):
            record_event(s, job.id, JobStatus.running, attempt, message)
        elif not transition(s, job.id, JobStatus.queued, expected=JobStatus.running,
                            message=message, worker_id=None, trial_progress=None):
            raise _lost(job.id, attempt)

    # ------------------------------------------------------------------ claiming

    def claim_next_job(self, worker_id: str) -> ClaimedJob | None:
        """Claim a slot of the oldest job that can take one: a queued job, or a running one
        with fewer live slots than its ``parallelism`` and more planned trials than it has
        stored or running. The job's row is locked (``FOR UPDATE SKIP LOCKED`` on
        Postgres, so racing workers pick different jobs or wait their turn on one) and its
        claim counter becomes the new slot's attempt. SQLite serialises writers but does
        not lock on reading: if another worker changed the job in between, the
        conditional update misses and the next candidate is tried."""
        now = utcnow()
        slots = slot_count(Job.id)
        open_slot = and_(Job.status == JobStatus.running, Job.cancel_requested.is_(False),
                         Job.trials_planned.is_not(None), slots < Job.parallelism,
                         stored_trial_count(Job.id) + slots < Job.trials_planned)
        claimable = or_(Job.status == JobStatus.queued, open_slot)
        candidates = (select(Job.id).where(claimable).order_by(Job.created_at, Job.id)
                      .limit(1).with_for_update(skip_locked=True))
        tried: set[str] = set()
        with self._tx() as s:
            while True:
                job_id = s.scalar(candidates.where(Job.id.not_in(tried)))
                if job_id is None:
                    return None
                tried.add(job_id)
                # The row is ours now; ask again with a fresh statement (the candidate
                # query's snapshot may predate another claim's commit).
                row = s.execute(select(Job.status, Job.attempt)
                                .where(Job.id == job_id, claimable)).first()
                if row is None:
                    continue
                status, attempt = row
                claim: dict[str, Any] = {"attempt": attempt + 1, "worker_id": worker_id,
                                         "heartbeat_at": now,
                                         "started_at": func.coalesce(Job.started_at, now)}
                message = f"claimed by {worker_id}"
                if status == JobStatus.queued:
                    if transition(s, job_id, JobStatus.running, expected=JobStatus.queued,
                                  message=message, **claim):
                        break
                    continue
                if s.execute(update(Job).where(Job.id == job_id, Job.attempt == attempt,
                                               Job.status == JobStatus.running)
                             .values(**claim).returning(Job.id)).first() is not None:
                    record_event(s, job_id, JobStatus.running, attempt + 1,
                                 f"another trial slot {message}")
                    break
            s.add(JobSlot(job_id=job_id, attempt=attempt + 1, worker_id=worker_id,
                          claimed_at=now, heartbeat_at=now, lease_expires_at=now + self.lease))
            job = s.get(Job, job_id, populate_existing=True)
            assert job is not None
            train = s.get(Dataset, job.train_dataset_id)
            test = s.get(Dataset, job.test_dataset_id)
            assert train is not None and test is not None
            return ClaimedJob(job_id, job.attempt, dict(job.spec), _ref(train), _ref(test),
                              lost_leases=job.lost_leases, kind=job.kind,
                              parallelism=job.parallelism)

    def requeue_stale(self) -> list[str]:
        """Slots whose lease expired (their worker died or went silent) end; their running
        trials are rerun by the job's next slot. A job left with no live slot goes back to
        the queue, or fails once ``max_attempts`` of its leases have expired (with
        ``cancel_requested``: is cancelled). Only expired leases count: a slot its worker
        gave back (:meth:`release`: SIGTERM, a database outage) is not charged. Returns the
        affected jobs' ids."""
        now = utcnow()
        moved = []
        with self._tx() as s:
            job_ids = s.scalars(select(JobSlot.job_id).where(JobSlot.lease_expires_at < now)
                                .distinct()).all()
            for job_id in job_ids:
                job = s.execute(select(Job).where(Job.id == job_id)
                                .with_for_update(skip_locked=True)
                                .execution_options(populate_existing=True)).scalar_one_or_none()
                if job is not None and self._expire_slots(s, job, now):
                    moved.append(job_id)
            # Jobs claimed before trial slots existed (migration 0009) hold their lease on
            # the job's row: once it expires they go back to the queue, uncharged.
            legacy = s.scalars(select(Job.id).where(
                Job.status == JobStatus.running, Job.lease_expires_at < now,
                ~select(JobSlot.attempt).where(JobSlot.job_id == Job.id).exists())
                .with_for_update(skip_locked=True)).all()
            for job_id in legacy:
                if transition(s, job_id, JobStatus.queued, expected=JobStatus.running,
                              message="requeued: its worker predates trial slots",
                              worker_id=None, lease_expires_at=None, trial_progress=None):
                    moved.append(job_id)
        return moved

    def _expire_slots(self, s: Session, job: Job, now: datetime) -> bool:
        """End the expired slots of ``job`` (its row locked by the caller), so that their
        workers' late writes are refused before their trials are rerun. Slots found
        expired together (a machine lost) count as one lost lease. While another slot is
        alive the job goes on; a job left without one is requeued, or fails once
        ``max_attempts`` leases were lost (or, if a cancel was asked, is cancelled).
        Whether any slot ended."""
        stale = s.scalars(select(JobSlot.attempt).where(
            JobSlot.job_id == job.id, JobSlot.lease_expires_at < now)).all()
        if not stale:
            return False
        s.execute(delete(JobSlot).where(JobSlot.job_id == job.id, JobSlot.attempt.in_(stale),
                                        JobSlot.lease_expires_at < now))
        if job.status != JobStatus.running:
            return True
        lost = job.lost_leases + 1
        attempt = max(stale)
        left = _live_slots(s, job.id)
        if left:  # the job's other slots go on; the next turn at the budget reruns its trial
            s.execute(update(Job).where(Job.id == job.id).values(lost_leases=lost))
            msg = (f"the slot(s) of attempt(s) {', '.join(map(str, sorted(stale)))} lost "
                   f"their lease ({lost} of max_attempts={self.max_attempts}); their trials "
                   "will be rerun")
            record_event(s, job.id, JobStatus.running, attempt, msg)
            log.warning("job %s: %s", job.id, msg)
            return True
        if job.cancel_requested:
            status, msg = JobStatus.cancelled, "cancelled (its worker stopped)"
        elif lost >= self.max_attempts:
            status = JobStatus.failed
            msg = (f"failed: its worker stopped responding {lost} time(s) "
                   f"(max_attempts={self.max_attempts})")
        else:
            status = JobStatus.queued
            msg = (f"requeued: lease of attempt {attempt} expired "
                   f"({lost} of max_attempts={self.max_attempts})")
        values: dict[str, Any] = {"worker_id": None, "lost_leases": lost,
                                  "trial_progress": None}
        if status != JobStatus.queued:
            values.update(finished_at=now, error=msg if status == JobStatus.failed else None)
        if transition(s, job.id, status, expected=JobStatus.running, message=msg, **values):
            s.execute(delete(JobSlot).where(JobSlot.job_id == job.id))
            if status != JobStatus.queued:
                drop_trial_models(s, job.id)
            log.warning("job %s: %s", job.id, msg)
        return True

    @contextmanager
    def trial_gate(self, job_id: str, attempt: int) -> Iterator[GateHold]:
        """One slot's turn at the job's budget: the job's row stays locked for the block,
        so the job's slots decide one at a time which trial to start (the budget is never
        overrun, no trial is started twice). The block sees the other slots' reservations
        and stores its own (``hold.reserve``) when it ends; an exception rolls it back."""
        with self._tx() as s:
            job = self._fenced(s, job_id, attempt)
            # A slot that stopped renewing its lease is ended here, not only by the next
            # requeue_stale: its trial is then rerun at once, and its worker fenced out.
            # (This slot is alive, so the job goes on.)
            self._expire_slots(s, job, utcnow())
            reserved = frozenset(n for n in s.scalars(select(JobSlot.trial_number).where(
                JobSlot.job_id == job_id, JobSlot.attempt != attempt)) if n is not None)
            hold = GateHold(reserved)
            yield hold
            s.execute(update(JobSlot).where(JobSlot.job_id == job_id,
                                            JobSlot.attempt == attempt)
                      .values(trial_number=hold.number, trial_started_at=utcnow(),
                              trial_progress=None))

    # ------------------------------------------------------------------ while running

    def heartbeat(self, job_id: str, attempt: int,
                  progress: Mapping[str, Any] | None = None) -> Heartbeat:
        """Renew this slot's lease; with ``progress``, also store its running trial's
        progress (``{"number", "step", "steps", "loss"}``) on the slot and, for the API to
        show, on the job (the job's row first, as every write that touches both), unless
        that trial is already stored (the report was sent after the trial ended)."""
        now = utcnow()
        values: dict[str, Any] = {"heartbeat_at": now, "lease_expires_at": now + self.lease}
        with self._tx() as s:
            if progress is not None and s.scalar(select(JobTrial.number).where(
                    JobTrial.job_id == job_id, JobTrial.number == progress["number"])) \
                    is not None:
                progress = None  # a late report of a trial already stored: not running
            if progress is not None:
                values["trial_progress"] = {**progress, "at": now.isoformat()}
                mine = (select(JobSlot.attempt)
                        .where(JobSlot.job_id == job_id, JobSlot.attempt == attempt).exists())
                s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.running,
                                            mine)
                          .values(trial_progress=values["trial_progress"]))
            alive = s.execute(
                update(JobSlot).where(JobSlot.job_id == job_id, JobSlot.attempt == attempt)
                .values(**values).returning(JobSlot.attempt)).scalar_one_or_none()
            job = s.execute(select(Job.status, Job.cancel_requested)
                            .where(Job.id == job_id)).first()
            if alive is None or job is None or job.status != JobStatus.running:
                raise _lost(job_id, attempt)
            return Heartbeat(cancel_requested=bool(job.cancel_requested))

    @retry_transient
    def is_cancel_requested(self, job_id: str) -> bool:
        with self._tx() as s:
            return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    @retry_transient
    def load_blob(self, sha256: str) -> bytes:
        with self._tx() as s:
            data = read_blob(s, sha256)
        if data is None:
            raise LookupError(f"blob {sha256} is missing")
        return data

    @retry_transient
    def record_trial(
        self, job_id: str, attempt: int, number: int, *, augmentation: str,
        params: Mapping[str, Any], validation_loss: float, losses: Mapping[str, float],
        timings: Mapping[str, float], scores: Sequence[float], model: bytes | None = None,
        stage: str | None = None, train_steps: int | None = None,
    ) -> None:
        """Store one finished trial, its scores and the job's progress in one transaction,
        with ``model`` (its detector) as a candidate for the job's ``model`` artifact
        (:meth:`_keep_candidate_models`). A repeat (a retry after the commit's
        acknowledgement was lost) stores nothing."""
        with self._tx() as s:
            ran = self._fenced_new_trial(s, job_id, attempt, number)
            if ran is None:
                return
            s.add(JobTrial(job_id=job_id, number=number, attempt=attempt,
                           state=TrialState.COMPLETE, **ran,
                           augmentation=augmentation, params=dict(params),
                           validation_loss=validation_loss, losses=dict(losses),
                           timings=dict(timings), duration_s=float(timings.get("total_s", 0.0)),
                           stage=stage, train_steps=train_steps))
            s.flush()
            s.execute(insert(TrialScore), [
                {"job_id": job_id, "trial_number": number, "index": i, "score": float(v)}
                for i, v in enumerate(scores)])
            candidates = self._update_progress(s, job_id)
            if model is not None:
                self._keep_candidate_models(s, job_id, candidates, number, model, {
                    "trial_number": number, "augmentation": augmentation,
                    "params": dict(params), "validation_loss": validation_loss})

    @retry_transient
    def record_failed_trial(self, job_id: str, attempt: int, number: int, *,
                            augmentation: str, params: Mapping[str, Any], reason: str,
                            stage: str | None = None, train_steps: int | None = None) -> None:
        """Store a trial that could not finish (state FAIL) with its reason; it used up
        its ``train_steps`` of the plan."""
        with self._tx() as s:
            ran = self._fenced_new_trial(s, job_id, attempt, number)
            if ran is None:
                return
            s.add(JobTrial(job_id=job_id, number=number, attempt=attempt, state=TrialState.FAIL,
                           **ran,
                           augmentation=augmentation, params=dict(params),
                           validation_loss=None, losses={}, timings={}, duration_s=0.0,
                           error=reason[:4000], stage=stage, train_steps=train_steps))
            s.flush()
            self._update_progress(s, job_id)
            record_event(s, job_id, JobStatus.running, attempt,
                         f"trial {number} failed: {reason}"[:4000])

    def _fenced_new_trial(self, s: Session, job_id: str, attempt: int, number: int
                          ) -> dict[str, Any] | None:
        """Lock the job and renew the slot's lease (or LostLease); None if trial ``number``
        is already stored (a retried write whose first commit did land), else who ran it
        and when (the slot's worker, from its reservation until now). The trial's running
        progress goes with it: the job no longer shows a finished trial as the one running
        (until the next trial's first heartbeat it shows none)."""
        job = self._fenced(s, job_id, attempt)
        if s.get(JobTrial, (job_id, number)) is not None:
            return None
        slot = s.get(JobSlot, (job_id, attempt))
        assert slot is not None  # _fenced checked it
        if (job.trial_progress or {}).get("number") == number:
            job.trial_progress = None
        started = None
        if slot.trial_number == number:
            started, slot.trial_progress = slot.trial_started_at, None
        return {"worker_id": slot.worker_id, "started_at": started, "finished_at": utcnow()}

    @classmethod
    def _keep_candidate_models(cls, s: Session, job_id: str, candidates: Sequence[JobTrial],
                               number: int, model: bytes, meta: Mapping[str, Any]) -> None:
        """Keep the detectors of the trials that can still be the best (``candidates``,
        ssad_common.strategy.selectable's) until the job ends, trial ``number``'s among
        them if it is one: under the selection rule a later trial can make an earlier one
        the best. The others' are dropped (the screen's, once a full-length trial has
        completed)."""
        names = [f"{TRIAL_MODEL_PREFIX}{t.number}" for t in candidates]
        if any(t.number == number for t in candidates):
            cls._put_artifact(s, job_id, f"{TRIAL_MODEL_PREFIX}{number}", MODEL_CONTENT_TYPE,
                              model, meta)
        s.execute(delete(JobArtifact).where(
            JobArtifact.job_id == job_id, JobArtifact.name.startswith(TRIAL_MODEL_PREFIX),
            JobArtifact.name.not_in(names)))

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
            self._fenced(s, job_id, attempt)
            self._put_artifact(s, job_id, name, content_type, data, meta)

    @retry_transient
    def load_artifact(self, job_id: str, name: str) -> tuple[bytes, dict[str, Any]] | None:
        with self._tx() as s:
            row = s.get(JobArtifact, (job_id, name))
            return None if row is None else (row.data, dict(row.meta))

    def _update_progress(self, s: Session, job_id: str) -> list[JobTrial]:
        """Write the job's progress and best so far (ssad_common.strategy.selectable's
        first); returns the trials that can still be the best, best first."""
        candidates = self._selectable(s, job_id)
        best = candidates[0] if candidates else None
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
        return candidates

    @retry_transient
    def stored_trial_loss(self, job_id: str, number: int) -> float | None:
        """The loss of a trial already stored for this job (a worker may have died after
        storing it but before Optuna recorded it as complete)."""
        with self._tx() as s:
            return s.scalar(select(JobTrial.validation_loss).where(
                JobTrial.job_id == job_id, JobTrial.number == number))

    @staticmethod
    def _selectable(s: Session, job_id: str) -> list[JobTrial]:
        """The job's stored trials that can be the best, best first
        (ssad_common.strategy.selectable)."""
        return selectable(s.scalars(select(JobTrial).where(
            JobTrial.job_id == job_id, JobTrial.validation_loss.is_not(None))))

    @retry_transient
    def selectable_trials(self, job_id: str, k: int
                          ) -> list[tuple[JobTrial, float, list[float] | None]]:
        """The selectable trials, best first, each with its selection score
        (ssad_common.strategy.ranked), the first ``k`` with their scores in test order."""
        with self._tx() as s:
            rows = ranked(s.scalars(select(JobTrial).where(
                JobTrial.job_id == job_id, JobTrial.state == TrialState.COMPLETE)))
            out: list[tuple[JobTrial, float, list[float] | None]] = []
            for i, (score, r) in enumerate(rows):
                scores = None if i >= k else list(s.scalars(select(TrialScore.score).where(
                    TrialScore.job_id == job_id, TrialScore.trial_number == r.number)
                    .order_by(TrialScore.index)))
                s.expunge(r)
                out.append((r, score, scores))
            return out

    # ------------------------------------------------------------------ endings

    @retry_transient
    def finish(self, job_id: str, attempt: int,
               selection: Mapping[str, Any] | None = None, message: str | None = None
               ) -> None:
        """The best stored trial (ssad_common.strategy.selectable) becomes the result,
        with ``selection`` (how decisive the choice was): written once, fenced. The
        closing event says which trial won, unless ``message`` says otherwise (a scoring
        job's one trial is its source's detector, which has its own number there)."""
        with self._tx() as s:
            self._fenced(s, job_id, attempt)  # lock, or LostLease
            candidates = self._selectable(s, job_id)
            if not candidates:
                raise RuntimeError("no completed trial to choose from")
            best = candidates[0]
            # The best's detector becomes the job's: renamed in place, its bytes are not
            # read back and written again.
            s.execute(delete(JobArtifact).where(JobArtifact.job_id == job_id,
                                                JobArtifact.name == MODEL_ARTIFACT))
            s.execute(update(JobArtifact).where(
                JobArtifact.job_id == job_id,
                JobArtifact.name == f"{TRIAL_MODEL_PREFIX}{best.number}").values(
                name=MODEL_ARTIFACT))
            _close(s, job_id, attempt, JobStatus.succeeded,
                      message or f"best trial {best.number}: {best.augmentation} "
                                 f"(loss {best.validation_loss:.4g})",
                      finished_at=utcnow(), best=_best_json(best),
                      best_trial_number=best.number, trial_progress=None,
                      selection=None if selection is None else dict(selection))

    @retry_transient
    def fail(self, job_id: str, attempt: int, reason: str) -> None:
        with self._tx() as s:
            self._end(s, job_id, attempt, JobStatus.failed, reason[:4000],
                      finished_at=utcnow(), error=reason[:4000], trial_progress=None)

    @retry_transient
    def mark_cancelled(self, job_id: str, attempt: int) -> None:
        """Cancel the job this slot holds; a no-op if another slot of it already did (the
        cancel reaches every slot; the first to stop ends the job)."""
        with self._tx() as s:
            # Locked first: another slot may be cancelling it right now.
            status = s.scalar(select(Job.status).where(Job.id == job_id).with_for_update())
            if status == JobStatus.cancelled:
                return
            self._end(s, job_id, attempt, JobStatus.cancelled, "cancelled while running",
                      finished_at=utcnow(), trial_progress=None)

    @retry_transient
    def release(self, job_id: str, attempt: int, reason: str) -> None:
        """Give this slot back (the worker is stopping, the database went away); the job's
        trials are kept, and its interrupted trial is rerun by whichever slot runs next.
        The job returns to the queue when no other slot holds it. Free: a release does not
        count against ``max_attempts`` (only expired leases do), and the next claim's new
        attempt number still fences out this one."""
        with self._tx() as s:
            job = self._fenced(s, job_id, attempt)
            self._drop_slot(s, job, attempt, reason)

    @retry_transient
    def leave(self, job_id: str, attempt: int) -> None:
        """End this slot: every trial left is running or reserved on other slots, which
        finish the job. (Were they all to vanish at once, the job returns to the queue.)"""
        with self._tx() as s:
            job = self._fenced(s, job_id, attempt)
            self._drop_slot(s, job, attempt,
                            f"the slot of attempt {attempt} left: no trial left to start")


def _close(s: Session, job_id: str, attempt: int, to: JobStatus, message: str,
           **values: Any) -> None:
    """Move a job whose row the caller has fenced out of ``running``; every other slot of
    the job ends with it (their next write is refused)."""
    if not transition(s, job_id, to, expected=JobStatus.running, message=message, **values):
        raise _lost(job_id, attempt)
    s.execute(delete(JobSlot).where(JobSlot.job_id == job_id))
    drop_trial_models(s, job_id)


def drop_trial_models(s: Session, job_id: str) -> None:
    """The detectors of the trials that could still be the best, kept while the job runs
    (see JobManager._keep_candidate_models): not needed once the job has ended."""
    s.execute(delete(JobArtifact).where(JobArtifact.job_id == job_id,
                                        JobArtifact.name.startswith(TRIAL_MODEL_PREFIX)))


def _live_slots(s: Session, job_id: str) -> int:
    return int(s.scalar(select(slot_count(job_id))) or 0)


def _lost(job_id: str, attempt: int) -> LostLease:
    return LostLease(f"job {job_id} attempt {attempt} is no longer held by this worker")


def _best_json(t: JobTrial) -> dict[str, Any]:
    return {"augmentation": t.augmentation, "params": t.params,
            "validation_loss": t.validation_loss}


__all__ = ["ClaimedJob", "DatasetRef", "GateHold", "Heartbeat", "JobManager",
           "LostLease"]
