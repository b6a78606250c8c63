"""Parallel trials (issue 12): one job run by 1, 2 and 4 worker processes on this machine.

For each worker count W, a fresh database gets the same job (the product's defaults but
``n_trials`` and ``parallelism`` = W) on one development task, and W worker processes
(``python -m worker``, each with cores / W torch threads, at least 1, so the cores are not
oversubscribed beyond W > cores) run it. Reported per W: the job's wall time (started_at →
finished_at) and its ratio to W = 1, the trials each worker ran, the selected configuration,
and whether the selected configuration and its scores equal the sequential run's (the
screen and the refine stage's queued trials are the same trials with the same seeds; the
trials TPE samples are not, since with W > 1 it samples knowing fewer results and with a
per-slot seed).

    python -m bench.parallel --out bench/results/parallel.json   # about 25 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.faults import Stack, wait_end
from bench.tasks import mnist_one_class
from service.migrate import upgrade_head
from tests.helpers import npz, worker_env
from tests.pg import running_postgres

ROOT = Path(__file__).resolve().parents[1]


def run_job(db: str, work: Path, files: tuple[bytes, bytes], workers: int, n_trials: int,
            seed: int) -> dict[str, Any]:
    stack = Stack(db, work)
    threads = max(1, (os.cpu_count() or 1) // workers)
    try:
        with httpx.Client(base_url=stack.url, timeout=60) as c:
            ids = [c.post("/v1/datasets", files={"file": (n, b)}).json()["id"]
                   for n, b in (("train.npz", files[0]), ("test.npz", files[1]))]
            for _ in range(workers):
                stack.workers.append(subprocess.Popen(
                    [sys.executable, "-m", "worker", "--device", "cpu",
                     "--threads", str(threads)], cwd=ROOT,
                    env=worker_env(db, work, OMP_NUM_THREADS=str(threads)),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            r = c.post("/v1/jobs", json={"train_dataset_id": ids[0], "test_dataset_id": ids[1],
                                         "n_trials": n_trials, "parallelism": workers,
                                         "seed": seed})
            r.raise_for_status()
            job = r.json()["id"]
            done = wait_end(c, job, timeout=3600)
            trials = c.get(f"/v1/jobs/{job}/trials").json()["trials"]
            scores = c.get(f"/v1/jobs/{job}/scores").json()["scores"] \
                if done["status"] == "succeeded" else []
    finally:
        stack.stop()
    started = done["started_at"] and np.datetime64(done["started_at"].rstrip("Z"))
    finished = done["finished_at"] and np.datetime64(done["finished_at"].rstrip("Z"))
    per_worker: dict[str, int] = {}
    for t in trials:
        per_worker[t["worker"]] = per_worker.get(t["worker"], 0) + 1
    return {
        "workers": workers, "threads_per_worker": threads, "status": done["status"],
        "wall_s": float((finished - started) / np.timedelta64(1, "s")),
        "trials": len(trials), "trials_planned": done["progress"]["trials_planned"],
        "trials_per_worker": sorted(per_worker.values(), reverse=True),
        "best": done["best"],
        "scores": [s["score"] for s in scores],
        "trial_list": [{k: t[k] for k in ("number", "stage", "augmentation", "params",
                                          "validation_loss", "worker")} for t in trials],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results/parallel.json")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--n-trials", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    task = mnist_one_class(3)
    files = (npz(task.train[:, 0]), npz(task.test[:, 0]))
    runs = []
    with running_postgres() as server, tempfile.TemporaryDirectory() as tmp:
        for w in args.workers:
            db = server.url(server.create_database())
            upgrade_head(db)
            t = time.perf_counter()
            run = run_job(db, Path(tmp), files, w, args.n_trials, args.seed)
            print(f"{w} worker(s): {run['status']} in {run['wall_s']:.1f}s "
                  f"({time.perf_counter() - t:.1f}s with start-up), trials per worker "
                  f"{run['trials_per_worker']}, best {run['best']}", flush=True)
            runs.append(run)
    base = runs[0]
    for run in runs:
        run["speedup"] = base["wall_s"] / run["wall_s"]
        run["same_best_as_first"] = run["best"] == base["best"]
        run["same_scores_as_first"] = bool(run["scores"]) and np.allclose(
            run["scores"], base["scores"], rtol=0, atol=1e-9)
        # The queued trials (screen, refine anchors) are the same configurations with the
        # same seeds whoever runs them: their losses should match the sequential run's.
        first = {(t["augmentation"], json.dumps(t["params"], sort_keys=True), t["stage"]):
                 t["validation_loss"] for t in base["trial_list"]}
        same = [abs(first[k] - t["validation_loss"]) < 1e-6 for t in run["trial_list"]
                if (k := (t["augmentation"], json.dumps(t["params"], sort_keys=True),
                          t["stage"])) in first]
        run["trials_matching_a_sequential_configuration"] = len(same)
        run["of_which_same_loss"] = sum(same)
    out = {"task": task.name, "n_trials": args.n_trials, "seed": args.seed,
           "machine": f"{platform.node()}, {os.cpu_count()} cores", "runs": [
               {k: v for k, v in r.items() if k != "scores"} for r in runs]}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for r in out["runs"]:
        print(f"W={r['workers']}: {r['wall_s']:.1f}s, speed-up {r['speedup']:.2f}x, "
              f"same best {r['same_best_as_first']}, same scores {r['same_scores_as_first']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
