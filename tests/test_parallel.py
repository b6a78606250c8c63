"""Parallel trials (issue 12): one job's trials run on several worker processes at once, in
one Optuna study on the shared Postgres, each worker holding a trial slot of the job.

The budget stays exact (never a trial more than planned, never a number twice), the job
finishes once, a worker killed mid-trial loses only its own trial, and a cancel reaches
every worker of the job. Real worker processes, real Postgres."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from sqlalchemy import func, select

from ssad_common.db import make_engine, session_factory
from ssad_common.models import MODEL_ARTIFACT, Job, JobArtifact, JobEvent, JobSlot, JobTrial
from ssad_common.settings import optuna_storage_url
from tests.helpers import (
    ROOT,
    client,
    job_status,
    npz,
    start_worker,
    tiny_job,
    upload,
    upload_pair,
    wait_for,
)
from worker.core.study import failed_reason

FAMILIES = ["invert", "flip", "rotate"]


def _submit(db_url: str, digits: Any, **extra: Any) -> tuple[str, dict[str, Any]]:
    train, test, _ = digits
    with client(db_url) as api:
        tr, te = upload_pair(api, npz(train[:30, 0]), npz(test[:20, 0]))
        r = api.post("/v1/jobs", json=tiny_job(tr, te, **extra))
        assert r.status_code == 202, r.text
        return str(r.json()["id"]), r.json()


def _ready(worker: subprocess.Popen[bytes], tmp: Path) -> bool:
    """The worker's loop has started (its first log line names its device)."""
    return any(f":{worker.pid}:" in p.read_text(errors="replace") and " on cpu" in
               p.read_text(errors="replace") for p in tmp.glob("worker-*.log"))


def _detectors(db_url: str, job_id: str) -> dict[str, int]:
    """The job's stored detectors: artifact name → the trial it came from."""
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as s:
            return {a.name: a.meta["trial_number"] for a in s.scalars(
                select(JobArtifact).where(JobArtifact.job_id == job_id,
                                          JobArtifact.name.startswith("model")))}
    finally:
        engine.dispose()


def _rows(db_url: str, job_id: str) -> tuple[Job, list[JobTrial], list[JobSlot], list[str]]:
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as s:
            job = s.get(Job, job_id)
            assert job is not None
            trials = list(s.scalars(select(JobTrial).where(JobTrial.job_id == job_id)
                                    .order_by(JobTrial.number)))
            slots = list(s.scalars(select(JobSlot).where(JobSlot.job_id == job_id)))
            events = [str(m) for m in s.scalars(select(JobEvent.message)
                                               .where(JobEvent.job_id == job_id))]
            s.expunge_all()
            return job, trials, slots, events
    finally:
        engine.dispose()


def _stop(*workers: subprocess.Popen[bytes]) -> None:
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            w.wait(timeout=60)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()


def _pid(worker_id: str | None) -> int:
    assert worker_id is not None
    return int(worker_id.split(":")[1])


def _started(tmp: Path) -> int:
    """Worker loops started, by their first log line (``worker HOST:PID:ID on cpu``)."""
    return sum(len(re.findall(r"worker \S+ on cpu", p.read_text(errors="replace")))
               for p in tmp.glob("worker-*.log"))


def test_two_workers_run_one_job_at_once_and_the_budget_stays_exact(
        pg_url: str, tmp_path: Path, digits: Any) -> None:
    """Two worker processes from one command (``--concurrency 2``, a thread each)."""
    supervisor = start_worker(pg_url, tmp_path, "--concurrency", "2")
    workers = [supervisor]
    try:
        wait_for(lambda: _started(tmp_path) == 2, timeout=180)
        job_id, created = _submit(pg_url, digits, n_trials=4, train_steps=150,
                                  parallelism=2)
        assert created["progress"]["trials_planned"] > 4  # screen + refine
        with client(pg_url) as api:
            done = wait_for(lambda: job_status(api, job_id)["status"] in
                            ("succeeded", "failed"), timeout=600)
            assert done
            job_json = job_status(api, job_id)
            trials_json = api.get(f"/v1/jobs/{job_id}/trials").json()["trials"]
        assert job_json["status"] == "succeeded", job_json
        job, trials, slots, events = _rows(pg_url, job_id)
        planned = job_json["progress"]["trials_planned"]
        assert job.trials_planned == planned and job.parallelism == 2
        assert len(trials) == planned  # never a trial more, none missing
        assert len({t.number for t in trials}) == planned
        assert all(t.state == "COMPLETE" for t in trials)
        assert slots == []
        assert sum(1 for m in events if m.startswith("best trial")) == 1  # finished once
        # Both workers ran trials, and some ran at the same time.
        by_worker = {t.worker_id for t in trials}
        assert len(by_worker) == 2, by_worker
        assert all(t.started_at is not None and t.finished_at is not None
                   and t.started_at <= t.finished_at for t in trials)
        overlap = any(a.worker_id != b.worker_id and a.started_at < b.finished_at  # type: ignore[operator]
                      and b.started_at < a.finished_at  # type: ignore[operator]
                      for a in trials for b in trials)
        assert overlap
        # The API shows who ran each trial and when.
        assert {t["worker"] for t in trials_json} == by_worker
        assert all(t["started_at"] and t["finished_at"] for t in trials_json)
        # The best is a full-length trial; the screen ran before any refine trial started.
        best = next(t for t in trials if t.number == job.best_trial_number)
        assert best.stage == "refine"
        # One detector is kept, the best's, whichever worker ran it and whenever it became
        # the best; the other trials' are gone.
        assert _detectors(pg_url, job_id) == {MODEL_ARTIFACT: best.number}
        last_screen = max(t.finished_at for t in trials if t.stage == "screen")  # type: ignore[type-var]
        assert all(t.started_at >= last_screen for t in trials  # type: ignore[operator]
                   if t.stage == "refine")
        # SIGTERM to the supervisor reaches both workers; all exit cleanly.
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=120) == 0
        log = "".join(p.read_text(errors="replace") for p in tmp_path.glob("worker-*.log"))
        assert log.count("stopping after this step") == 2, log
    finally:
        _stop(*workers)


def test_a_worker_killed_mid_trial_loses_only_its_own_trial(
        pg_url: str, tmp_path: Path, digits: Any) -> None:
    # A lease long enough that the survivor's heartbeat outlives a stall of the loaded
    # machine: only the victim may lose its lease.
    env = {"SSAD_LEASE_SECONDS": "8"}
    workers = [start_worker(pg_url, tmp_path, **env) for _ in range(2)]
    try:
        wait_for(lambda: all(_ready(w, tmp_path) for w in workers), timeout=180)
        job_id, _ = _submit(pg_url, digits, n_trials=4, train_steps=150, parallelism=2)

        def training_on_both() -> JobSlot | None:
            """Both slots training, one of them early in a full-length (refine) trial."""
            slots = _rows(pg_url, job_id)[2]
            busy = [s for s in slots if s.trial_progress and s.trial_progress["step"] > 0]
            early = [s for s in busy if s.trial_progress["steps"] == 150  # type: ignore[index]
                     and s.trial_progress["step"] <= 75]  # type: ignore[index]
            return early[0] if len(busy) == 2 and early else None

        def frozen_mid_trial() -> tuple[subprocess.Popen[bytes], int] | None:
            """Stop the victim (SIGSTOP: it can store nothing more), then check that the
            trial its slot holds is still unstored: killed now, it loses that trial and
            no other. Otherwise let it go on and look again."""
            target = training_on_both()
            if target is None:
                return None
            victim = next(w for w in workers if w.pid == _pid(target.worker_id))
            os.kill(victim.pid, signal.SIGSTOP)
            _, trials, slots, _ = _rows(pg_url, job_id)
            slot = next((s for s in slots if s.attempt == target.attempt), None)
            if (slot is not None and slot.trial_number is not None
                    and slot.trial_number not in {t.number for t in trials}):
                return victim, slot.trial_number
            os.kill(victim.pid, signal.SIGCONT)
            return None

        victim, lost_trial = wait_for(frozen_mid_trial, timeout=300)
        survivor = next(w for w in workers if w is not victim)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        with client(pg_url) as api:
            wait_for(lambda: job_status(api, job_id)["status"] in ("succeeded", "failed"),
                     timeout=600)
            assert job_status(api, job_id)["status"] == "succeeded"
        job, trials, slots, events = _rows(pg_url, job_id)
        assert job.lost_leases == 1
        assert any("lost their lease" in m or "lease of attempt" in m for m in events), events
        assert len(trials) == job.trials_planned  # the lost trial was rerun, nothing more
        assert len({t.number for t in trials}) == len(trials)
        assert lost_trial not in {t.number for t in trials}  # rerun under a new number
        # In the study, that trial alone failed, as interrupted, and its configuration
        # completed in another trial.
        study = optuna.load_study(study_name=f"job-{job_id}",
                                  storage=optuna_storage_url(pg_url))
        lost = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
        assert [t.number for t in lost] == [lost_trial], [(t.number, t.state)
                                                          for t in study.trials]
        assert "interrupted" in (failed_reason(study, lost[0]) or "")
        assert lost[0].params and any(
            t.state == optuna.trial.TrialState.COMPLETE and t.params == lost[0].params
            for t in study.trials if t.number != lost_trial)
        assert slots == []
        assert survivor.poll() is None  # the survivor never stopped
        assert any(_pid(t.worker_id) == survivor.pid for t in trials)
    finally:
        for w in workers:
            if w.poll() is None:
                os.kill(w.pid, signal.SIGCONT)
        _stop(*workers)


def test_a_cancel_reaches_every_worker_of_the_job(
        pg_url: str, tmp_path: Path, digits: Any) -> None:
    workers = [start_worker(pg_url, tmp_path) for _ in range(2)]
    try:
        wait_for(lambda: all(_ready(w, tmp_path) for w in workers), timeout=180)
        job_id, _ = _submit(pg_url, digits, n_trials=6, train_steps=5000, parallelism=2)
        wait_for(lambda: sum(1 for s in _rows(pg_url, job_id)[2]
                             if s.trial_progress and s.trial_progress["step"] > 0) == 2,
                 timeout=300)
        with client(pg_url) as api:
            assert api.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
            wait_for(lambda: job_status(api, job_id)["status"] == "cancelled", timeout=120)
        # Both workers stopped their trial (none finished its 5000 steps) and hold no slot.
        wait_for(lambda: not _rows(pg_url, job_id)[2], timeout=120)
        job, trials, _, _ = _rows(pg_url, job_id)
        assert job.status == "cancelled" and trials == []
        def logs() -> list[str]:
            return [p.read_text(errors="replace") for p in tmp_path.glob("worker-*.log")]

        try:
            wait_for(lambda: sum(f"job {job_id}: cancelled" in log for log in logs()) == 2,
                     timeout=120)
        except TimeoutError:
            raise AssertionError("\n----\n".join(logs())) from None
        assert all(w.poll() is None for w in workers), logs()  # back to polling, not dead
    finally:
        _stop(*workers)


SLOT_CLAIMER = """
import json, sys
from ssad_common.db import make_engine
from worker.manager import JobManager
manager = JobManager(make_engine(sys.argv[1]), lease_seconds=600)
claimed = []
while (job := manager.claim_next_job(sys.argv[2])) is not None:
    claimed.append([job.id, job.attempt])
print(json.dumps(claimed))
"""


def test_slot_claimers_in_separate_processes_never_overfill_a_job(pg_url: str) -> None:
    """Many processes claim slots of jobs with parallelism 3: every job ends with exactly 3
    live slots, each claim has its own attempt, none is claimed twice."""
    n_jobs, parallelism, n_claimers = 40, 3, 6
    with client(pg_url, max_active_jobs=n_jobs) as api:
        tr = upload(api, npz(np.zeros((4, 8, 8), np.uint8)), "a.npz").json()["id"]
        ids = {api.post("/v1/jobs", json=tiny_job(tr, tr, parallelism=parallelism))
               .json()["id"] for _ in range(n_jobs)}
    procs = [subprocess.Popen([sys.executable, "-c", SLOT_CLAIMER, pg_url, f"c{i}"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for i in range(n_claimers)]
    results = [json.loads(p.communicate(timeout=180)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    claims = [tuple(c) for r in results for c in r]
    assert len(claims) == len(set(claims)) == n_jobs * parallelism
    assert {j for j, _ in claims} == ids
    assert sum(1 for r in results if r) >= 2
    engine = make_engine(pg_url)
    try:
        with session_factory(engine)() as s:
            per_job = dict(s.execute(select(JobSlot.job_id, func.count())
                                     .group_by(JobSlot.job_id)).all())
            assert set(per_job.values()) == {parallelism}
            attempts = dict(s.execute(select(Job.id, Job.attempt)).all())
            assert set(attempts.values()) == {parallelism}
    finally:
        engine.dispose()
