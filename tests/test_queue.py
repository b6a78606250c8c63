"""Several processes race to claim from one Postgres: every job is claimed exactly once."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from sqlalchemy import func, select

from service.db import make_engine, session_factory
from service.models import Job, JobEvent
from tests.helpers import ROOT, client, npz, tiny_job, upload

CLAIMER = """
import json, sys
from service.db import make_engine
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
