"""Prometheus metrics at ``GET /metrics``.

The queue's state is read from the database at each scrape, so every API process reports
the same numbers and nothing is lost when one restarts: jobs by status, queue depth and the
age of its oldest job, trials by state and a histogram of trial durations, each running
worker's heartbeat age, and the webhook notices by status with the oldest one's wait.
What only an API process sees (bytes uploaded, uploads refused) is counted per process;
Prometheus sums those across its scrape targets, so each process must be one (the
Kubernetes manifest runs one uvicorn process per pod; behind one port, ``--workers N``
would answer each scrape from one of its processes at random).

Labels carry no tenant or job ids; the endpoint is for operators (keep it off the public
internet, like /readyz).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import Engine, case, func, select

from ssad_common.models import (
    Job,
    JobSlot,
    JobStatus,
    JobTrial,
    TrialState,
    WebhookDelivery,
    utcnow,
)
from ssad_common.slots import slot_count, stored_trial_count

log = logging.getLogger("ssad.api")

TRIAL_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def slots_wanted(parallelism: int, planned: int | None, stored: int, live: int) -> int:
    """Workers one active job could use now: its parallelism, fewer when fewer trials are
    left to run than that (a job planned before plans were kept: one), never fewer than it
    holds."""
    left = 1 if planned is None else max(0, planned - stored)
    return max(live, min(parallelism, left))


class DatabaseCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("ssad_database_up", "1 if the database answered this scrape")
        try:
            metrics = list(self._from_database())
        except Exception as exc:  # a scrape during an outage still answers
            log.warning("metrics: database unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from metrics

    def _from_database(self) -> Iterator[Metric]:
        now = utcnow()
        with self.engine.connect() as conn:
            by_status = dict(conn.execute(
                select(Job.status, func.count()).group_by(Job.status)).all())
            oldest = conn.execute(select(func.min(Job.created_at)).where(
                Job.status == JobStatus.queued)).scalar()
            beats = conn.execute(select(JobSlot.worker_id, func.min(JobSlot.heartbeat_at))
                                 .group_by(JobSlot.worker_id)).all()
            trials = dict(conn.execute(
                select(JobTrial.state, func.count()).group_by(JobTrial.state)).all())
            active = conn.execute(select(Job.parallelism, Job.trials_planned,
                                         stored_trial_count(Job.id), slot_count(Job.id))
                                  .where(Job.status.in_([JobStatus.queued,
                                                         JobStatus.running]))).all()
            done = JobTrial.state == TrialState.COMPLETE
            buckets = conn.execute(select(
                *[func.coalesce(func.sum(case((done & (JobTrial.duration_s <= b), 1),
                                              else_=0)), 0) for b in TRIAL_BUCKETS],
                func.coalesce(func.sum(case((done, 1), else_=0)), 0),
                func.coalesce(func.sum(case((done, JobTrial.duration_s), else_=0.0)), 0.0),
            )).one()
            notices = dict(conn.execute(select(WebhookDelivery.status, func.count())
                                        .group_by(WebhookDelivery.status)).all())
            waiting = conn.execute(select(func.min(WebhookDelivery.created_at)).where(
                WebhookDelivery.status == "pending")).scalar()

        yield GaugeMetricFamily(
            "ssad_trial_slots_wanted",
            "Trial slots (one worker each) the queued and running jobs could use now, the "
            "busy ones included: the workers' autoscaling target",
            value=sum(slots_wanted(*row) for row in active))
        yield GaugeMetricFamily("ssad_trial_slots_running", "Trial slots held by workers",
                                value=sum(row[3] for row in active))
        jobs = GaugeMetricFamily("ssad_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status], by_status.get(status, 0))
        yield jobs
        yield GaugeMetricFamily("ssad_queue_depth", "Jobs waiting for a worker",
                                value=by_status.get(JobStatus.queued, 0))
        age = 0.0 if oldest is None else (now - oldest).total_seconds()
        yield GaugeMetricFamily("ssad_queue_oldest_age_seconds",
                                "How long the oldest queued job has waited (0: none)",
                                value=max(0.0, age))
        hb = GaugeMetricFamily("ssad_worker_heartbeat_age_seconds",
                               "Seconds since each busy worker's oldest job heartbeat",
                               labels=["worker"])
        for worker, at in beats:
            if worker is not None and at is not None:
                hb.add_metric([worker], max(0.0, (now - at).total_seconds()))
        yield hb
        yield GaugeMetricFamily("ssad_workers_busy", "Workers running a job",
                                value=sum(1 for w, _ in beats if w is not None))
        tr = GaugeMetricFamily("ssad_trials", "Stored trials by state", labels=["state"])
        for state in TrialState:
            tr.add_metric([state], trials.get(state, 0))
        yield tr
        counts = [int(c) for c in buckets[:len(TRIAL_BUCKETS)]]
        total, total_s = int(buckets[-2]), float(buckets[-1])
        hist = HistogramMetricFamily("ssad_trial_duration_seconds",
                                     "Wall time of finished trials", unit="")
        hist.add_metric([], [(str(b), c) for b, c in zip(TRIAL_BUCKETS, counts, strict=True)]
                        + [("+Inf", total)], sum_value=total_s)
        yield hist
        wh = GaugeMetricFamily("ssad_webhook_deliveries", "Webhook notices by status: "
                               "pending (to send or retry), delivered, failed (gave up)",
                               labels=["status"])
        for outcome in ("pending", "delivered", "failed"):
            wh.add_metric([outcome], notices.get(outcome, 0))
        yield wh
        yield GaugeMetricFamily(
            "ssad_webhook_oldest_pending_age_seconds",
            "How long the oldest undelivered notice has waited since its job ended (0: none)",
            value=0.0 if waiting is None else max(0.0, (now - waiting).total_seconds()))


class Metrics:
    """One registry per app: the database collector and this process's counters."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(DatabaseCollector(engine))
        self.upload_bytes = Counter("ssad_upload_bytes", "Bytes received in dataset uploads "
                                    "(this API process)", registry=self.registry)
        self.uploads = Counter("ssad_uploads", "Dataset uploads by outcome (this API process)",
                               ["outcome"], registry=self.registry)
