"""Fault drills: what a fault costs, measured with real processes on a throwaway Postgres.

    .venv/bin/python -m bench.faults --out bench/results/faults.json [--repeats 3]

* sigkill: a worker SIGKILLed mid-trial; a second worker takes the job when the lease
  (3 s) expires. Measured: final status, attempts, finished trials lost, trials rerun,
  compute lost (from the last stored trial to the kill), results written.
* pg_restart: Postgres stopped for 5 s under a running job while a client polls the API.
  Measured: API answers during the outage, seconds until the API answers 200 again after
  Postgres is back, final status, attempts, finished trials lost, trials rerun.
The tests (tests/test_worker.py, tests/test_faults.py) assert the same behaviour; this
counts what it costs. Results feed docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import optuna
from sklearn.datasets import load_digits

from service.migrate import upgrade_head
from ssad_common.settings import optuna_storage_url
from tests.helpers import npz, wait_for, wait_http_ok, worker_env
from tests.pg import PostgresServer, free_port, running_postgres

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["invert", "flip", "mask", "noise", "rotate", "cutout"]


def digit_files() -> tuple[bytes, bytes]:
    d = load_digits()
    x = np.rint(d.images / 16 * 255).astype(np.uint8)
    zeros, others = x[d.target == 0], x[d.target != 0]
    return npz(zeros[:100]), npz(np.concatenate([zeros[100:], others[:20]]))


class Stack:
    """API (uvicorn) + workers against one database."""

    def __init__(self, db: str, work: Path) -> None:
        self.db, self.work = db, work
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
             "--port", str(port), "--log-level", "warning"], cwd=ROOT,
            env={**os.environ, "SSAD_DATABASE_URL": db, "SSAD_AUTH": "off",
                 "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http_ok(f"{self.url}/readyz")
        self.workers: list[subprocess.Popen[bytes]] = []

    def worker(self, lease: float) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, "-m", "worker", "--device", "cpu"], cwd=ROOT,
                             env=worker_env(self.db, self.work,
                                            SSAD_LEASE_SECONDS=str(lease)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.workers.append(p)
        return p

    def stop(self) -> None:
        for p in [*self.workers, self.api]:
            if p.poll() is None:
                p.kill()
                p.wait()


def submit(c: httpx.Client, train: bytes, test: bytes, n_trials: int, steps: int) -> str:
    ids = [c.post("/v1/datasets", files={"file": (n, b)}).json()["id"]
           for n, b in (("train.npz", train), ("test.npz", test))]
    r = c.post("/v1/jobs", json={"train_dataset_id": ids[0], "test_dataset_id": ids[1],
                                 "n_trials": n_trials, "train_steps": steps, "batch_size": 16,
                                 "search_space": {"augmentations": FAMILIES[:n_trials]}})
    return str(r.json()["id"])


def wait_end(c: httpx.Client, job: str, timeout: float = 600) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        try:
            j = c.get(f"/v1/jobs/{job}").json()
        except httpx.HTTPError:
            return None
        return j if j.get("status") in ("succeeded", "failed", "cancelled") else None

    result: dict[str, Any] = wait_for(ended, timeout=timeout, every=0.25)
    return result


def accounting(c: httpx.Client, db: str, job: str, before: list[dict[str, Any]]
               ) -> dict[str, Any]:
    trials = c.get(f"/v1/jobs/{job}/trials").json()["trials"]
    events = c.get(f"/v1/jobs/{job}/events").json()["events"]
    study = optuna.load_study(study_name=f"job-{job}", storage=optuna_storage_url(db))
    kept = {(t["number"], t["validation_loss"]) for t in trials}
    return {
        "finished_trials_lost": sum((t["number"], t["validation_loss"]) not in kept
                                    for t in before),
        "trials_rerun": sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials),
        "complete_trials": sum(t["state"] == "COMPLETE" for t in trials),
        "results_written": sum(e["status"] == "succeeded" for e in events),
    }


def drill_sigkill(stack: Stack, files: tuple[bytes, bytes], steps: int) -> dict[str, Any]:
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        job = submit(c, *files, n_trials=5, steps=steps)
        first = stack.worker(lease=3)
        wait_for(lambda: c.get(f"/v1/jobs/{job}").json()["progress"]["trials_completed"] >= 2,
                 timeout=600, every=0.1)
        before = c.get(f"/v1/jobs/{job}/trials").json()["trials"]
        stored_at = time.monotonic()
        time.sleep(1.5)  # well into the next trial
        first.send_signal(signal.SIGKILL)
        first.wait()
        lost_s = time.monotonic() - stored_at
        stack.worker(lease=3)
        done = wait_end(c, job)
        return {"status": done["status"], "attempts": done["attempt"],
                "compute_lost_s": round(lost_s, 2), **accounting(c, stack.db, job, before)}


def drill_pg_restart(stack: Stack, server: PostgresServer, files: tuple[bytes, bytes],
                     steps: int) -> dict[str, Any]:
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        job = submit(c, *files, n_trials=5, steps=steps)
        stack.worker(lease=30)
        wait_for(lambda: c.get(f"/v1/jobs/{job}").json()["progress"]["trials_completed"] >= 2,
                 timeout=600, every=0.1)
        before = c.get(f"/v1/jobs/{job}/trials").json()["trials"]
        time.sleep(0.7)
        server.pause()
        answers: list[int] = []
        t_end = time.monotonic() + 5
        while time.monotonic() < t_end:
            answers.append(c.get(f"/v1/jobs/{job}").status_code)
            time.sleep(0.25)
        server.resume()
        back = time.monotonic()
        wait_for(lambda: c.get(f"/v1/jobs/{job}").status_code == 200, timeout=60, every=0.05)
        recover_s = time.monotonic() - back
        done = wait_end(c, job)
        return {"status": done["status"], "attempts": done["attempt"],
                "outage_answers": sorted(set(answers)), "api_recovery_s": round(recover_s, 2),
                **accounting(c, stack.db, job, before)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results/faults.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150, help="training steps per trial")
    args = ap.parse_args(argv)
    files = digit_files()
    results: dict[str, Any] = {"meta": {
        "command": "python -m bench.faults " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "postgres": "15 (local)"},
        "sigkill": [], "pg_restart": []}
    with running_postgres() as server, tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name in ("sigkill", "pg_restart"):
                db = server.url(server.create_database())
                upgrade_head(db)
                stack = Stack(db, Path(tmp))
                try:
                    r = (drill_sigkill(stack, files, args.steps) if name == "sigkill"
                         else drill_pg_restart(stack, server, files, args.steps))
                finally:
                    stack.stop()
                results[name].append(r)
                print(name, i, json.dumps(r), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
