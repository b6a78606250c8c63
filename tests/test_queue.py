"""The queue: several processes race to claim from one Postgres (every job is claimed
exactly once); what counts against ``max_attempts`` (expired leases, not releases)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sqlalchemy import func, select

from ssad_common.db import make_engine, session_factory
from ssad_common.models import Job, JobArtifact, JobEvent
from tests.helpers import ROOT, client, job_status, npz, tiny_job, upload, wait_for
from worker.manager import JobManager, LostLease

CLAIMER = """
import json, sys
from ssad_common.db import make_engine
from worker.manager import JobManager
engine = make_engine(sys.argv[1])
manager = JobManager(engine)
claimed = []
while (job := manager.claim_next_job(sys.argv[2])) is not None:
    claimed.append(job.id)
    manager.fail(job.id, job.attempt, "claimed by the race test")
print(json.dumps(claimed))
"""


def test_claimers_in_separate_processes_never_share_a_job(pg_url: str) -> None:
    n_jobs, n_claimers = 120, 6
    with client(pg_url, max_active_jobs=n_jobs) as api:
        tr = upload(api, npz(np.zeros((4, 8, 8), np.uint8)), "a.npz").json()["id"]
        ids = {api.post("/v1/jobs", json=tiny_job(tr, tr)).json()["id"] for _ in range(n_jobs)}
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, pg_url, f"c{i}"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for i in range(n_claimers)]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    claimed = [j for r in results for j in r]
    assert len(claimed) == len(set(claimed)) == n_jobs  # no double claim, none missed
    assert set(claimed) == ids
    assert sum(1 for r in results if r) >= 2  # the race really had several winners
    engine = make_engine(pg_url)
    with session_factory(engine)() as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.attempt != 1)) == 0
        running_events = s.scalar(select(func.count()).select_from(JobEvent)
                                  .where(JobEvent.status == "running"))
        assert running_events == n_jobs
    engine.dispose()


def _one_queued_job(db_url: str) -> str:
    with client(db_url) as api:
        tr = upload(api, npz(np.zeros((4, 8, 8), np.uint8)), "a.npz").json()["id"]
        return str(api.post("/v1/jobs", json=tiny_job(tr, tr)).json()["id"])


def test_releases_are_free_and_only_expired_leases_use_up_attempts(db_url: str) -> None:
    """Issue 9 item 3: max_attempts=2; the job is given back cleanly 4 times (a SIGTERM
    release, a requeue after a database outage) and its worker dies once: it still
    succeeds, and every re-claim still fences out the attempt before it."""
    job_id = _one_queued_job(db_url)
    engine = make_engine(db_url)
    manager = JobManager(engine, lease_seconds=0.2, max_attempts=2)
    try:
        previous = None
        for _ in range(4):
            held = manager.claim_next_job("w")
            assert held is not None and held.id == job_id
            if previous is not None:  # the released attempt is fenced out
                with pytest.raises(LostLease):
                    manager.heartbeat(job_id, previous.attempt)
            manager.release(job_id, held.attempt, "requeued: its worker is stopping")
            previous = held
        dying = manager.claim_next_job("w")
        assert dying is not None and dying.attempt == 5
        assert wait_for(manager.requeue_stale, timeout=30) == [job_id]  # its lease expired
        last = manager.claim_next_job("w")
        assert last is not None and last.attempt == 6
        with pytest.raises(LostLease):
            manager.record_trial(job_id, dying.attempt, 0, augmentation="invert", params={},
                                 validation_loss=0.1, losses={}, timings={}, scores=[1.0])
        manager.record_trial(job_id, last.attempt, 0, augmentation="invert", params={},
                             validation_loss=0.1, losses={"dsv": 0.1},
                             timings={"total_s": 1.0}, scores=[1.0, 2.0, 3.0, 4.0])
        manager.finish(job_id, last.attempt)
        with session_factory(engine)() as s:
            job = s.get(Job, job_id)
            assert job is not None
            assert (job.status, job.attempt, job.lost_leases) == ("succeeded", 6, 1)
    finally:
        engine.dispose()


def test_max_attempts_expired_leases_still_fail_the_job(db_url: str) -> None:
    job_id = _one_queued_job(db_url)
    engine = make_engine(db_url)
    manager = JobManager(engine, lease_seconds=0.2, max_attempts=2)
    try:
        held = manager.claim_next_job("w")
        assert held is not None
        manager.release(job_id, held.attempt, "requeued: its worker is stopping")
        for _ in range(2):  # two workers die holding it
            assert manager.claim_next_job("w") is not None
            assert wait_for(manager.requeue_stale, timeout=30) == [job_id]
        with session_factory(engine)() as s:
            job = s.get(Job, job_id)
            assert job is not None
            assert (job.status, job.attempt, job.lost_leases) == ("failed", 3, 2)
            assert job.error is not None and "stopped responding 2 time(s)" in job.error
        assert manager.claim_next_job("w") is None
    finally:
        engine.dispose()


def test_a_job_claimed_before_trial_slots_existed_is_requeued_once_its_lease_expires(
        db_url: str) -> None:
    """Migration 0009: a job a pre-slot worker held has its lease on the job's row and no
    slot; when that lease runs out it goes back to the queue, uncharged, and is claimed as
    any other."""
    from datetime import timedelta

    from sqlalchemy import update

    from ssad_common.models import utcnow

    job_id = _one_queued_job(db_url)
    engine = make_engine(db_url)
    manager = JobManager(engine)
    try:
        with session_factory(engine)() as s:
            s.execute(update(Job).where(Job.id == job_id).values(
                status="running", attempt=1, worker_id="old",
                lease_expires_at=utcnow() + timedelta(minutes=5)))
            s.commit()
        assert manager.requeue_stale() == []  # its lease still runs
        with session_factory(engine)() as s:
            s.execute(update(Job).where(Job.id == job_id).values(
                lease_expires_at=utcnow() - timedelta(seconds=1)))
            s.commit()
        assert manager.requeue_stale() == [job_id]
        claimed = manager.claim_next_job("new")
        assert claimed is not None and claimed.id == job_id and claimed.attempt == 2
        with session_factory(engine)() as s:
            job = s.get(Job, job_id)
            assert job is not None and (job.status, job.lost_leases) == ("running", 0)
    finally:
        engine.dispose()


def test_slots_lost_together_count_as_one_lost_lease_while_the_job_goes_on(
        db_url: str) -> None:
    """A machine holding two of a job's three slots dies: one lost lease, the job keeps
    running on its live slot (never failed while a slot is alive), and the dead slots'
    late writes are refused."""
    from datetime import timedelta

    from sqlalchemy import update

    from ssad_common.models import JobSlot, utcnow

    with client(db_url) as api:
        tr = upload(api, npz(np.zeros((4, 8, 8), np.uint8)), "a.npz").json()["id"]
        job_id = api.post("/v1/jobs", json=tiny_job(tr, tr, parallelism=3)).json()["id"]
    engine = make_engine(db_url)
    manager = JobManager(engine, max_attempts=1)
    try:
        slots = [manager.claim_next_job(f"w{i}") for i in range(3)]
        assert all(s is not None and s.id == job_id for s in slots)
        dead = [slots[0], slots[1]]
        with session_factory(engine)() as s:
            s.execute(update(JobSlot).where(JobSlot.attempt.in_([d.attempt for d in dead]))
                      .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
            s.commit()
        live = slots[2]
        assert live is not None
        with manager.trial_gate(job_id, live.attempt) as hold:  # its turn ends them
            hold.reserve(0)
        with session_factory(engine)() as s:
            job = s.get(Job, job_id)
            assert job is not None and (job.status, job.lost_leases) == ("running", 1)
        for d in dead:
            with pytest.raises(LostLease):
                manager.heartbeat(job_id, d.attempt)
        manager.heartbeat(job_id, live.attempt)
    finally:
        engine.dispose()


def test_the_job_keeps_its_best_trials_detector_when_an_earlier_trial_becomes_best(
        db_url: str) -> None:
    """The best is the lowest rank sum of loss and MMD, so a later trial can make an
    earlier one the best again: every selectable trial's detector is kept while the job
    runs, the best's becomes the job's ``model`` when it ends, and none other is left (nor
    on a failed job); the screen's are dropped once a full-length trial has completed."""
    first, second = _one_queued_job(db_url), _one_queued_job(db_url)
    engine = make_engine(db_url)
    manager = JobManager(engine)

    def artifacts(job_id: str) -> dict[str, tuple[bytes, int]]:
        with session_factory(engine)() as s:
            return {a.name: (a.data, a.meta["trial_number"]) for a in s.scalars(
                select(JobArtifact).where(JobArtifact.job_id == job_id))}

    def best(job_id: str) -> int | None:
        with session_factory(engine)() as s:
            return s.scalar(select(Job.best_trial_number).where(Job.id == job_id))

    try:
        held = manager.claim_next_job("w")
        assert held is not None and held.id == first

        def record(number: int, loss: float, mmd: float, stage: str) -> None:
            assert held is not None
            manager.record_trial(first, held.attempt, number, augmentation="invert",
                                 params={}, validation_loss=loss,
                                 losses={"dsv": loss, "mmd": mmd}, timings={"total_s": 1.0},
                                 scores=[1.0, 2.0], model=f"detector {number}".encode(),
                                 stage=stage, train_steps=4 if stage == "refine" else 1)

        record(0, -5.0, 0.0, "screen")
        assert set(artifacts(first)) == {"model-trial-0"}
        record(1, 1.0, 3.0, "refine")  # the screen's detector can no longer be the best
        assert set(artifacts(first)) == {"model-trial-1"} and best(first) == 1
        record(2, 2.0, 1.0, "refine")  # rank sums 3 and 3: the lower loss, trial 1
        assert best(first) == 1
        assert set(artifacts(first)) == {"model-trial-1", "model-trial-2"}
        record(3, 3.0, 2.0, "refine")  # rank sums 4, 3, 5: trial 2, recorded before
        assert best(first) == 2
        assert set(artifacts(first)) == {"model-trial-1", "model-trial-2", "model-trial-3"}
        manager.finish(first, held.attempt)
        assert artifacts(first) == {"model": (b"detector 2", 2)}

        doomed = manager.claim_next_job("w")
        assert doomed is not None and doomed.id == second
        manager.record_trial(second, doomed.attempt, 0, augmentation="invert", params={},
                             validation_loss=0.5, losses={"dsv": 0.5, "mmd": 0.1},
                             timings={"total_s": 1.0}, scores=[1.0, 2.0], model=b"d")
        assert set(artifacts(second)) == {"model-trial-0"}
        manager.fail(second, doomed.attempt, "a test failure")
        assert artifacts(second) == {}
    finally:
        engine.dispose()


def test_a_finished_trial_is_no_longer_shown_as_running(db_url: str) -> None:
    """The job's ``current_trial`` (a slot's last heartbeat) is cleared with the trial it
    names when that trial is stored, and only then: with two slots, the other slot's
    running trial stays shown, and a report that arrives after its trial was stored is
    not shown. (A finished trial used to linger until the next trial's first heartbeat,
    so a client's bar showed "trial 11 step 97/100" after trial 11 had finished.)"""
    from ssad_common.models import JobSlot

    with client(db_url) as api:
        tr = upload(api, npz(np.zeros((4, 8, 8), np.uint8)), "a.npz").json()["id"]
        job_id = api.post("/v1/jobs", json=tiny_job(tr, tr, parallelism=2)).json()["id"]
        engine = make_engine(db_url)
        manager = JobManager(engine)

        def shown() -> int | None:
            cur = job_status(api, job_id)["progress"]["current_trial"]
            return None if cur is None else int(cur["number"])

        def slot_progress(attempt: int) -> object:
            with session_factory(engine)() as s:
                return s.scalar(select(JobSlot.trial_progress).where(
                    JobSlot.job_id == job_id, JobSlot.attempt == attempt))

        try:
            a, b = manager.claim_next_job("wa"), manager.claim_next_job("wb")
            assert a is not None and b is not None
            for slot, number in ((a, 0), (b, 1)):
                with manager.trial_gate(job_id, slot.attempt) as hold:
                    hold.reserve(number)
                manager.heartbeat(job_id, slot.attempt,
                                  {"number": number, "step": 97, "steps": 100, "loss": 0.5})
            assert shown() == 1  # the latest heartbeat's
            done = {"augmentation": "invert", "params": {}, "losses": {"dsv": 0.1},
                    "timings": {"total_s": 1.0}, "scores": [1.0, 2.0, 3.0, 4.0]}
            manager.record_trial(job_id, a.attempt, 0, validation_loss=0.1, **done)
            assert shown() == 1 and slot_progress(a.attempt) is None
            assert slot_progress(b.attempt) is not None
            # A report of trial 0 sent after it was stored (the heartbeat thread's last)
            # renews the lease but shows nothing.
            manager.heartbeat(job_id, a.attempt,
                              {"number": 0, "step": 100, "steps": 100, "loss": 0.1})
            assert shown() == 1 and slot_progress(a.attempt) is None
            manager.record_trial(job_id, b.attempt, 1, validation_loss=0.2, **done)
            assert shown() is None and slot_progress(b.attempt) is None
        finally:
            engine.dispose()
