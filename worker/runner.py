"""Run one claimed job: load its arrays, run (or resume) its Optuna study with results
written as trials finish, and end it. The per-job wrapper commits nothing itself: each
write is one :class:`~worker.manager.JobManager` transaction, fenced by the attempt."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ssad_common.db import is_transient
from ssad_common.detectors import working_size
from ssad_common.jobspec import ScoreSpec, TuneSpec, load_spec
from ssad_common.logs import current_job, job_context
from ssad_common.models import MODEL_ARTIFACT, JobTrial
from ssad_common.search_space import SearchSpace
from worker.cache import ArrayCache
from worker.context import WorkerContext
from worker.core.data import prepare
from worker.core.export import ScoringModel
from worker.core.plots import augmentation_sample
from worker.core.selection import TOP_K, Candidate, decisiveness
from worker.core.study import StudySettings, run_study_slot
from worker.core.training import TrainSettings, TrialInterrupted, build_detector
from worker.core.trial import TrialResult
from worker.manager import ClaimedJob, JobManager, LostLease
from worker.storage import StorageUnavailable

log = logging.getLogger("ssad.worker")

#: Free hand-backs (SIGTERM, database outages) a job may have before an outage fails it.
MAX_OUTAGE_RELEASES = 20


def study_settings(spec: TuneSpec, sampler_offset: int = 0,
                   backbone: str | None = None) -> StudySettings:
    """The engine's settings for a tuning job's validated spec (``sampler_offset``: see
    StudySettings; a slot of a job with parallel trials passes its attempt; ``backbone``:
    the local file of the spec's uploaded encoder weights)."""
    return StudySettings(
        n_trials=spec.n_trials, objective=spec.objective, contamination=spec.contamination,
        seed=spec.seed, search_space=SearchSpace.from_dict(spec.search_space),
        strategy=spec.strategy, sampler_offset=sampler_offset,
        train=TrainSettings(steps=spec.train_steps, batch_size=spec.batch_size,
                            scorer=spec.scorer, arch=spec.detector, backbone=backbone))


#: How often the running trial's progress (step, loss) is written, at most.
PROGRESS_SECONDS = 1.0


class HeartbeatThread(threading.Thread):
    """Renews the lease every ``interval`` seconds and notices cancellation or a lost lease;
    the study checks :meth:`should_stop` at every training step. The running trial's
    progress (:meth:`report_progress`) rides on the heartbeat: when it changed, the
    heartbeat is sent early, at most every ``progress_seconds``."""

    def __init__(self, manager: JobManager, job: ClaimedJob, interval: float,
                 stop: threading.Event, progress_seconds: float = PROGRESS_SECONDS) -> None:
        super().__init__(name=f"heartbeat-{job.id}", daemon=True)
        self.manager, self.job, self.interval = manager, job, interval
        self.tick = min(interval, progress_seconds)
        self.worker_stop = stop
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self.done = threading.Event()
        self._progress: dict[str, Any] | None = None  # replaced whole, never mutated

    def report_progress(self, number: int, step: int, steps: int, loss: float) -> None:
        """Called by the training loop (another thread): keep only the latest."""
        self._progress = {"number": number, "step": step, "steps": steps,
                          "loss": loss if math.isfinite(loss) else None}

    def run(self) -> None:
        current_job.set(self.job.id)  # this thread's log lines name the job too
        sent: dict[str, Any] | None = None
        last_beat = time.monotonic()
        while not self.done.wait(self.tick):
            progress = self._progress
            if progress is sent and time.monotonic() - last_beat < self.interval:
                continue
            try:
                beat = self.manager.heartbeat(self.job.id, self.job.attempt,
                                              None if progress is sent else progress)
                sent, last_beat = progress, time.monotonic()
                if beat.cancel_requested:
                    self.cancelled.set()
            except LostLease:
                self.lost.set()
                return
            except Exception as exc:  # database blip: keep trying until the lease runs out
                log.warning("job %s: heartbeat failed: %s", self.job.id, exc)

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set() or self.worker_stop.is_set()


def store_augmentation_sample(manager: JobManager, job: ClaimedJob, train: torch.Tensor,
                              family: str | None, params: dict[str, Any], seed: int) -> None:
    """The best trial's augmentation on a few train images, as the job's ``augmentation.png``.
    A plot is not worth failing a finished study over: errors are logged."""
    if family is None:
        return
    try:
        png = augmentation_sample(train, family, params, seed=seed)
    except Exception:
        log.exception("job %s: could not render the augmentation sample", job.id)
        return
    manager.store_artifact(job.id, job.attempt, "augmentation.png", "image/png", png,
                           {"augmentation": family, "params": params})


def run_score_job(job: ClaimedJob, spec: ScoreSpec, manager: JobManager, cache: ArrayCache,
                   device: torch.device) -> str:
    """A scoring job: the source job's stored detector scores the job's dataset; the scores
    are stored as the job's only trial (number 0), so they read like any job's. Returns
    what the closing event says: the detector's trial in its own job."""
    source = spec.source_job_id
    stored = manager.load_artifact(source, MODEL_ARTIFACT)
    if stored is None:
        raise LookupError(f"job {source} has no stored detector")
    data, meta = stored
    model = ScoringModel.from_bytes(data)
    t = time.perf_counter()
    scores = model.score(cache.load(job.test, manager), device)
    manager.record_trial(job.id, job.attempt, 0, augmentation=str(meta["augmentation"]),
                         params=dict(meta["params"]),
                         validation_loss=float(meta["validation_loss"]), losses={},
                         timings={"total_s": time.perf_counter() - t},
                         scores=scores.tolist())
    done = (f"scored {len(scores)} images with job {source}'s detector (its trial "
            f"{meta['trial_number']}: {meta['augmentation']}, loss "
            f"{float(meta['validation_loss']):.4g})")
    log.info("job %s: %s", job.id, done)
    return done


def selection_summary(stored: Sequence[tuple[JobTrial, float, list[float] | None]],
                      spec: TuneSpec) -> dict[str, Any]:
    """How decisive the choice was, from the stored trials (all attempts' trials count):
    ``stored`` as JobManager.selectable_trials gives them, the first TOP_K with scores."""
    candidates = [Candidate(t.number, t.augmentation, score,
                            None if scores is None else np.asarray(scores, dtype=np.float64))
                  for t, score, scores in stored]
    return decisiveness(candidates, spec.contamination)


def backbone_file(spec: TuneSpec, cache: ArrayCache, manager: JobManager, channels: int,
                  size: int) -> str | None:
    """The local file of the job's uploaded backbone, checked once against the job's
    encoder (``weights_only=True``): a file that does not fit fails the job before any
    trial, with the reason."""
    if spec.backbone_sha256 is None:
        return None
    path = str(cache.file(spec.backbone_sha256, ".pt", manager))
    try:
        build_detector(channels, size, TrainSettings(arch=spec.detector, backbone=path),
                       torch.device("cpu"))
    except ValueError as exc:
        raise ValueError(f"backbone {spec.backbone_id}: {exc}".replace(path, "the file")
                         ) from None
    return path


def run_job(job: ClaimedJob, ctx: WorkerContext[JobManager]) -> str:
    """Run ``job`` to an end state; returns what happened (for logs and tests). Every log
    line written meanwhile carries the job's id."""
    with job_context(job.id):
        return _run_job(job, ctx)


def _run_job(job: ClaimedJob, ctx: WorkerContext[JobManager]) -> str:
    manager, cache, device = ctx.manager, ctx.cache, ctx.device
    hb = HeartbeatThread(manager, job, ctx.heartbeat_seconds, ctx.stop)
    hb.start()
    try:
        if manager.is_cancel_requested(job.id):
            manager.mark_cancelled(job.id, job.attempt)
            return "cancelled"
        spec = load_spec(job.kind, job.spec)  # InvalidJobSpec fails the job, naming fields
        if isinstance(spec, ScoreSpec):
            manager.finish(job.id, job.attempt,
                           message=run_score_job(job, spec, manager, cache, device))
            return "succeeded"
        train = cache.load(job.train, manager)
        size = working_size(spec.detector, spec.image_size, job.train.height, job.train.width)
        data = prepare(train, cache.load(job.test, manager), device, size)
        settings = study_settings(spec, 0 if job.parallelism == 1 else job.attempt,
                                  backbone_file(spec, cache, manager, job.train.channels, size))

        def record(number: int, r: TrialResult) -> None:
            manager.record_trial(job.id, job.attempt, number, augmentation=r.augmentation,
                                 params=r.params, validation_loss=r.validation_loss,
                                 losses=r.losses, timings=r.timings, scores=r.scores.tolist(),
                                 model=None if r.model is None else r.model.to_bytes(),
                                 stage=r.stage, train_steps=r.train_steps)
            log.info("job %s: trial %d%s %s loss=%.4f (%.1fs)", job.id, number,
                     f" ({r.stage})" if r.stage else "", r.augmentation, r.validation_loss,
                     r.timings["total_s"])

        def record_failure(number: int, family: str, params: dict[str, Any], reason: str,
                           stage: str | None, train_steps: int) -> None:
            manager.record_failed_trial(job.id, job.attempt, number, augmentation=family,
                                        params=params, reason=reason, stage=stage,
                                        train_steps=train_steps)
            log.warning("job %s: trial %d %s failed: %s", job.id, number, family, reason)

        storage = ctx.open_storage()
        result = run_study_slot(
            data, settings,
            storage=storage, study_name=f"job-{job.id}", on_trial=record,
            should_stop=hb.should_stop,
            recover=lambda number: manager.stored_trial_loss(job.id, number),
            on_fail=record_failure, on_progress=hb.report_progress,
            gate=lambda: manager.trial_gate(job.id, job.attempt))
        if result is None:  # the job's last trials run on other slots, which finish it
            manager.leave(job.id, job.attempt)
            return "left"
        # The database's trials, read once: its best is the one finish() chooses (under
        # the rank sum it depends on every stored trial, and Optuna's list can differ from
        # the database's by a trial whose commit landed but whose acknowledgement was lost),
        # and the selection summary reads the same rows.
        stored = manager.selectable_trials(job.id, TOP_K)
        best = stored[0][0] if stored else result.best
        store_augmentation_sample(manager, job, data.train, best.augmentation,
                                  dict(best.params), spec.seed)
        try:
            selection = selection_summary(stored, spec)
        except Exception:  # a summary is not worth failing a finished study over
            log.exception("job %s: could not summarise how decisive the choice was", job.id)
            selection = None
        manager.finish(job.id, job.attempt, selection)
        return "succeeded"
    except LostLease:
        log.warning("job %s: lease lost; dropping attempt %d", job.id, job.attempt)
        return "lost"
    except TrialInterrupted:
        try:
            # A cancel first: another slot of the job may have ended it already (so this
            # slot's lease reads as lost), which mark_cancelled accepts.
            if hb.cancelled.is_set() or manager.is_cancel_requested(job.id):
                manager.mark_cancelled(job.id, job.attempt)
                return "cancelled"
            if hb.lost.is_set():
                raise LostLease(job.id)
            manager.release(job.id, job.attempt, "requeued: its worker is stopping")
            return "released"
        except LostLease:
            log.warning("job %s: lease lost; dropping attempt %d", job.id, job.attempt)
            return "lost"
    except Exception as exc:
        outage = is_transient(exc) or isinstance(exc, StorageUnavailable)
        if outage and job.releases < MAX_OUTAGE_RELEASES:
            # The database went away under Optuna, a write outlived its retries, or Optuna's
            # storage could not be opened: give the job back (its stored trials are kept;
            # a release does not use up an attempt) rather than fail it for an outage. The
            # cap stops a deterministic error that looks like an outage (a statement
            # timeout, say) from requeueing a job for ever.
            log.warning("job %s: database unavailable (%s); giving the job back", job.id, exc)
            try:
                manager.release(job.id, job.attempt, "requeued: the database was unavailable")
            except LostLease:
                return "lost"
            return "released"
        log.exception("job %s failed", job.id)
        reason = f"{type(exc).__name__}: {exc}"
        if outage:
            reason = (f"given back {job.releases} times for database errors; the last: "
                      f"{reason}")
        try:
            manager.fail(job.id, job.attempt, reason)
        except LostLease:
            return "lost"
        return "failed"
    finally:
        hb.done.set()
        hb.join(timeout=5)
