"""The worker loop: claim a job, run it, report, repeat. No SQL here (see manager.py)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

import torch

from worker.core.device import resolve_device
from worker.manager import JobManager
from worker.runner import ArrayCache, run_job

log = logging.getLogger("ssad.worker")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def run_worker(manager: JobManager, *, database_url: str, device: str, cache_dir: str,
               heartbeat_seconds: float, poll_seconds: float, stop: threading.Event,
               max_jobs: int | None = None) -> int:
    """Loop until ``stop`` is set (or ``max_jobs`` jobs ran). Returns the jobs run."""
    dev: torch.device = resolve_device(device)
    cache = ArrayCache(cache_dir)
    me = worker_id()
    log.info("worker %s on %s", me, dev)
    ran = 0
    while not stop.is_set() and (max_jobs is None or ran < max_jobs):
        try:
            manager.requeue_stale()
            job = manager.claim_next_job(me)
        except Exception as exc:  # database down: wait and retry, never exit
            log.warning("cannot reach the database: %s", exc)
            stop.wait(max(poll_seconds, 2.0))
            continue
        if job is None:
            stop.wait(poll_seconds)
            continue
        log.info("job %s: attempt %d claimed", job.id, job.attempt)
        try:
            outcome = run_job(job, manager, database_url=database_url, device=dev,
                              cache=cache, heartbeat_seconds=heartbeat_seconds, stop=stop)
        except Exception:  # e.g. the database went away while failing the job
            log.exception("job %s: could not be ended; its lease will expire", job.id)
            outcome = "abandoned"
        log.info("job %s: %s", job.id, outcome)
        ran += 1
        if outcome in ("released", "abandoned") and not stop.is_set():
            stop.wait(max(poll_seconds, 2.0))  # the database is struggling: back off
    return ran
