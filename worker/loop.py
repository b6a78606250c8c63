"""The worker loop: claim a job, run it, report, repeat. No SQL here (see manager.py)."""

from __future__ import annotations

import functools
import logging
import threading

from worker.cache import ArrayCache
from worker.context import Q, WorkerContext
from worker.core.device import resolve_device
from worker.manager import JobManager
from worker.runner import run_job
from worker.settings import WorkerSettings
from worker.storage import open_study_storage

log = logging.getLogger("ssad.worker")


def build_context(settings: WorkerSettings, manager: JobManager, device: str,
                  stop: threading.Event) -> WorkerContext[JobManager]:
    """A worker's dependencies from its settings (``device``: auto, cpu, cuda or cuda:N;
    ValueError for an unknown or absent one)."""
    return WorkerContext(settings=settings, manager=manager, run_job=run_job,
                         device=resolve_device(device), cache=ArrayCache(settings.cache_dir),
                         open_storage=functools.partial(open_study_storage,
                                                        settings.database_url),
                         stop=stop)


def run_worker(ctx: WorkerContext[Q], *, max_jobs: int | None = None) -> int:
    """Loop until ``ctx.stop`` is set (or ``max_jobs`` jobs ran). Returns the jobs run."""
    stop, manager = ctx.stop, ctx.manager
    backoff = max(ctx.poll_seconds, 2.0)  # the database is struggling: wait longer
    log.info("worker %s on %s", ctx.worker_id, ctx.device)
    ran = 0
    while not stop.is_set() and (max_jobs is None or ran < max_jobs):
        try:
            manager.requeue_stale()
            job = manager.claim_next_job(ctx.worker_id)
        except Exception as exc:  # database down: wait and retry, never exit
            log.warning("cannot reach the database: %s", exc)
            stop.wait(backoff)
            continue
        if job is None:
            stop.wait(ctx.poll_seconds)
            continue
        log.info("job %s: attempt %d claimed", job.id, job.attempt)
        try:
            outcome = ctx.run_job(job, ctx)
        except Exception:  # e.g. the database went away while failing the job
            log.exception("job %s: could not be ended; its lease will expire", job.id)
            outcome = "abandoned"
        log.info("job %s: %s", job.id, outcome)
        ran += 1
        if outcome in ("released", "abandoned") and not stop.is_set():
            stop.wait(backoff)
        elif outcome == "left":  # its last trials run elsewhere: look again in a while
            stop.wait(ctx.poll_seconds)
    return ran
