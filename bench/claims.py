"""Trial-slot claims at scale (issue 12): 500 jobs of 20 trials each (10,000 trials), with
parallelism 4, drained by 16 claimer processes through the worker's own queue code
(``JobManager``: claim a slot, take turns at the job's budget in ``trial_gate``, store each
trial fenced by the slot, leave or finish the job), without training: a trial is its
turn, a stored result and 10 scores. One claimer is SIGKILLed while it holds a trial.

Reported: trials/s and slot claims/s (median of ``--repeats`` runs), trials run twice
(from each claimer's log of the trials it ran, not from the table, which would hide a
duplicate behind its primary key), jobs finished twice (from the jobs' events), trials
stored per job against the plan, and what the killed claimer lost.

    python -m bench.claims --out bench/results/claims.json     # about 5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select

from service.migrate import upgrade_head
from ssad_common.db import make_engine, session_factory
from ssad_common.lifecycle import JobStatus
from ssad_common.models import Blob, Dataset, Job, JobEvent, JobTrial, Tenant
from tests.pg import running_postgres

ROOT = Path(__file__).resolve().parents[1]

CLAIMER = r'''
import json, sys, time
from ssad_common.db import make_engine
from ssad_common.strategy import FINISHING
from worker.manager import JobManager, LostLease
from ssad_common.db import session_factory
from ssad_common.models import JobTrial
from sqlalchemy import select

url, name, log_path, hang_after, lease = sys.argv[1:6]
hang_after, lease = int(hang_after), float(lease)
engine = make_engine(url)
manager = JobManager(engine, lease_seconds=lease, max_attempts=10)
sessions = session_factory(engine)
log = open(log_path, "w")
ran = slots = finished = 0
idle_since = None
while True:
    manager.requeue_stale()
    job = manager.claim_next_job(name)
    if job is None:
        if idle_since is None:
            idle_since = time.monotonic()
        if time.monotonic() - idle_since > 3 * lease:
            break
        time.sleep(0.05)
        continue
    idle_since = None
    slots += 1
    planned = job.spec["n_trials"]
    try:
        while True:
            with manager.trial_gate(job.id, job.attempt) as hold:
                with sessions() as s:
                    stored = set(s.scalars(select(JobTrial.number)
                                           .where(JobTrial.job_id == job.id)))
                taken = stored | hold.reserved
                free = [n for n in range(planned) if n not in taken]
                if free:
                    number = free[0]
                elif hold.reserved - stored:
                    number = None  # the last trials run elsewhere
                else:
                    number = FINISHING
                hold.reserve(number)
            if number is None:
                manager.leave(job.id, job.attempt)
                break
            if number == FINISHING:
                manager.finish(job.id, job.attempt)
                finished += 1
                print(json.dumps(["finish", job.id]), file=log, flush=True)
                break
            print(json.dumps(["run", job.id, number]), file=log, flush=True)
            if ran == hang_after:
                print("hanging", flush=True)
                time.sleep(3600)  # killed here, holding the trial
            manager.record_trial(job.id, job.attempt, number, augmentation="invert",
                                 params={}, validation_loss=float(number), losses={},
                                 timings={"total_s": 0.0}, scores=[0.1 * i for i in range(10)])
            ran += 1
    except LostLease:
        pass
print(json.dumps({"ran": ran, "slots": slots, "finished": finished}), flush=True)
'''


def seed_jobs(url: str, n_jobs: int, trials: int, parallelism: int) -> list[str]:
    """Queue ``n_jobs`` jobs straight into the tables (the API's creation path is measured
    elsewhere; here only the queue is)."""
    engine = make_engine(url)
    ids = [str(uuid.uuid4()) for _ in range(n_jobs)]
    with session_factory(engine)() as s:
        s.add(Tenant(id="bench", name="bench"))
        s.add(Blob(sha256="0" * 64, size_bytes=0, n_chunks=0))
        s.flush()  # no relationships are declared: parents first, by hand
        s.add(Dataset(id="d", tenant_id="bench", name="d", sha256="0" * 64, n_samples=10,
                      channels=1, height=8, width=8, size_bytes=0, names=[]))
        s.flush()
        s.execute(insert(Job), [
            {"id": i, "tenant_id": "bench", "status": JobStatus.queued,
             "train_dataset_id": "d", "test_dataset_id": "d", "kind": "tune",
             "spec": {"n_trials": trials}, "n_trials": trials, "trials_planned": trials,
             "parallelism": parallelism, "trials_completed": 0, "attempt": 0,
             "cancel_requested": False} for i in ids])
        s.commit()
    engine.dispose()
    return ids


def drain(url: str, work: Path, claimers: int, lease: float, hang_after: int
          ) -> dict[str, Any]:
    procs = []
    for i in range(claimers):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", CLAIMER, url, f"c{i}", str(work / f"c{i}.log"),
             str(hang_after if i == 0 else -1), str(lease)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}))
    t0 = time.perf_counter()
    assert procs[0].stdout is not None
    assert procs[0].stdout.readline().strip() == "hanging"
    os.kill(procs[0].pid, signal.SIGKILL)
    procs[0].wait()
    engine = make_engine(url)
    ended = select(func.count()).select_from(Job).where(Job.status.in_(
        [JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled]))
    n_jobs = 0
    with engine.connect() as conn:
        n_jobs = int(conn.scalar(select(func.count()).select_from(Job)) or 0)
    while True:  # the drain's time: until every job has ended (not the claimers' idle exit)
        with engine.connect() as conn:
            if conn.scalar(ended) == n_jobs:
                break
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    outs = [json.loads(p.communicate(timeout=1800)[0].strip().splitlines()[-1])
            for p in procs[1:]]
    runs: Counter[tuple[str, int]] = Counter()
    finishes: Counter[str] = Counter()
    killed_ran: list[tuple[str, int]] = []
    for i in range(claimers):
        for line in (work / f"c{i}.log").read_text().splitlines():
            entry = json.loads(line)
            if entry[0] == "run":
                runs[(entry[1], entry[2])] += 1
                if i == 0:
                    killed_ran.append((entry[1], entry[2]))
            else:
                finishes[entry[1]] += 1
    with session_factory(engine)() as s:
        stored = {(j, n) for j, n in s.execute(select(JobTrial.job_id, JobTrial.number))}
        per_job = Counter(j for j, _ in stored)
        succeeded = Counter(s.scalars(select(JobEvent.job_id).where(
            JobEvent.status == JobStatus.succeeded)))
        statuses = Counter(s.scalars(select(Job.status)))
        claims = s.scalar(select(func.sum(Job.attempt)))
    engine.dispose()
    hung = killed_ran[-1]  # the trial it held when killed
    return {
        "wall_s": wall, "trials": len(stored), "trials_per_s": len(stored) / wall,
        "slot_claims": int(claims or 0), "slot_claims_per_s": int(claims or 0) / wall,
        "trials_run_twice": sum(1 for k, c in runs.items() if c > 1 and k != hung),
        "hung_trial_rerun": runs[hung] == 2,
        "jobs_finished_twice": sum(1 for c in succeeded.values() if c > 1),
        "finish_calls_twice": sum(1 for c in finishes.values() if c > 1),
        "job_statuses": dict(statuses),
        "jobs_with_wrong_trial_count": sum(1 for c in per_job.values()
                                           if c != per_job.most_common(1)[0][1]),
        "killed_claimer_trials_kept": sum(1 for k in killed_ran[:-1] if k in stored),
        "killed_claimer_trials_run": len(killed_ran) - 1,
        "claimers_out": outs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results/claims.json")
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--parallelism", type=int, default=4)
    ap.add_argument("--claimers", type=int, default=16)
    ap.add_argument("--lease", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hang-after", type=int, default=50,
                    help="trials the killed claimer stores before it hangs in one")
    args = ap.parse_args(argv)
    runs = []
    with running_postgres() as server:
        for r in range(args.repeats):
            url = server.url(server.create_database())
            upgrade_head(url)
            seed_jobs(url, args.jobs, args.trials, args.parallelism)
            with tempfile.TemporaryDirectory() as tmp:
                run = drain(url, Path(tmp), args.claimers, args.lease, hang_after=args.hang_after)
            run["trials_expected"] = args.jobs * args.trials
            print(f"run {r + 1}: {run['trials']} trials in {run['wall_s']:.1f}s "
                  f"({run['trials_per_s']:.0f}/s, {run['slot_claims_per_s']:.0f} claims/s); "
                  f"run twice {run['trials_run_twice']}, finished twice "
                  f"{run['jobs_finished_twice']}, statuses {run['job_statuses']}", flush=True)
            runs.append(run)
    out = {
        "jobs": args.jobs, "trials_per_job": args.trials, "parallelism": args.parallelism,
        "claimers": args.claimers, "lease_s": args.lease,
        "machine": f"{platform.node()}, {os.cpu_count()} cores",
        "median_trials_per_s": statistics.median(r["trials_per_s"] for r in runs),
        "median_slot_claims_per_s": statistics.median(r["slot_claims_per_s"] for r in runs),
        "runs": [{k: v for k, v in r.items() if k != "claimers_out"} for r in runs],
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
