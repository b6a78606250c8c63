"""Job rules: validate a request, enqueue it with its first event, read results, cancel,
delete."""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from service import idempotency, tenants
from service.backbones import get_backbone
from service.datasets import repository as dataset_repo
from service.errors import Conflict, IncompatibleDatasets, InvalidRequest, NotFound
from service.jobs import limits
from service.jobs import repository as repo
from service.jobs.schemas import JobCreate
from service.jobs.threshold import SUGGESTED_RULE, Threshold, apply_thresholds, thresholds
from service.settings import ApiSettings
from service.webhooks import check_target
from ssad_common import blobs
from ssad_common.detectors import DEFAULT_DETECTOR, compute_factor, working_size
from ssad_common.ensemble import zscore_mean
from ssad_common.jobspec import ScoreSpec, TuneSpec, load_spec, spec_dump
from ssad_common.lifecycle import TERMINAL, JobStatus, TrialState
from ssad_common.models import MODEL_ARTIFACT, Dataset, Job, JobEvent, JobTrial
from ssad_common.search_space import SearchSpace
from ssad_common.strategy import plan_for, selectable


def _dataset(session: Session, tenant_id: str, dataset_id: str, role: str) -> Dataset:
    d = dataset_repo.get_dataset(session, tenant_id, dataset_id)
    if d is None:
        raise NotFound(f"{role} dataset {dataset_id} not found" if role
                       else f"dataset {dataset_id} not found")
    return d


def working_images(train: Dataset, test: Dataset, detector: str = DEFAULT_DETECTOR,
                   requested: int | None = None) -> tuple[dict[str, Any], str]:
    """The one size rule for a job, as the engine applies it: train and test images are all
    resized to working size x working size (the one asked for, else the detector's default
    for the train images' size). The sizes, for the job's spec, and a note for its first
    event when anything is resized ("" otherwise). InvalidRequest: a size out of range."""
    try:
        size = working_size(detector, requested, train.height, train.width)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    images = {"train": [train.height, train.width], "test": [test.height, test.width],
              "working_size": size}
    resized = [f"{role} {d.height}x{d.width}" for role, d in (("train", train), ("test", test))
               if (d.height, d.width) != (size, size)]
    note = f"images resized to the working size {size}x{size} ({', '.join(resized)})"
    return images, note if resized else ""


def create_job(session: Session, tenant_id: str, request: JobCreate, settings: ApiSettings,
               idempotency_key: str | None = None) -> tuple[Job, bool]:
    """Validate and enqueue: the job row and its first event in the caller's transaction.
    Returns the job and whether it is a replay of an earlier request with the same
    ``idempotency_key``."""
    fp = ""
    if idempotency_key is not None:
        fp = idempotency.json_fingerprint(request.model_dump(mode="json"))
        earlier = idempotency.replay(session, tenant_id, "jobs", idempotency_key, fp,
                                     settings.idempotency_ttl_hours,
                                     lambda i: repo.get_job(session, tenant_id, i))
        if earlier is not None:
            return earlier, True
    if request.train_steps > settings.max_train_steps:
        raise InvalidRequest(f"train_steps must be at most {settings.max_train_steps}")
    train = _dataset(session, tenant_id, request.train_dataset_id, "train")
    test = _dataset(session, tenant_id, request.test_dataset_id, "test")
    if train.channels != test.channels:
        raise IncompatibleDatasets(
            f"train dataset has {train.channels} channel(s) and test dataset has "
            f"{test.channels}: both must be grey or both RGB")
    if train.n_samples < 2:
        raise IncompatibleDatasets("the train dataset needs at least 2 images")
    try:
        space = SearchSpace.from_dict(
            None if request.search_space is None
            else request.search_space.model_dump(exclude_none=True))
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(str(exc)) from None
    images, resized = working_images(train, test, request.detector, request.image_size)
    cost = limits.check_request(
        n_trials=request.n_trials, train_steps=request.train_steps,
        batch_size=request.batch_size, contamination=request.contamination,
        n_train=train.n_samples, settings=settings,
        factor=compute_factor(request.detector, images["working_size"]))
    quotas = tenants.lock_tenant(session, tenant_id, settings)
    tenants.check_job(session, tenant_id, quotas, request.n_trials)
    limits.check_compute(cost, n_trials=request.n_trials, train_steps=request.train_steps,
                         quota=quotas.max_compute_per_job, detector=request.detector)
    if request.notify_url is not None:
        check_target(request.notify_url, allow_private=settings.webhook_allow_private)
    parallelism = request.parallelism or settings.default_parallelism
    if parallelism > settings.max_parallelism:
        raise InvalidRequest(f"parallelism must be at most {settings.max_parallelism} on "
                             "this server (SSAD_MAX_PARALLELISM)")
    backbone = (None if request.backbone_id is None
                else get_backbone(session, tenant_id, request.backbone_id))
    spec = TuneSpec(**request.model_dump(exclude={"search_space", "parallelism",
                                                          "notify_url"}),
                    search_space=space.to_dict(), images=images, parallelism=parallelism,
                    backbone_sha256=None if backbone is None else backbone.sha256)
    notes = []
    if cost.batch_size != request.batch_size:
        spec.batch_size, spec.requested_batch_size = cost.batch_size, request.batch_size
        notes.append(f"batch_size {request.batch_size} clamped to {cost.batch_size}, "
                     "the train set's size")
    if resized:
        notes.append(resized)
    message = "; ".join(["queued", *notes])
    job = Job(id=str(uuid.uuid4()), tenant_id=tenant_id, status=JobStatus.queued,
              train_dataset_id=train.id, test_dataset_id=test.id, kind=spec.kind,
              spec=spec_dump(spec), parallelism=parallelism,
              trials_planned=plan_for(spec.strategy, spec.n_trials, spec.train_steps,
                                      space).total_trials,
              n_trials=request.n_trials, trials_completed=0, attempt=0,
              cancel_requested=False, notify_url=request.notify_url,
              backbone_id=request.backbone_id)
    repo.insert_job(session, job, message)
    if idempotency_key is not None:
        idempotency.remember(session, tenant_id, "jobs", idempotency_key, fp, job.id)
    return job, False


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    return visible_job(repo.get_job(session, tenant_id, job_id), tenant_id, job_id)


def visible_job(job: Job | None, tenant_id: str, job_id: str) -> Job:
    """``job`` if it is the tenant's; else a 404, exactly as for a missing one."""
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"job {job_id} not found")
    return job


def list_jobs(session: Session, tenant_id: str, limit: int, offset: int, status: str | None,
              kind: str | None = None) -> tuple[Sequence[Job], int]:
    return repo.list_jobs(session, tenant_id, limit, offset, status, kind)


def delete_job(session: Session, tenant_id: str, job_id: str, settings: ApiSettings) -> None:
    """Delete an ended job with everything it stored (trials, scores, events, artifacts:
    the foreign keys cascade). A queued or running job is a 409 (cancel it first, and wait
    for ``cancelled``: a worker may still be writing); so is a tuning job whose scoring jobs
    are still queued or running (they load its detector). The Optuna study stays."""
    job = get_job(session, tenant_id, job_id)
    if job.status not in TERMINAL:
        hint = (" (cancel requested: wait until it is cancelled)" if job.cancel_requested
                else ": cancel it first (POST /v1/jobs/{id}/cancel)")
        raise Conflict(f"job {job_id} is {job.status}; only an ended job can be deleted{hint}")
    # Serialised with create_score_job (same lock): no scoring job can be queued on this
    # job's detector between the check below and the delete.
    tenants.lock_tenant(session, tenant_id, settings)
    active = repo.active_score_jobs(session, tenant_id, job_id)
    if active:
        raise Conflict(f"job {job_id}'s detector is in use by scoring job(s) "
                       f"{', '.join(active)}, still queued or running: cancel them or wait")
    if not repo.delete_ended_job(session, job_id):
        # Only an ended job is deleted, and an ended job never changes status: the row is
        # gone, deleted by a concurrent request. Deleting is idempotent in effect.
        raise NotFound(f"job {job_id} not found")


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """Idempotent: a queued job is cancelled now; a running one at its worker's next check
    (between trials, or within a trial at the next heartbeat); a cancelled one stays so."""
    job = get_job(session, tenant_id, job_id)
    if job.status == JobStatus.cancelled:
        return job
    if job.status in (JobStatus.succeeded, JobStatus.failed):
        raise Conflict(f"job {job_id} has already {job.status}; there is nothing to cancel")
    if not repo.cancel_if_queued(session, job_id):
        repo.request_cancel_if_running(session, job_id)
    session.refresh(job)
    if job.status in TERMINAL and job.status != JobStatus.cancelled:
        raise Conflict(f"job {job_id} has already {job.status}; there is nothing to cancel")
    return job


def list_trials(session: Session, tenant_id: str, job_id: str) -> Sequence[JobTrial]:
    get_job(session, tenant_id, job_id)
    return repo.list_trials(session, job_id)


def result_state(session: Session, tenant_id: str, job_id: str
                 ) -> tuple[JobStatus, int | None]:
    """The tenant's job's status and best trial, read cheaply (404 if it has none such)."""
    return visible_state(repo.result_state(session, job_id), tenant_id, job_id)


def visible_state(state: repo.ResultState | None, tenant_id: str, job_id: str
                  ) -> tuple[JobStatus, int | None]:
    """``state``'s status and best trial if the job is the tenant's; else a 404, exactly
    as for a missing one."""
    if state is None or state.tenant_id != tenant_id:
        raise NotFound(f"job {job_id} not found")
    return state.status, state.best_trial_number


def best_trial(session: Session, tenant_id: str, job_id: str) -> int:
    """The trial whose scores are the job's result (only once the job has succeeded)."""
    return result_trial(job_id, *result_state(session, tenant_id, job_id))


def result_trial(job_id: str, status: JobStatus, number: int | None) -> int:
    """The best trial of a job in ``status``; a 409 until it has succeeded."""
    if number is None or status != JobStatus.succeeded:
        if status in (JobStatus.queued, JobStatus.running):
            raise Conflict(f"job {job_id} is {status}; its scores are available once it "
                           "has succeeded (per-trial scores: /trials/{number}/scores)")
        raise Conflict(f"job {job_id} is {status} and has no result; the scores of each "
                       f"trial that finished, if any, are at /v1/jobs/{job_id}/trials/"
                       f"{{number}}/scores (GET /v1/jobs/{job_id}/trials lists them)")
    return number


def scores(session: Session, tenant_id: str, job_id: str, trial_number: int
           ) -> tuple[int, list[tuple[int, str, float]]]:
    """(trial number, [(index, name, score)]) of a finished trial, in test-set order."""
    job = get_job(session, tenant_id, job_id)
    trial = repo.get_trial(session, job_id, trial_number)
    if trial is None or trial.state != TrialState.COMPLETE:
        raise NotFound(f"job {job_id} has no finished trial {trial_number}")
    test = dataset_repo.get_dataset(session, tenant_id, job.test_dataset_id)
    names = test.names if test is not None else []
    rows = repo.trial_scores(session, job_id, trial_number)
    return trial_number, [(i, names[i] if i < len(names) else str(i), s) for i, s in rows]


def ensemble_scores(session: Session, tenant_id: str, job_id: str, k: int
                    ) -> tuple[int, list[int], list[tuple[int, str, float]]]:
    """(best trial, the trials ensembled, [(index, name, score)]): the mean of the z-scored
    scores of the succeeded job's ``k`` best selectable trials (full-length ones; the
    screen's only if none completed), best first: the top trials its ``selection`` was
    computed on, as the worker stored them, then the others by the selection rule (the
    same order, but for jobs that finished under an earlier rule)."""
    number = best_trial(session, tenant_id, job_id)  # ownership; 409 unless succeeded
    job = get_job(session, tenant_id, job_id)
    order = selectable(t for t in repo.list_trials(session, job_id)
                       if t.state == TrialState.COMPLETE)
    stored = (job.selection or {}).get("top_trials") or [number]
    first = [t for n in stored for t in order if t.number == n]
    top = [*first, *(t for t in order if t not in first)][:k]
    mean = zscore_mean([np.array([s for _, s in repo.trial_scores(session, job_id, t.number)])
                        for t in top])
    test = dataset_repo.get_dataset(session, tenant_id, job.test_dataset_id)
    names = test.names if test is not None else []
    rows = [(i, names[i] if i < len(names) else str(i), float(v)) for i, v in enumerate(mean)]
    return number, [t.number for t in top], rows


def list_events(session: Session, tenant_id: str, job_id: str) -> Sequence[JobEvent]:
    get_job(session, tenant_id, job_id)
    return repo.list_events(session, job_id)


def _contamination(job: Job) -> float:
    return load_spec(job.kind, job.spec).contamination


def _best_rows(session: Session, tenant_id: str, job_id: str
                 ) -> tuple[Job, int, list[tuple[int, str, float]]]:
    """The succeeded job, its best trial and that trial's (index, name, score) rows."""
    number = best_trial(session, tenant_id, job_id)
    job = get_job(session, tenant_id, job_id)
    _, rows = scores(session, tenant_id, job_id, number)
    return job, number, rows


def _values(rows: list[tuple[int, str, float]]) -> np.ndarray:
    return np.array([s for _, _, s in rows], dtype=np.float64)


def reference_thresholds(session: Session, tenant_id: str, source_id: str
                         ) -> dict[str, Any]:
    """Both thresholds of a succeeded tuning job, on its best trial's scores (its test set): the
    normal reference new images are judged against. Plain data, kept in a scoring job's
    spec when it is created (the tuning job's scores never change once it has succeeded,
    and the scoring job stays interpretable if the tuning job is deleted later)."""
    source, number, rows = _best_rows(session, tenant_id, source_id)
    found = thresholds(_values(rows), _contamination(source))
    return {"job_id": source_id, "trial_number": number, "n_scores": len(rows),
            "rules": {name: {"threshold": t.threshold,
                             "description": f"{t.description}, on job {source_id}'s test set"}
                      for name, t in found.items()}}


def _thresholds_for(session: Session, tenant_id: str, job: Job, values: np.ndarray,
                    reference: str) -> tuple[dict[str, Threshold], str]:
    """The thresholds that judge ``job``'s scores ``values``, and the job they came from."""
    if reference == "batch" or job.kind != "score":
        # A tuning job's own test set is its reference: "tuning" and "batch" coincide.
        return thresholds(values, _contamination(job)), job.id
    spec = load_spec(job.kind, job.spec)
    assert isinstance(spec, ScoreSpec)
    ref = spec.threshold_reference
    if ref is None:  # a scoring job queued before references were kept: read it now
        source_id = spec.source_job_id
        if repo.get_job(session, tenant_id, source_id) is None:
            raise Conflict(f"job {job.id} was scored with job {source_id}, which has been "
                           "deleted, so its threshold is gone: ask for ?reference=batch")
        ref = reference_thresholds(session, tenant_id, source_id)
    rules = {name: (float(r["threshold"]), str(r["description"]))
             for name, r in ref["rules"].items()}
    return apply_thresholds(values, rules), str(ref["job_id"])


def _best_scores(session: Session, tenant_id: str, job_id: str, reference: str = "tuning"
                   ) -> tuple[Job, int, list[tuple[int, str, float]], dict[str, Threshold],
                              str]:
    """The succeeded job, its best trial, that trial's (index, name, score) rows, both
    label-free thresholds that judge them (see :func:`threshold`), and the job that set
    them."""
    job, number, rows = _best_rows(session, tenant_id, job_id)
    found, reference_job = _thresholds_for(session, tenant_id, job, _values(rows), reference)
    return job, number, rows, found, reference_job


def threshold(session: Session, tenant_id: str, job_id: str, rule: str | None,
              reference: str = "tuning") -> dict[str, Any]:
    """Both label-free thresholds and the job's images above ``rule``'s (default: the
    suggested rule). ``reference="tuning"``: the thresholds come from the tuning job's
    best trial's scores (for a scoring job, the job it scored with; a handful of new images is
    judged against that job's test set); ``"batch"``: from this job's scores alone."""
    _, number, rows, found, reference_job = _best_scores(session, tenant_id, job_id,
                                                           reference)
    rule = rule or SUGGESTED_RULE
    chosen = found[rule]
    flagged = sorted((r for r in rows if r[2] > chosen.threshold), key=lambda r: -r[2])
    return {"job_id": job_id, "trial_number": number, "reference": reference,
            "reference_job_id": reference_job, "suggested_rule": SUGGESTED_RULE,
            "rule": rule, "rules": [vars(t) for t in found.values()],
            "flagged": [{"index": i, "name": n, "score": v} for i, n, v in flagged]}


def create_score_job(session: Session, tenant_id: str, source_id: str, dataset_id: str,
                     settings: ApiSettings, idempotency_key: str | None = None,
                     notify_url: str | None = None) -> tuple[Job, bool]:
    """Queue scoring ``dataset_id`` with the detector job ``source_id`` chose."""
    fp = ""
    if idempotency_key is not None:
        fp = idempotency.json_fingerprint({"source": source_id, "dataset_id": dataset_id,
                                           **({"notify_url": notify_url} if notify_url
                                              else {})})
        earlier = idempotency.replay(session, tenant_id, "score", idempotency_key, fp,
                                     settings.idempotency_ttl_hours,
                                     lambda i: repo.get_job(session, tenant_id, i))
        if earlier is not None:
            return earlier, True
    # The tenant's lock before reading the source: a concurrent DELETE of it (which takes
    # the lock too) has then either happened (404 below) or waits and sees this job.
    quotas = tenants.lock_tenant(session, tenant_id, settings)
    source = get_job(session, tenant_id, source_id)
    if source.kind == "score":
        raise InvalidRequest(f"job {source_id} is itself a scoring job; score with the "
                             "tuning job it came from")
    if source.status != JobStatus.succeeded:
        raise Conflict(f"job {source_id} is {source.status}; new data can be scored once it "
                       "has succeeded")
    if not repo.has_artifact(session, source_id, MODEL_ARTIFACT):
        raise Conflict(f"job {source_id} has no stored detector (it finished before "
                       "detectors were kept, or across the release that changed which "
                       "trial is best); run it again to score new data")
    dataset = _dataset(session, tenant_id, dataset_id, "")
    train = _dataset(session, tenant_id, source.train_dataset_id, "train")
    if dataset.channels != train.channels:
        raise IncompatibleDatasets(
            f"the detector was trained on {train.channels}-channel images and dataset "
            f"{dataset_id} has {dataset.channels}: both must be grey or both RGB")
    tenants.check_job(session, tenant_id, quotas, 1)
    if notify_url is not None:
        check_target(notify_url, allow_private=settings.webhook_allow_private)
    spec = ScoreSpec(source_job_id=source_id, dataset_id=dataset.id,
                     contamination=_contamination(source),
                     threshold_reference=reference_thresholds(session, tenant_id, source_id))
    job = Job(id=str(uuid.uuid4()), tenant_id=tenant_id, status=JobStatus.queued,
              train_dataset_id=source.train_dataset_id, test_dataset_id=dataset.id,
              kind=spec.kind, spec=spec_dump(spec), n_trials=spec.n_trials,
              trials_planned=spec.n_trials, parallelism=1,
              trials_completed=0, attempt=0, cancel_requested=False,
              notify_url=notify_url)
    repo.insert_job(session, job, f"queued: score with job {source_id}'s detector"
                    + _score_resize_note(source, dataset))
    if idempotency_key is not None:
        idempotency.remember(session, tenant_id, "score", idempotency_key, fp, job.id)
    return job, False


def _score_resize_note(source: Job, dataset: Dataset) -> str:
    """For a scoring job's first event, as a tuning job's says it: the dataset's images
    resized to the working size of the source job's detector ("" when none are)."""
    size = ((source.spec or {}).get("images") or {}).get("working_size")
    if not size or (dataset.height, dataset.width) == (size, size):
        return ""
    return (f"; images resized to the detector's working size {size}x{size} "
            f"(dataset {dataset.height}x{dataset.width})")


def _images(session: Session, tenant_id: str, dataset_id: str) -> np.ndarray:
    dataset = _dataset(session, tenant_id, dataset_id, "test")
    data = blobs.read_blob(session, dataset.sha256)
    if data is None:
        raise NotFound(f"dataset {dataset_id} has no stored images")
    return np.asarray(np.load(io.BytesIO(data), allow_pickle=False))


def plot(session: Session, tenant_id: str, job_id: str, name: str, k: int) -> bytes:
    """One of the job's plots, as PNG bytes (see service/jobs/plots.py)."""
    # matplotlib and Optuna load with the first plot asked for, not at every API start.
    from service.jobs import plots

    job = get_job(session, tenant_id, job_id)
    if name in plots.STUDY_PLOTS or name == "trials":
        completed = [t for t in repo.list_trials(session, job_id)
                     if t.state == TrialState.COMPLETE and t.validation_loss is not None]
        if name == "history":  # the trials the result is chosen among: full-length only
            completed = sorted(selectable(completed), key=lambda t: t.number)
        points = [(t.number, t.augmentation or "", t.params, t.validation_loss)
                  for t in completed if t.validation_loss is not None]
        if name == "trials":
            return plots.trials_png(points, job.best_trial_number)
        if not points:
            raise Conflict(f"job {job_id} has no finished trial yet to draw its {name}")
        if name == "importances" and len(plots.importance_params(points)) < 2:
            raise Conflict(
                "importances need at least two parameters that every trial has; with several "
                "augmentation families only the family is common to all trials (use a job "
                "that searches one family, or the `slice` plot)")
        return plots.STUDY_PLOTS[name](points)
    if name == "augmentation":
        art = repo.get_artifact(session, job_id, "augmentation.png")
        if art is None:
            raise NotFound(f"job {job_id} has no augmentation sample (it is rendered when "
                           "a tuning job succeeds)")
        return art.data
    _, _, rows, found, _ = _best_scores(session, tenant_id, job_id)
    if name == "scores":
        return plots.scores_png(_values(rows), found, SUGGESTED_RULE)
    top = sorted(rows, key=lambda r: -r[2])[:k]
    return plots.top_png(_images(session, tenant_id, job.test_dataset_id), top)
