from __future__ import annotations

import csv
import io
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import PlainTextResponse

from service.deps import SessionDep, SettingsDep
from service.errors import error_responses
from service.jobs import service
from service.jobs.schemas import (
    Best,
    EventList,
    EventOut,
    JobCreate,
    JobList,
    JobOut,
    Progress,
    ScoreItem,
    ScoresOut,
    TrialList,
    TrialOut,
)
from service.models import Job, JobTrial

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def job_out(job: Job) -> JobOut:
    best = None
    if job.best is not None and job.best_trial_number is not None:
        best = Best(trial_number=job.best_trial_number, **job.best)
    return JobOut(
        id=job.id, status=job.status,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        progress=Progress(n_trials=job.n_trials, trials_completed=job.trials_completed),
        best=best, error=job.error, attempt=job.attempt, cancel_requested=job.cancel_requested,
        train_dataset_id=job.train_dataset_id, test_dataset_id=job.test_dataset_id,
        spec=job.spec)


def trial_out(t: JobTrial) -> TrialOut:
    return TrialOut(number=t.number, state=t.state, augmentation=t.augmentation,
                    params=t.params, validation_loss=t.validation_loss, losses=t.losses,
                    duration_s=t.duration_s, attempt=t.attempt)


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses=error_responses(404, 422, 503), summary="Queue a tuning job")
def create_job(session: SessionDep, settings: SettingsDep, body: JobCreate,
               response: Response) -> JobOut:
    job = service.create_job(session, body, settings)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job)


@router.get("", response_model=JobList, summary="List jobs, newest first")
def list_jobs(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    status_: Annotated[Literal["queued", "running", "succeeded", "failed", "cancelled"] | None,
                       Query(alias="status")] = None,
) -> JobList:
    rows, total = service.list_jobs(session, limit, offset, status_)
    return JobList(items=[job_out(j) for j in rows], total=total)


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(404),
            summary="A job's status, progress and best trial so far")
def get_job(session: SessionDep, job_id: str) -> JobOut:
    return job_out(service.get_job(session, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=error_responses(404, 409),
             summary="Cancel a job (idempotent; 409 once it has succeeded or failed)")
def cancel_job(session: SessionDep, job_id: str) -> JobOut:
    return job_out(service.cancel_job(session, job_id))


@router.get("/{job_id}/trials", response_model=TrialList, responses=error_responses(404),
            summary="Every stored trial: augmentation, parameters, losses, duration")
def list_trials(session: SessionDep, job_id: str) -> TrialList:
    return TrialList(job_id=job_id,
                     trials=[trial_out(t) for t in service.list_trials(session, job_id)])


@router.get("/{job_id}/events", response_model=EventList, responses=error_responses(404),
            summary="The job's history: every status change, with its attempt")
def list_events(session: SessionDep, job_id: str) -> EventList:
    return EventList(job_id=job_id, events=[
        EventOut(at=e.at, status=e.status, attempt=e.attempt, message=e.message)
        for e in service.list_events(session, job_id)])


def _scores_response(job_id: str, number: int, rows: list[tuple[int, str, float]],
                     fmt: str) -> Response:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["index", "name", "score"])
        w.writerows((i, n, repr(s)) for i, n, s in rows)
        return PlainTextResponse(buf.getvalue(), media_type="text/csv")
    body = ScoresOut(job_id=job_id, trial_number=number,
                     scores=[ScoreItem(index=i, name=n, score=s) for i, n, s in rows])
    return Response(body.model_dump_json(), media_type="application/json")


_SCORES_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/csv": {"example": "index,name,score\n0,a.png,3.1\n"}},
          "description": "JSON (default) or CSV with ?format=csv"}}


@router.get("/{job_id}/scores", response_model=ScoresOut,
            responses={**_SCORES_DOC, **error_responses(404, 409)},
            summary="Anomaly score of every test image (the chosen trial), in test order")
def job_scores(session: SessionDep, job_id: str,
               format: Literal["json", "csv"] = "json") -> Response:
    number, rows = service.scores(session, job_id, None)
    return _scores_response(job_id, number, rows, format)


@router.get("/{job_id}/trials/{number}/scores", response_model=ScoresOut,
            responses={**_SCORES_DOC, **error_responses(404)},
            summary="Anomaly scores of one finished trial, in test order")
def trial_scores(session: SessionDep, job_id: str, number: int,
                 format: Literal["json", "csv"] = "json") -> Response:
    n, rows = service.scores(session, job_id, number)
    return _scores_response(job_id, n, rows, format)
