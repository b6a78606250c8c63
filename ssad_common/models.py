"""All ORM tables, on one ``Base`` whose naming convention gives migrations stable names.

Relationships are not declared: every query is explicit, in a repository module.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ssad_common.jobspec import JOB_KINDS

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: use timezone-aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobStatus(enum.StrEnum):
    """A job's status; which may follow which, and the one function that moves a job, are
    in ssad_common/lifecycle.py."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class TrialState(enum.StrEnum):
    """What a stored trial came to (the names Optuna gives them)."""

    COMPLETE = "COMPLETE"
    FAIL = "FAIL"


def _enum_column(states: type[enum.StrEnum]) -> Enum:
    """A status column holding the enum's values as VARCHAR(16), exactly the DDL of the
    ``String(16)`` it replaced: no native enum type, no CHECK of its own (the table's
    declared CHECK stays the migrations')."""
    return Enum(states, native_enum=False, create_constraint=False, length=16,
                   values_callable=lambda e: [m.value for m in e])

_STATUS_CHECK = "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')"


#: Owner of everything created without authentication (the embedded single-user mode) and
#: of rows that existed before tenants did (migration 0002).
DEFAULT_TENANT_ID = "00000000-0000-0000-0000-000000000000"
DEFAULT_TENANT_NAME = "default"


class Tenant(Base):
    """Who owns datasets and jobs. Quotas left NULL take the service-wide defaults."""

    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    max_active_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_trials_per_job: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: Training images one job may process: n_trials × train_steps × batch_size.
    max_compute_per_job: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    #: The key that signs the tenant's webhooks (HMAC-SHA256); made on first use.
    webhook_secret: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    """An API key: only its SHA-256 is stored (keys are 256 random bits, so a fast hash is
    enough); ``prefix`` is the key's first characters, to tell keys apart in listings."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class IdempotencyKey(Base):
    """The first result of a POST sent with an ``Idempotency-Key`` header: a repeat with the
    same request fingerprint gets the same resource back, a different one a 409."""

    __tablename__ = "idempotency_keys"
    tenant_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Blob(Base):
    """An uploaded image set's canonical bytes (uint8 (N, C, H, W) as .npy), stored once per
    sha256 and split into chunks so no row is huge."""

    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    n_chunks: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class BlobChunk(Base):
    __tablename__ = "blob_chunks"
    sha256: Mapped[str] = mapped_column(
        String(64), ForeignKey("blobs.sha256", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(36), ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64), ForeignKey("blobs.sha256"), index=True)
    n_samples: Mapped[int] = mapped_column(Integer)
    channels: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    names: Mapped[list[str]] = mapped_column(JSON)
    # [{height, width, count}] of the images resized to height x width when the upload held
    # several sizes; None when none were.
    resized_from: Mapped[list[dict[str, int]] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Backbone(Base):
    """Encoder weights a tenant uploaded (a ``torch.save``d state dict, stored as a blob):
    a tuning job may start every trial's detector from them (``jobs.backbone_id``). The
    worker reads the file with ``torch.load(weights_only=True)``."""

    __tablename__ = "backbones"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(36), ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64), ForeignKey("blobs.sha256"), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    #: What the upload's pickle references (e.g. ``torch FloatStorage``), and its tensors.
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_STATUS_CHECK, name="status"),
        Index("ix_jobs_status_created_at", "status", "created_at"),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(36), ForeignKey("tenants.id"), index=True)
    status: Mapped[JobStatus] = mapped_column(_enum_column(JobStatus),
                                              default=JobStatus.queued)
    train_dataset_id: Mapped[str] = mapped_column(String(36), ForeignKey("datasets.id"))
    test_dataset_id: Mapped[str] = mapped_column(String(36), ForeignKey("datasets.id"))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: tune or score: which model of ssad_common/jobspec.py ``spec`` follows.
    kind: Mapped[str] = mapped_column(
        String(16), CheckConstraint(f"kind IN {JOB_KINDS}", name="kind"), default="tune",
        server_default="tune")
    n_trials: Mapped[int] = mapped_column(Integer)
    trials_completed: Mapped[int] = mapped_column(Integer, default=0)
    best: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    best_trial_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: Claims so far (of the job, or of one of its trial slots): each claim's number is its
    #: fencing token, held in ``job_slots`` while the claim is alive.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    #: How many of its trials may run at once, on different workers (one slot each).
    parallelism: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    #: The plan's trials (ssad_common/strategy.py): the job takes another slot only while
    #: fewer than these are stored or running. None for jobs queued before slots existed.
    trials_planned: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: Leases that expired (the worker died or went silent): only these count against
    #: ``max_attempts``; a job given back cleanly (SIGTERM, a database outage) is not charged.
    lost_leases: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    worker_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The running trial, as its worker last reported it: ``{"number", "step", "steps",
    #: "loss", "at"}``; None before the first training step and once the job has ended.
    trial_progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: Training steps of the stored trials, and the seconds they took (the API's estimate
    #: of the time left: the plan's remaining steps at the pace so far).
    train_steps_done: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    train_seconds_done: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    #: How decisive the choice was (worker/core/selection.py), written when the job succeeds.
    selection: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: Where to POST a signed notice when the job ends (a webhook_deliveries row each time).
    notify_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    #: The uploaded encoder weights every trial starts from (None: from scratch).
    backbone_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("backbones.id"), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class JobSlot(Base):
    """One live claim on a job: a worker running its trials. A job has up to
    ``parallelism`` of them; the row exists while the claim is alive (its lease renewed by
    heartbeats) and every write of its worker is fenced by ``(job_id, attempt)``."""

    __tablename__ = "job_slots"
    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker_id: Mapped[str] = mapped_column(String(255))
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    #: The study trial this slot has reserved (running, or told and not yet replaced);
    #: a trial running in the study that no live slot reserves was interrupted.
    trial_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    trial_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    #: Its running trial's progress, as in ``jobs.trial_progress``.
    trial_progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class JobEvent(Base):
    """Append-only history of a job: every status change, with the attempt that made it."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status: Mapped[JobStatus] = mapped_column(_enum_column(JobStatus))
    attempt: Mapped[int] = mapped_column(Integer)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)


class JobTrial(Base):
    """One finished trial of a job's study, written by the worker holding the attempt."""

    __tablename__ = "job_trials"
    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    state: Mapped[TrialState] = mapped_column(_enum_column(TrialState))
    augmentation: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    validation_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    losses: Mapped[dict[str, float]] = mapped_column(JSON)
    timings: Mapped[dict[str, float]] = mapped_column(JSON)
    duration_s: Mapped[float] = mapped_column(Float)
    #: Why a FAIL trial failed (e.g. the device ran out of memory); None when COMPLETE.
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: The staged strategy's stage (screen: short, never the best; refine); None for the
    #: tpe strategy and for trials stored before stages existed.
    stage: Mapped[str | None] = mapped_column(String(16), nullable=True)
    #: How long its detector trained; None for trials stored before this was kept.
    train_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: The worker that ran it and when (None for trials stored before this was kept).
    worker_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TrialScore(Base):
    """One anomaly score per test image per trial; the job's scores are its best trial's."""

    __tablename__ = "trial_scores"
    __table_args__ = (
        ForeignKeyConstraint(["job_id", "trial_number"],
                             ["job_trials.job_id", "job_trials.number"], ondelete="CASCADE"),
    )
    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    trial_number: Mapped[int] = mapped_column(Integer, primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    score: Mapped[float] = mapped_column(Float)


#: The artifact holding a job's best trial's detector (worker/core/export.py's format).
MODEL_ARTIFACT = "model"
#: While a job runs, every trial that can still be the best keeps its detector as
#: ``model-trial-<number>`` (under the rank sum a later trial can make an earlier one the
#: best); the job's end keeps the best's as ``model`` and drops the others.
TRIAL_MODEL_PREFIX = "model-trial-"
MODEL_CONTENT_TYPE = "application/vnd.ssad-tune.detector+torch"


class JobArtifact(Base):
    """A file a worker produced for a job: the best trial's detector (``model``, a torch file of
    tensors only, loaded with ``weights_only=True``) or a picture (``augmentation.png``).
    ``meta`` describes it (e.g. the trial it came from)."""

    __tablename__ = "job_artifacts"
    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    content_type: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookDelivery(Base):
    """One notice of a job's terminal state to its ``notify_url``: written in the same
    transaction as the state (an outbox), sent by the API's dispatcher, retried with backoff
    for ``SSAD_WEBHOOK_RETRY_SECONDS`` after ``created_at``. ``payload`` is the exact body
    that is signed and sent."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("job_id", "event"),
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("tenants.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[str] = mapped_column(Text)
    #: pending (to send, at ``next_attempt_at``), delivered (a 2xx), failed (gave up).
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookAttempt(Base):
    """One try at sending a delivery: the receiver's status code or the error."""

    __tablename__ = "webhook_attempts"
    delivery_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration_ms: Mapped[float] = mapped_column(Float)


class ServiceSecret(Base):
    """A secret of the service itself, made on first use (the key that signs report links,
    unless ``SSAD_LINK_SECRET`` sets one): shared by every API replica through the database."""

    __tablename__ = "service_secrets"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
