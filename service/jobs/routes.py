from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse

from service import links, webhooks
from service.deps import (
    IdempotencyKeyDep,
    JobReaderDep,
    LinkToken,
    SessionDep,
    SettingsDep,
    StreamJobReaderDep,
    TenantDep,
    polled_job_reader,
    polled_route_docs,
)
from service.errors import error_responses
from service.jobs import service
from service.jobs.events import progress_stream
from service.jobs.render import (
    MEDIA,
    job_out,
    job_summary,
    plot_png,
    result_body,
    scores_body,
    snapshot_json,
    trial_out,
)
from service.jobs.report import CSP, render_report
from service.jobs.schemas import (
    EventList,
    EventOut,
    JobCreate,
    JobList,
    JobOut,
    ReportLink,
    ScoreRequest,
    ScoresOut,
    ThresholdOut,
    TrialList,
)
from service.params import (
    JobId,
    Limit,
    Offset,
    TrialNumber,
    read_query,
    reject_unknown_query_params,
)
from service.webhooks import DeliveryList
from ssad_common.ensemble import MAX_K, MIN_K

router = APIRouter(prefix="/v1/jobs", tags=["jobs"],
                   dependencies=[Depends(reject_unknown_query_params)])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses=error_responses(400, 401, 403, 404, 409, 413, 422, 429, 503),
             summary="Queue a tuning job")
def create_job(session: SessionDep, settings: SettingsDep, tenant: TenantDep, body: JobCreate,
               response: Response, idempotency_key: IdempotencyKeyDep = None) -> JobOut:
    job, replayed = service.create_job(session, tenant, body, settings, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return job_out(job)


@router.get("", response_model=JobList, responses=error_responses(401, 422),
            summary="List your jobs, newest first (summaries: no spec unless ?include=spec)")
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    limit: Limit = 100,
    offset: Offset = 0,
    status_: Annotated[Literal["queued", "running", "succeeded", "failed", "cancelled"] | None,
                       Query(alias="status")] = None,
    kind: Annotated[Literal["tune", "score"] | None,
                    Query(description="only tuning jobs, or only scoring jobs")] = None,
    include: Annotated[Literal["spec"] | None,
                       Query(description="`spec`: each item carries its job's spec (the "
                                         "request it was created with), as GET "
                                         "/v1/jobs/{id} does")] = None,
) -> Response:
    rows, total = service.list_jobs(session, tenant, limit, offset, status_, kind)
    return json_body(JobList(items=[job_summary(j, include == "spec") for j in rows],
                             total=total))


def json_body(model: BaseModel) -> Response:
    """``model`` as JSON, serialised once by pydantic. Returned as a model, FastAPI would
    validate it again against the response model (in the thread pool) before serialising
    it: for the routes clients poll, that doubled the work (docs/benchmarks.md §8)."""
    return Response(model.model_dump_json(), media_type="application/json")


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(401, 404, 422),
            summary="A job's status, progress and best trial so far",
            openapi_extra=polled_route_docs())
async def get_job(request: Request, job_id: JobId) -> Response:
    # The route clients poll most: async, one read on the event loop (service/reads.py),
    # shared by the polls that arrive together, and rendered once for all of them; and, as
    # the score route, it reads its query and its caller itself instead of through
    # FastAPI's dependencies (docs/benchmarks.md §8).
    tenant = await polled_job_reader(request, job_id)
    job = await request.app.state.reads.job(job_id)
    return Response(snapshot_json(service.visible_job(job, tenant, job_id)),
                    media_type="application/json")


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               responses=error_responses(401, 404, 409, 422),
               summary="Delete an ended job and everything it stored (409 while it runs)")
def delete_job(session: SessionDep, settings: SettingsDep, tenant: TenantDep,
               job_id: JobId) -> Response:
    """Deletes the job, its trials, scores, events and artifacts (its detector, plots).
    Only once it has ended (succeeded, failed or cancelled): cancel a queued or running job
    first (`POST /v1/jobs/{id}/cancel`) and wait until it is `cancelled`. A tuning job whose
    scoring jobs are still queued or running is kept until they end. Once no job uses a
    dataset, the dataset can be deleted. The job's Optuna study (`job-<id>` in the Optuna
    storage) is kept; `optuna delete-study` removes it."""
    service.delete_job(session, tenant, job_id, settings)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{job_id}/cancel", response_model=JobOut,
             responses=error_responses(401, 404, 409, 422),
             summary="Cancel a job (idempotent; 409 once it has succeeded or failed)")
def cancel_job(session: SessionDep, tenant: TenantDep, job_id: JobId) -> JobOut:
    return job_out(service.cancel_job(session, tenant, job_id))


@router.get("/{job_id}/trials", response_model=TrialList,
            responses=error_responses(401, 404, 422),
            summary="Every stored trial: augmentation, parameters, losses, duration")
def list_trials(session: SessionDep, tenant: JobReaderDep, job_id: JobId) -> TrialList:
    return TrialList(job_id=job_id, trials=[
        trial_out(t) for t in service.list_trials(session, tenant, job_id)])


@router.get("/{job_id}/events", response_model=EventList,
            responses=error_responses(401, 404, 422),
            summary="The job's history: every status change, with its attempt")
def list_events(session: SessionDep, tenant: JobReaderDep, job_id: JobId) -> EventList:
    return EventList(job_id=job_id, events=[
        EventOut(at=e.at, status=e.status, attempt=e.attempt, message=e.message)
        for e in service.list_events(session, tenant, job_id)])


def scores_reply(job_id: str, number: int, body: bytes, fmt: str, request: Request,
                 ensemble: int | None = None, best: bool = True) -> Response:
    """A score body with its ETag (a 304 when the client has it) and, for CSV, a file name
    that says what it is."""
    etag = (f'"{job_id}-{number}-{fmt}"' if ensemble is None
            else f'"{job_id}-{number}-ensemble-{ensemble}-{fmt}"')
    headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
    if fmt == "csv":  # a browser or `curl -OJ` saves it under a name that says what it is
        name = (f"{job_id}-ensemble-{ensemble}-scores.csv" if ensemble is not None
                else f"{job_id}-scores.csv" if best
                else f"{job_id}-trial-{number}-scores.csv")
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=MEDIA[fmt], headers=headers)


_SCORES_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/csv": {"example": "index,name,score\n0,a.png,3.1\n"}},
          "description": "JSON (default) or CSV with ?format=csv"}}


class ScoresQuery(BaseModel):
    """The query of ``GET /v1/jobs/{id}/scores`` (besides the caller's ``token``)."""

    format: Literal["json", "csv"] = Field("json", description="`json` or `csv`")
    ensemble: int | None = Field(
        None, ge=MIN_K, le=MAX_K,
        description="instead of the best trial's scores: the mean of the z-scored scores of "
                    "the best `ensemble` full-length trials (listed in `ensemble_trials`; "
                    "all of them when the job has fewer). A "
                    "hedge for when the job's `selection.trust` is `uncertain` "
                    "(docs/benchmarks.md §7)")


@router.get("/{job_id}/scores", response_model=ScoresOut,
            responses={**_SCORES_DOC, **error_responses(401, 404, 409, 422)},
            summary="Anomaly score of every test image (the best trial), in test order",
            openapi_extra=polled_route_docs(ScoresQuery))
async def job_scores(request: Request, job_id: JobId) -> Response:
    # The route clients poll for the largest body: it reads its query and its caller
    # itself (the same checks, errors and docs) instead of through FastAPI's parameters
    # and dependencies (about 10 % more requests served under wrk; docs/benchmarks.md §8).
    tenant = await polled_job_reader(request, job_id)
    query = read_query(ScoresQuery, request)
    number, body = await result_body(request.app.state.reads,
                                     request.app.state.session_factory, tenant, job_id,
                                     query.format, query.ensemble)
    return scores_reply(job_id, number, body, query.format, request, query.ensemble)


@router.get("/{job_id}/trials/{number}/scores", response_model=ScoresOut,
            responses={**_SCORES_DOC, **error_responses(401, 404, 422)},
            summary="Anomaly scores of one finished trial, in test order")
def trial_scores(session: SessionDep, tenant: JobReaderDep, job_id: JobId, number: TrialNumber,
                 request: Request, format: Literal["json", "csv"] = "json") -> Response:
    service.result_state(session, tenant, job_id)  # ownership
    body = scores_body(session, tenant, job_id, number, format)
    return scores_reply(job_id, number, body, format, request, best=False)


@router.get("/{job_id}/threshold", response_model=ThresholdOut,
            responses=error_responses(401, 404, 409, 422),
            summary="A suggested threshold (no labels) and the images it flags")
def job_threshold(
    session: SessionDep, tenant: JobReaderDep, job_id: JobId,
    rule: Literal["mad", "contamination"] | None = None,
    reference: Annotated[Literal["tuning", "batch"] | None, Query(
        description="which scores set the threshold: `tuning` (default), the tuning job's "
                    "test set; `batch`, this job's own scores")] = None,
) -> ThresholdOut:
    """Two label-free rules: `mad` (suggested: median + 3.5 scaled MADs, set by the bulk of
    normal images) and `contamination` (the top fraction the job was told to expect).
    `flagged` lists this job's images above `rule`'s threshold (default: the suggested one).

    The threshold comes from the tuning job's best trial's scores on its test set (`reference=
    tuning`, the default). For a tuning job that is its own scores; a scoring job (`POST
    /v1/jobs/{id}/score`) is judged against the job it came from, so scoring a handful of
    images flags the ones that stand out from that reference. `reference=batch` recomputes
    both rules from this job's scores alone (meaningful only for a large batch)."""
    return ThresholdOut.model_validate(
        service.threshold(session, tenant, job_id, rule, reference or "tuning"))


@router.get("/{job_id}/stream", response_class=EventSourceResponse, responses={
    200: {"content": {"text/event-stream": {"example": (
        'event: progress\ndata: {"id": "3f1c…", "status": "running", '
        '"progress": {"n_trials": 12, "trials_completed": 5}, ...}\n\n')}},
        "description": "Server-sent events: `progress` (the job, as GET /v1/jobs/{id}) "
                       "whenever it changes, then `end` once it has ended"},
    **error_responses(401, 404, 422)},
    summary="Live progress as server-sent events (used by `ssad-tune tune`)")
async def stream_job(request: Request, tenant: StreamJobReaderDep,
                     job_id: JobId) -> EventSourceResponse:
    reads = request.app.state.reads

    async def read() -> JobOut:
        return job_out(service.visible_job(await reads.job(job_id), tenant, job_id))

    first = await read()  # 404 before the stream starts
    return progress_stream(read, first)


@router.post("/{job_id}/score", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses=error_responses(400, 401, 403, 404, 409, 413, 422, 429, 503),
             summary="Score new images with a finished job's best trial's detector")
def score_new_data(session: SessionDep, settings: SettingsDep, tenant: TenantDep,
                   job_id: JobId, body: ScoreRequest, response: Response,
                   idempotency_key: IdempotencyKeyDep = None) -> JobOut:
    """Queues a scoring job (`kind: "score"`): a worker loads the detector the tuning job
    chose (its weights and its scorer, fitted on the train set) and scores the dataset
    with it, exactly as it scored the job's test set. Follow it like any job; its scores are
    at `GET /v1/jobs/{new id}/scores`, and `GET /v1/jobs/{new id}/threshold` flags them
    against this job's threshold."""
    job, replayed = service.create_score_job(session, tenant, job_id, body.dataset_id,
                                             settings, idempotency_key, body.notify_url)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return job_out(job)


@router.get("/{job_id}/deliveries", response_model=DeliveryList,
            responses=error_responses(401, 404, 422),
            summary="The job's webhook notices (notify_url) and every attempt to send them")
def list_deliveries(session: SessionDep, tenant: JobReaderDep, job_id: JobId) -> DeliveryList:
    """One delivery per terminal state of a job created with `notify_url`, with its
    signed body and each attempt: the receiver's status code or the error, and when it is
    tried next while pending. Verify a notice with `ssad_tune.webhooks.verify` and the
    secret from `GET /v1/webhooks/secret`."""
    service.get_job(session, tenant, job_id)
    return webhooks.list_deliveries(session, job_id)


@router.get("/{job_id}/report", response_class=HTMLResponse, responses={
    200: {"content": {"text/html": {"example": "<!doctype html>… (open the URL in a browser)"}},
          "description": "a self-contained HTML page"}, **error_responses(401, 404, 422)},
    summary="The job's report page (HTML): choice, trials, plots, scores, live progress")
def job_report(session: SessionDep, settings: SettingsDep, tenant: JobReaderDep,
               job_id: JobId, request: Request, token: LinkToken = None) -> HTMLResponse:
    """One self-contained page (no CDN; plots inlined): the chosen family and
    hyperparameters with how decisive the choice was, the loss landscape (Optuna's history
    and slice plots, importances), the score histogram with both thresholds, the most
    anomalous images with names and scores, the augmentation sample, the trials with their
    timings and workers, and links to the CSV and JSON downloads. While the job runs the
    page follows its progress live.

    **In a browser with API keys on** (a browser cannot send the key): `POST
    /v1/jobs/{id}/report-link` with the key, then open the `url` it returns; it carries a
    token that lets the page (and its live view and downloads) read this job until
    `expires_at`. `ssad-tune report JOB_ID` prints such a link."""
    if token is None and settings.auth != "off":  # opened with the key: links need a token
        token, _ = links.make_token(session, settings, job_id, tenant)
    page = render_report(session, tenant, job_id, token)
    return HTMLResponse(page, headers={"Content-Security-Policy": CSP,
                                       "Cache-Control": "private, no-store",
                                       "Referrer-Policy": "no-referrer",
                                       "X-Content-Type-Options": "nosniff"})


@router.post("/{job_id}/report-link", response_model=ReportLink,
             responses=error_responses(401, 404, 422),
             summary="A signed, expiring link to the report page, for a browser")
def report_link(session: SessionDep, settings: SettingsDep, tenant: TenantDep, job_id: JobId,
                request: Request) -> ReportLink:
    """The report's URL with a token that lets whoever holds it read this one job (its
    report, live progress, trials, scores, plots and downloads) without an API key, until
    `expires_at` (SSAD_LINK_TTL_SECONDS, a day by default). Share it as you would a
    presigned download link."""
    service.get_job(session, tenant, job_id)
    token, expires = links.make_token(session, settings, job_id, tenant)
    path = f"/v1/jobs/{job_id}/report?token={token}"
    return ReportLink(url=str(request.base_url).rstrip("/") + path, path=path,
                      expires_at=datetime.fromtimestamp(expires, UTC))


_PNG: dict[int | str, dict[str, Any]] = {200: {
    "content": {"image/png": {"example": "(PNG bytes: open the URL in a browser)"}},
    "description": "a PNG image"}}


@router.get("/{job_id}/plots/{name}.png", response_class=Response,
            responses={**_PNG, **error_responses(401, 404, 409, 422)},
            summary="Plots: trials, history, slice, importances, scores, top, augmentation")
def job_plot(session: SessionDep, tenant: JobReaderDep, job_id: JobId,
             name: Literal["trials", "history", "slice", "importances", "scores", "top",
                           "augmentation"],
             k: Annotated[int, Query(ge=1, le=64, description="images in `top`")] = 16,
             ) -> Response:
    """* `trials`: validation loss of every finished trial against its patch size (local
      families) or strength, coloured by family; the best trial starred. Any time.
    * `history`, `slice`, `importances`: Optuna's own plots of the study (each trial's
      loss and the lowest so far; loss against patch size, one panel per local family;
      hyperparameter importances, for a job that searched one family). Once a trial has
      finished (409 before).
    * `scores`: histogram of the test scores with both label-free thresholds.
    * `top`: the `k` most anomalous test images with their names and scores.
    * `augmentation`: train images and what the best trial's augmentation makes of them.

    `scores` and `top` need a succeeded job (409 before); `augmentation` is rendered by the
    worker when a tuning job succeeds."""
    png = plot_png(session, tenant, job_id, name, k)
    return Response(png, media_type="image/png",
                    headers={"Cache-Control": "private, max-age=60"})
