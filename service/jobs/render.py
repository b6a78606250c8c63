"""What the job routes send back: the response models built from the stored rows, the
score bodies (JSON or CSV) and the plots (PNG), each rendered once per API process where
it cannot change (service/jobs/cache.py)."""

from __future__ import annotations

import csv
import io
import json
import threading
import weakref
from typing import Any

from cachetools import LRUCache, cached
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from service.jobs import service
from service.jobs.cache import RENDERED
from service.jobs.schemas import Best, JobOut, JobSummary, PlanOut, Progress, TrialOut
from service.reads import Reads
from ssad_common.jobspec import InvalidJobSpec, TuneSpec, load_spec
from ssad_common.lifecycle import JobStatus
from ssad_common.models import Job, JobTrial
from ssad_common.search_space import SearchSpace
from ssad_common.strategy import StudyPlan, plan_for, trust

MEDIA = {"json": "application/json", "csv": "text/csv"}


def job_out(job: Job) -> JobOut:
    return JobOut(**_job_fields(job), spec=job.spec)


#: The JSON of each job snapshot the hot reads share (service/reads.py: the callers one
#: statement serves get the same transient Job, which no one changes), rendered once.
#: Used on the event loop only.
_SNAPSHOT_JSON: weakref.WeakKeyDictionary[Job, bytes] = weakref.WeakKeyDictionary()


def snapshot_json(job: Job) -> bytes:
    """``job_out(job)`` as JSON, rendered once per snapshot from :class:`Reads` (only
    those: a job that can change afterwards, one loaded in a session, would keep the body
    of its first rendering)."""
    body = _SNAPSHOT_JSON.get(job)
    if body is None:
        body = _SNAPSHOT_JSON[job] = job_out(job).model_dump_json().encode()
    return body


def job_summary(job: Job, include_spec: bool) -> JobSummary:
    """A list item: the job without its spec (the request it was created with) unless asked."""
    return JobSummary(**_job_fields(job), spec=job.spec if include_spec else None)


def job_plan(job: Job) -> StudyPlan | None:
    """A tuning job's plan, from its spec (a pure function of it); None for other kinds
    and for a spec that cannot be read (the worker fails such a job, naming why)."""
    return _plan(job) if job.kind == "tune" else None


@cached(LRUCache(maxsize=4096), key=lambda job: job.id, lock=threading.Lock())
def _plan(job: Job) -> StudyPlan | None:
    """Kept per process, by job id: a plan is a pure function of the job's spec, which is
    written once, when the job is created, so it never goes stale; the routes clients poll
    would otherwise work it out again on every request (about a tenth of one, profiled)."""
    try:
        spec = load_spec(job.kind, job.spec)
        assert isinstance(spec, TuneSpec)
        space = SearchSpace.from_dict(spec.search_space)
        return plan_for(spec.strategy, spec.n_trials, spec.train_steps, space)
    except (InvalidJobSpec, ValueError):
        return None


def _progress(job: Job, plan: StudyPlan | None) -> Progress:
    remaining = None
    active = job.status in (JobStatus.queued, JobStatus.running)
    if plan is not None and job.train_seconds_done > 0 and active:
        pace = job.train_seconds_done / job.train_steps_done
        remaining = max(0, plan.total_steps - job.train_steps_done) * pace
    return Progress(n_trials=job.n_trials, trials_completed=job.trials_completed,
                    trials_planned=None if plan is None else plan.total_trials,
                    train_steps_done=job.train_steps_done,
                    train_steps_planned=None if plan is None else plan.total_steps,
                    estimated_remaining_s=remaining, current_trial=job.trial_progress)


def selection_out(stored: dict[str, Any] | None) -> dict[str, Any] | None:
    """A job's stored ``selection`` as served now. Fields stored before they existed are
    filled in: the unit of its ``family_gap`` (jobs stored before the unit existed have a
    gap in the objective's loss) and the ``trust`` verdict (from the stored
    agreement, by the same rule the worker applies)."""
    if not stored:
        return stored
    out = dict(stored)
    if "family_gap_unit" not in out:
        out["family_gap_unit"] = None if out.get("family_gap") is None else "loss"
    if "trust" not in out:
        out["trust"] = trust(out.get("agreement_jaccard"))
    return out


def _job_fields(job: Job) -> dict[str, Any]:
    best = None
    if job.best is not None and job.best_trial_number is not None:
        best = Best(trial_number=job.best_trial_number, **job.best)
    plan = job_plan(job)
    return dict(
        id=job.id, kind=job.kind,
        status=job.status,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        progress=_progress(job, plan),
        best=best, error=job.error, attempt=job.attempt, lost_leases=job.lost_leases,
        cancel_requested=job.cancel_requested,
        train_dataset_id=job.train_dataset_id, test_dataset_id=job.test_dataset_id,
        plan=None if plan is None else PlanOut(**plan.to_json()),
        selection=selection_out(job.selection), notify_url=job.notify_url,
        report_url=f"/v1/jobs/{job.id}/report")


def trial_out(t: JobTrial) -> TrialOut:
    return TrialOut(number=t.number, state=t.state, augmentation=t.augmentation,
                    params=t.params, validation_loss=t.validation_loss, losses=t.losses,
                    duration_s=t.duration_s, attempt=t.attempt, error=t.error,
                    stage=t.stage, train_steps=t.train_steps, worker=t.worker_id,
                    started_at=t.started_at, finished_at=t.finished_at)


def render_scores(job_id: str, number: int, rows: list[tuple[int, str, float]],
                  fmt: str, ensemble: list[int] | None = None) -> bytes:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["index", "name", "score"])
        w.writerows((i, n, repr(s)) for i, n, s in rows)
        return buf.getvalue().encode()
    # Plain dicts and the C JSON encoder: 10,000 pydantic objects cost more than the query.
    body: dict[str, Any] = {"job_id": job_id, "trial_number": number}
    if ensemble is not None:
        body["ensemble_trials"] = ensemble
    body["scores"] = [{"index": i, "name": n, "score": s} for i, n, s in rows]
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()


def scores_body(session: Session, tenant_id: str, job_id: str, number: int,
                fmt: str) -> bytes:
    """Trial ``number``'s scores in ``fmt``, from the per-process cache of bodies. The
    caller has checked that the job is the tenant's."""
    return RENDERED.get((job_id, number, fmt), lambda: _render(
        session, tenant_id, job_id, number, fmt, None))


async def result_body(reads: Reads, factory: sessionmaker[Session], tenant_id: str,
                      job_id: str, fmt: str, ensemble: int | None) -> tuple[int, bytes]:
    """The job's result: its best trial's number and the scores in ``fmt`` of that trial
    (``ensemble``: of the top-``ensemble`` ensemble). A succeeded job's trials never
    change, so the body is rendered once per process; once it is, a request costs one
    read of three columns (ownership, status, best trial) on the event loop
    (service/reads.py), and only rendering goes to the thread pool, on a session of its
    own."""
    number = service.result_trial(job_id, *service.visible_state(
        await reads.result_state(job_id), tenant_id, job_id))
    key = (job_id, number, fmt if ensemble is None else f"ensemble-{ensemble}-{fmt}")
    body = RENDERED.peek(key)
    if body is None:
        def render() -> bytes:
            with factory() as session:
                return _render(session, tenant_id, job_id, number, fmt, ensemble)

        body = await run_in_threadpool(RENDERED.get, key, render)
    return number, body


def _render(session: Session, tenant_id: str, job_id: str, number: int, fmt: str,
            ensemble: int | None) -> bytes:
    if ensemble is None:
        n, rows = service.scores(session, tenant_id, job_id, number)
        return render_scores(job_id, n, rows, fmt)
    best, trials, rows = service.ensemble_scores(session, tenant_id, job_id, ensemble)
    return render_scores(job_id, best, rows, fmt, ensemble=trials)


def plot_png(session: Session, tenant_id: str, job_id: str, name: str, k: int) -> bytes:
    """One of the job's plots (service.plot). `scores` and `top` are drawn from a
    succeeded job's fixed scores (and, for `top`, its whole test set read from the
    database): rendered once per process, like the score bodies."""
    if name not in ("scores", "top"):
        return service.plot(session, tenant_id, job_id, name, k)
    number = service.best_trial(session, tenant_id, job_id)  # ownership, 409 if not done
    key = (job_id, number, f"{name}.png?k={k}" if name == "top" else f"{name}.png")
    return RENDERED.get(key, lambda: service.plot(session, tenant_id, job_id, name, k))
