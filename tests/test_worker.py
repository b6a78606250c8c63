"""Real worker processes against a real database: a full job, cancel, restart, fencing."""

from __future__ import annotations

import csv
import io
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from sqlalchemy import delete, select, update

from ssad_common.db import make_engine, session_factory
from ssad_common.models import Job, JobSlot, JobTrial, utcnow
from ssad_common.settings import optuna_storage_url
from tests.helpers import (
    ROOT,
    assert_error,
    by_selection_rule,
    client,
    job_status,
    npz,
    queue_and_claim,
    run_in_process,
    start_worker,
    tiny_job,
    upload,
    upload_pair,
    wait_for,
)
from tests.pg import PostgresServer
from worker.core.study import failed_reason
from worker.manager import JobManager, LostLease


@pytest.fixture
def digit_files(digits: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[bytes, bytes, int]:
    train, test, _ = digits
    return npz(train[:60, 0]), npz(test[:40, 0]), 40


def test_full_job_by_a_real_worker(db_url: str, tmp_path: Path,
                                   digit_files: tuple[bytes, bytes, int]) -> None:
    train_b, test_b, n_test = digit_files
    with client(db_url) as api:
        tr, te = upload_pair(api, train_b, test_b)
        job = api.post("/v1/jobs", json=tiny_job(tr, te)).json()
        worker = start_worker(db_url, tmp_path, "--max-jobs", "1")
        assert worker.wait(timeout=240) == 0
        done = job_status(api, job["id"])
        assert done["status"] == "succeeded", done
        # The default (staged) plan of 3 trial-equivalents of 6 steps: the 3 families
        # screened at 2 steps, then 2 full-length trials; the budget used exactly.
        progress = done["progress"]
        assert done["attempt"] == 1 and progress["trials_completed"] == 5
        assert progress["train_steps_done"] == progress["train_steps_planned"] == 18
        assert progress["estimated_remaining_s"] is None  # the job has ended
        trials = api.get(f"/v1/jobs/{job['id']}/trials").json()["trials"]
        assert [(t["augmentation"], t["stage"], t["train_steps"]) for t in trials[:3]] == [
            ("invert", "screen", 2), ("flip", "screen", 2), ("rotate", "screen", 2)]
        refine = trials[3:]
        assert [(t["stage"], t["train_steps"]) for t in refine] == [("refine", 6)] * 2
        leaders = [t["augmentation"] for t in sorted(trials[:3], key=lambda t: (
            t["validation_loss"], t["number"]))][:2]
        assert [t["augmentation"] for t in refine] == leaders  # each leader at its defaults
        # Chosen among the full-length trials only, by the rank sum of loss and MMD.
        (best_sum, best_n), (other_sum, other_n) = by_selection_rule(refine)
        best = next(t for t in refine if t["number"] == best_n)
        other = next(t for t in refine if t["number"] == other_n)
        assert done["best"]["trial_number"] == best["number"]
        assert done["best"]["validation_loss"] == best["validation_loss"]
        # How decisive the choice was, computed from the stored full-length trials.
        sel = done["selection"]
        assert sel["best_trial"] == best["number"] and sel["candidates"] == 2
        assert sel["runner_up_trial"] == other["number"]
        assert sel["family_gap"] == pytest.approx(other_sum - best_sum)
        assert sel["family_gap_unit"] == "rank points"
        assert sel["top_trials"] == [best["number"], other["number"]]
        assert 0.0 <= sel["agreement_jaccard"] <= 1.0
        assert sel["trust"] == ("decisive" if sel["agreement_jaccard"] >= 0.5 else "uncertain")
        # The top-2 ensemble: the z-scored mean of the two full-length trials' scores.
        ens = api.get(f"/v1/jobs/{job['id']}/scores", params={"ensemble": 2}).json()
        assert ens["trial_number"] == best["number"]
        assert ens["ensemble_trials"] == [best["number"], other["number"]]
        each = [np.array([s["score"] for s in api.get(
            f"/v1/jobs/{job['id']}/trials/{n}/scores").json()["scores"]])
            for n in ens["ensemble_trials"]]
        expected = np.mean([(a - a.mean()) / (a.std() + 1e-12) for a in each], axis=0)
        assert np.allclose([s["score"] for s in ens["scores"]], expected)
        ens_csv = api.get(f"/v1/jobs/{job['id']}/scores",
                          params={"ensemble": 2, "format": "csv"})
        assert "ensemble-2-scores.csv" in ens_csv.headers["content-disposition"]
        assert len(ens_csv.text.splitlines()) == n_test + 1
        scores = api.get(f"/v1/jobs/{job['id']}/scores").json()
        assert scores["trial_number"] == best["number"]
        assert [s["index"] for s in scores["scores"]] == list(range(n_test))
        assert all(np.isfinite(s["score"]) for s in scores["scores"])
        rows = list(csv.DictReader(io.StringIO(
            api.get(f"/v1/jobs/{job['id']}/scores", params={"format": "csv"}).text)))
        assert [float(r["score"]) for r in rows] == [s["score"] for s in scores["scores"]]
        per_trial = api.get(f"/v1/jobs/{job['id']}/trials/0/scores").json()
        assert len(per_trial["scores"]) == n_test
        again = api.get(f"/v1/jobs/{job['id']}/scores")  # served from the rendered cache
        assert again.json() == scores and again.headers["etag"]
        unchanged = api.get(f"/v1/jobs/{job['id']}/scores",
                            headers={"If-None-Match": again.headers["etag"]})
        assert unchanged.status_code == 304 and unchanged.content == b""
        events = [e["status"] for e in api.get(f"/v1/jobs/{job['id']}/events").json()["events"]]
        assert events == ["queued", "running", "succeeded"]
        assert_error(api.post(f"/v1/jobs/{job['id']}/cancel"), 409, "Conflict", "succeeded")
    # optuna-dashboard is pointed at this URL; the job's study must be there, complete.
    study = optuna.load_study(study_name=f"job-{job['id']}",
                              storage=optuna_storage_url(db_url.replace("+psycopg", "")
                                                         if "postgresql" in db_url else db_url))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    assert study.user_attrs["refine_leaders"] == leaders
    assert study.trials[best_n].value == done["best"]["validation_loss"]


def _training(api: Any, job_id: str) -> bool:
    """The job is running and its worker has reported a training step of a trial."""
    job = job_status(api, job_id)
    current = job["progress"].get("current_trial")
    return job["status"] == "running" and bool(current) and current["step"] > 0


def test_cancel_a_running_job_within_a_trial(pg_url: str, tmp_path: Path,
                                             digit_files: tuple[bytes, bytes, int]) -> None:
    train_b, test_b, _ = digit_files
    with client(pg_url) as api:
        tr, te = upload_pair(api, train_b, test_b)
        job = api.post("/v1/jobs", json=tiny_job(tr, te, train_steps=50_000)).json()
        worker = start_worker(pg_url, tmp_path)
        try:
            wait_for(lambda: _training(api, job["id"]), timeout=240)  # mid-trial
            assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["cancel_requested"]
            final = wait_for(lambda: (s := job_status(api, job["id"]))["status"] == "cancelled"
                             and s, timeout=30)
            assert final["progress"]["trials_completed"] == 0
            assert worker.poll() is None  # the worker survives and waits for more work
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0


def test_killed_worker_job_is_finished_by_another_without_redoing_trials(
    pg_url: str, tmp_path: Path, digit_files: tuple[bytes, bytes, int],
) -> None:
    train_b, test_b, _ = digit_files
    families = ["invert", "flip", "mask", "noise", "rotate"]
    with client(pg_url) as api:
        tr, te = upload_pair(api, train_b, test_b)
        job = api.post("/v1/jobs", json=tiny_job(  # one full-length trial per family
            tr, te, n_trials=5, train_steps=60, strategy="tpe",
            search_space={"augmentations": families})).json()
        first = start_worker(pg_url, tmp_path, SSAD_LEASE_SECONDS="3")
        wait_for(lambda: job_status(api, job["id"])["status"] == "running", timeout=240)
        # The second worker starts while the first holds the job (it finds nothing to claim
        # until the first's lease lapses), so that its start-up overlaps the first's trials.
        second = start_worker(pg_url, tmp_path, "--max-jobs", "1", SSAD_LEASE_SECONDS="3")
        wait_for(lambda: job_status(api, job["id"])["progress"]["trials_completed"] >= 2,
                 timeout=240)
        first.kill()  # SIGKILL mid-study: no chance to clean up
        first.wait()
        assert second.wait(timeout=300) == 0
        done = job_status(api, job["id"])
        assert done["status"] == "succeeded" and done["attempt"] == 2, done
        trials = api.get(f"/v1/jobs/{job['id']}/trials").json()["trials"]
        by_first = {t["augmentation"] for t in trials if t["attempt"] == 1}
        by_second = {t["augmentation"] for t in trials if t["attempt"] == 2}
        assert len(by_first) >= 2
        assert not by_first & by_second  # nothing the first worker finished was redone
        assert by_first | by_second == set(families)
        events = [e["status"] for e in api.get(f"/v1/jobs/{job['id']}/events").json()["events"]]
        assert events == ["queued", "running", "queued", "running", "succeeded"]  # one result
        # In the study, a trial the kill interrupted is FAIL with its reason (and was rerun).
        study = optuna.load_study(study_name=f"job-{job['id']}",
                                  storage=optuna_storage_url(pg_url))
        states = [t.state for t in study.trials]
        assert states.count(optuna.trial.TrialState.COMPLETE) == 5
        assert all((failed_reason(study, t) or "").startswith("interrupted")
                   for t in study.trials if t.state == optuna.trial.TrialState.FAIL)


def test_sigterm_gives_the_job_back_and_another_worker_finishes_it(
    db_url: str, tmp_path: Path, digit_files: tuple[bytes, bytes, int],
) -> None:
    train_b, test_b, _ = digit_files
    with client(db_url) as api:
        tr, te = upload_pair(api, train_b, test_b)
        job = api.post("/v1/jobs", json=tiny_job(tr, te, n_trials=2, train_steps=60)).json()
        first = start_worker(db_url, tmp_path)
        wait_for(lambda: _training(api, job["id"]), timeout=240)  # mid-trial
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
        released = job_status(api, job["id"])
        assert released["status"] == "queued", released
        events = api.get(f"/v1/jobs/{job['id']}/events").json()["events"]
        assert events[-1]["message"] == "requeued: its worker is stopping"
        second = start_worker(db_url, tmp_path, "--max-jobs", "1")
        assert second.wait(timeout=240) == 0
        done = job_status(api, job["id"])
        assert done["status"] == "succeeded" and done["attempt"] == 2
        # The staged plan (3 families screened, 1 full-length trial), exactly, across both.
        assert done["progress"]["trials_completed"] == done["progress"]["trials_planned"] == 4
        assert len(api.get(f"/v1/jobs/{job['id']}/trials").json()["trials"]) == 4


def test_zombie_writes_are_fenced_and_attempts_are_capped(db_url: str) -> None:
    with client(db_url) as api:
        tr = upload(api, npz(np.zeros((4, 8, 8), np.uint8)), "a.npz").json()["id"]
        job_id = api.post("/v1/jobs", json=tiny_job(tr, tr)).json()["id"]
    engine = make_engine(db_url)
    manager = JobManager(engine, lease_seconds=0.05, max_attempts=2)
    try:
        zombie = manager.claim_next_job("zombie")
        assert zombie is not None and zombie.attempt == 1
        assert manager.claim_next_job("other") is None  # nothing else queued
        time.sleep(0.1)
        assert manager.requeue_stale() == [job_id]
        current = manager.claim_next_job("current")
        assert current is not None and current.attempt == 2
        with pytest.raises(LostLease):
            manager.heartbeat(job_id, zombie.attempt)
        with pytest.raises(LostLease):
            manager.record_trial(job_id, zombie.attempt, 0, augmentation="invert", params={},
                                 validation_loss=0.1, losses={}, timings={}, scores=[1.0])
        with pytest.raises(LostLease):
            manager.finish(job_id, zombie.attempt)
        manager.record_trial(job_id, current.attempt, 0, augmentation="invert", params={},
                             validation_loss=0.1, losses={"dsv": 0.1},
                             timings={"total_s": 1.0}, scores=[1.0, 2.0])
        with session_factory(engine)() as s:
            assert [t.attempt for t in s.scalars(select(JobTrial))] == [2]
        time.sleep(0.1)  # the current worker dies too: attempts are used up
        manager.requeue_stale()
        with client(db_url) as api:  # the reason, as the user sees it
            job = job_status(api, job_id)
            assert job["status"] == "failed" and job["attempt"] == 2
            assert "stopped responding 2 time(s)" in job["error"]
            assert "max_attempts=2" in job["error"]
    finally:
        engine.dispose()


def test_a_job_that_cannot_run_fails_with_a_clear_reason(db_url: str, tmp_path: Path) -> None:
    with client(db_url) as api:
        tr = upload(api, npz(np.zeros((4, 8, 8), np.uint8)), "a.npz").json()["id"]
        job_id = api.post("/v1/jobs", json=tiny_job(tr, tr)).json()["id"]
        engine = make_engine(db_url)
        with session_factory(engine)() as s:  # a spec no worker can run (e.g. older client)
            s.execute(update(Job).where(Job.id == job_id).values(
                spec={"n_trials": 1, "objective": "dsv"}))
            s.commit()
        engine.dispose()
        worker = start_worker(db_url, tmp_path, "--max-jobs", "1")
        assert worker.wait(timeout=120) == 0
        done = job_status(api, job_id)
        # The reason names what is missing (the spec's contract, ssad_common/jobspec.py), not a
        # KeyError on the first key the worker happened to read.
        assert done["status"] == "failed", done
        assert done["error"].startswith("InvalidJobSpec: the job's spec cannot be run (")
        for field in ("train_dataset_id", "contamination", "train_steps", "batch_size",
                      "seed"):
            assert f"{field}: Field required" in done["error"], done["error"]
        assert "KeyError" not in done["error"]


def test_a_zombie_runner_drops_the_job_without_touching_it(db_url: str, tmp_path: Path,
                                                           digits) -> None:  # type: ignore[no-untyped-def]
    """run_job for an attempt that lost its lease mid-study: it returns "lost", and the job
    (now held by another attempt) is left exactly as the current holder has it."""
    job_id, engine, manager, zombie = queue_and_claim(db_url, digits, "zombie")
    with session_factory(engine)() as s:  # its lease expired; another worker took over
        s.execute(delete(JobSlot).where(JobSlot.job_id == job_id))
        s.execute(update(Job).where(Job.id == job_id).values(attempt=2))
        s.add(JobSlot(job_id=job_id, attempt=2, worker_id="other",
                      lease_expires_at=utcnow() + timedelta(minutes=5)))
        s.commit()
    outcome = run_in_process(zombie, manager, db_url, tmp_path)
    assert outcome == "lost"
    with session_factory(engine)() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "running" and job.attempt == 2
        assert s.scalars(select(JobTrial)).all() == []
    engine.dispose()


OPENER = """
import sys, time
from datetime import timedelta
from pathlib import Path
from worker.storage import open_study_storage
barrier, urls = Path(sys.argv[1]), sys.argv[2:]
for i, url in enumerate(urls):
    (barrier / f"ready-{i}-{time.monotonic_ns()}").touch()
    while not (barrier / f"go-{i}").exists():
        time.sleep(0.002)
    try:
        open_study_storage(url, first_delay=0.05)
        print("ok", flush=True)
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", flush=True)
"""


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_workers_opening_a_fresh_optuna_storage_at_once_never_collide(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Issue 9 item 2, at its root: 4 processes open Optuna's storage of a freshly migrated
    database (no Optuna tables yet) at the same instant (a file barrier), 5 times, each
    time a new database. Plain ``RDBStorage`` collides here on Postgres in every round (a
    unique violation on CREATE TYPE, "relation already exists"); the lock prevents it."""
    n_procs, n_rounds = 4, 5
    if kind == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres")
        template = request.getfixturevalue("pg_template")
        urls = [server.url(server.create_database(template)) for _ in range(n_rounds)]
    else:
        template_db: Path = request.getfixturevalue("sqlite_template")
        urls = []
        for i in range(n_rounds):
            shutil.copy(template_db, tmp_path / f"r{i}.db")
            urls.append(f"sqlite:///{tmp_path / f'r{i}.db'}")
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, str(tmp_path), *urls], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for _ in range(n_procs)]
    for i in range(n_rounds):
        wait_for(lambda i=i: len(list(tmp_path.glob(f"ready-{i}-*"))) == n_procs, timeout=120,
                 every=0.01)
        (tmp_path / f"go-{i}").touch()
    outputs = [p.communicate(timeout=120)[0].split("\n")[:-1] for p in procs]
    assert outputs == [["ok"] * n_rounds] * n_procs


def test_concurrent_first_jobs_on_a_fresh_database_all_succeed(
        postgres: PostgresServer, pg_template: str, tmp_path: Path) -> None:
    """Issue 9 item 2, end to end: on a freshly migrated database (no Optuna tables yet)
    two real workers start their first jobs at once; both open Optuna's storage, which
    creates its tables. That used to collide and fail a job for good. Two rounds, each on
    a fresh database (about 20 s a round on a quiet machine, mostly the workers' start-up):
    the race itself is driven
    harder, 4 processes at a barrier, in the test above; this one shows that the workers'
    own path takes the lock."""
    images = npz(np.random.default_rng(0).integers(0, 255, (4, 8, 8), dtype=np.uint8))
    failures = []
    for rep in range(2):
        url = postgres.url(postgres.create_database(pg_template))
        with client(url) as api:
            tr = upload(api, images, "a.npz").json()["id"]
            jobs = [api.post("/v1/jobs", json=tiny_job(tr, tr, n_trials=1, train_steps=1,
                                                       batch_size=2)).json()["id"]
                    for _ in range(2)]
            workers = [start_worker(url, tmp_path, "--max-jobs", "1") for _ in range(2)]
            assert [w.wait(timeout=240) for w in workers] == [0, 0]
            for job_id in jobs:
                done = job_status(api, job_id)
                if done["status"] != "succeeded" or done["attempt"] != 1:
                    failures.append((rep, done["status"], done["attempt"], done["error"]))
    assert failures == []


def test_a_storage_that_cannot_be_opened_gives_the_job_back(
        db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening Optuna's storage keeps failing (after its retries): the job goes back to
    the queue, free, rather than failing for good."""
    from worker import runner
    from worker.storage import StorageUnavailable

    def broken() -> None:
        raise StorageUnavailable("Optuna's storage could not be opened: IntegrityError: …")

    with client(db_url) as api:
        tr = upload(api, npz(np.zeros((4, 8, 8), np.uint8)), "a.npz").json()["id"]
        job_id = api.post("/v1/jobs", json=tiny_job(tr, tr)).json()["id"]
        engine = make_engine(db_url)
        try:
            claimed = JobManager(engine).claim_next_job("w")
            assert claimed is not None
            assert run_in_process(claimed, JobManager(engine), db_url, tmp_path,
                                  broken) == "released"
        finally:
            engine.dispose()
        job = job_status(api, job_id)
        assert (job["status"], job["lost_leases"], job["error"]) == ("queued", 0, None)

        # ... but not for ever: a failure that only looks like an outage (a statement
        # timeout, say) would requeue the job endlessly; past the cap of free releases the
        # job fails and says why.
        monkeypatch.setattr(runner, "MAX_OUTAGE_RELEASES", 3)
        engine = make_engine(db_url)
        try:
            outcomes = []
            for _ in range(3):  # one release so far: two more are free, then it fails
                claimed = JobManager(engine).claim_next_job("w")
                assert claimed is not None
                outcomes.append(run_in_process(claimed, JobManager(engine), db_url, tmp_path,
                                               broken))
        finally:
            engine.dispose()
        assert outcomes == ["released", "released", "failed"], outcomes
        job = job_status(api, job_id)
        assert job["status"] == "failed" and "given back 3 times" in job["error"], job
