"""Tenants, their API keys and their quotas: who owns what, and how much of it.

An API key is ``ssad_`` + 43 URL-safe characters (256 random bits). Only its SHA-256 is
stored: with that much entropy a slow password hash adds nothing, and the lookup on every
request stays one indexed read. A key is shown once, when it is created.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from service.errors import (
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    TooManyActiveJobs,
)
from service.settings import ApiSettings
from ssad_common.models import ApiKey, Backbone, Dataset, Job, JobStatus, Tenant, utcnow

KEY_PREFIX = "ssad_"
_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant_name(name: str) -> str:
    if not _TENANT_NAME.match(name):
        raise InvalidRequest("tenant names are 1-64 characters: letters, digits, '.', '_', '-'"
                             ", starting with a letter or digit")
    return name


def get_tenant_by_name(session: Session, name: str) -> Tenant | None:
    return session.scalars(select(Tenant).where(Tenant.name == name)).first()


def ensure_tenant(session: Session, name: str) -> Tenant:
    tenant = get_tenant_by_name(session, check_tenant_name(name))
    if tenant is None:
        tenant = Tenant(id=str(uuid.uuid4()), name=name)
        session.add(tenant)
        session.flush()
    return tenant


def list_tenants(session: Session) -> Sequence[Tenant]:
    return session.scalars(select(Tenant).order_by(Tenant.name)).all()


def set_quotas(session: Session, name: str, *, max_active_jobs: int | None = None,
               max_stored_bytes: int | None = None,
               max_trials_per_job: int | None = None,
               max_compute_per_job: int | None = None) -> Tenant:
    """Override the service-wide quotas for one tenant (a negative value: back to default)."""
    tenant = get_tenant_by_name(session, name)
    if tenant is None:
        raise NotFound(f"tenant {name!r} not found")
    for field, value in (("max_active_jobs", max_active_jobs),
                         ("max_stored_bytes", max_stored_bytes),
                         ("max_trials_per_job", max_trials_per_job),
                         ("max_compute_per_job", max_compute_per_job)):
        if value is not None:
            setattr(tenant, field, None if value < 0 else value)
    session.flush()
    return tenant


# --------------------------------------------------------------------------- keys


def create_key(session: Session, tenant_name: str) -> tuple[ApiKey, str]:
    """A new key for ``tenant_name`` (created if new). Returns the row and the plain key,
    which is not stored anywhere."""
    tenant = ensure_tenant(session, tenant_name)
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id=str(uuid.uuid4()), tenant_id=tenant.id, prefix=plain[:12],
                 key_hash=hash_key(plain))
    session.add(key)
    session.flush()
    return key, plain


def list_keys(session: Session) -> Sequence[tuple[ApiKey, str]]:
    rows = session.execute(select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
                           .order_by(Tenant.name, ApiKey.created_at)).all()
    return [(k, n) for k, n in rows]


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoke by id (or a unique id prefix of at least 8 characters); idempotent."""
    if len(key_id) < 8:
        raise InvalidRequest("give the key's id (at least its first 8 characters)")
    rows = session.scalars(select(ApiKey).where(ApiKey.id.startswith(key_id))).all()
    if len(rows) != 1:
        raise NotFound(f"no single key with id {key_id!r} ({len(rows)} match)")
    if rows[0].revoked_at is None:
        rows[0].revoked_at = utcnow()
        session.flush()
    return rows[0]


#: The tenant of an unrevoked key, by the key's hash (also run on the event loop by
#: service/reads.py).
KEY_TENANT = select(ApiKey.tenant_id).where(ApiKey.key_hash == bindparam("hash"),
                                            ApiKey.revoked_at.is_(None))


def tenant_for_key(session: Session, plain: str) -> str | None:
    """The tenant id of a valid, unrevoked key; None otherwise."""
    digest = lookup_hash(plain)
    return None if digest is None else session.scalar(KEY_TENANT, {"hash": digest})


def lookup_hash(plain: str) -> str | None:
    """The stored hash to look ``plain`` up by; None for what cannot be a key."""
    if not plain.startswith(KEY_PREFIX) or len(plain) > 128:
        return None
    return hash_key(plain)


# --------------------------------------------------------------------------- quotas


@dataclass(frozen=True)
class Quotas:
    max_active_jobs: int
    max_stored_bytes: int
    max_trials_per_job: int
    #: Training images one job may process (n_trials × train_steps × batch_size).
    max_compute_per_job: int


def lock_tenant(session: Session, tenant_id: str, settings: ApiSettings) -> Quotas:
    """Serialise a tenant's quota-checked writes (a row lock on Postgres; SQLite takes its
    database write lock), so two concurrent requests cannot both squeeze under a quota.
    Returns the tenant's effective quotas."""
    row = session.execute(update(Tenant).where(Tenant.id == tenant_id).values(id=Tenant.id)
                          .returning(Tenant.max_active_jobs, Tenant.max_stored_bytes,
                                     Tenant.max_trials_per_job, Tenant.max_compute_per_job)
                          ).first()
    if row is None:
        raise NotFound(f"tenant {tenant_id} not found")
    jobs, stored, trials, compute = row
    return Quotas(
        max_active_jobs=settings.max_active_jobs if jobs is None else jobs,
        max_stored_bytes=settings.max_stored_bytes if stored is None else stored,
        max_trials_per_job=settings.max_trials_per_job if trials is None else trials,
        max_compute_per_job=settings.max_compute_per_job if compute is None else compute)


def check_storage(session: Session, tenant_id: str, quotas: Quotas, adding: int) -> None:
    """Stored bytes: the tenant's datasets (decoded) and backbones (as uploaded)."""
    used = sum(session.scalar(select(func.coalesce(func.sum(m.size_bytes), 0))
                              .where(m.tenant_id == tenant_id)) or 0
               for m in (Dataset, Backbone))
    if used + adding > quotas.max_stored_bytes:
        raise QuotaExceeded(
            f"storing this upload ({adding} bytes) would bring this tenant's datasets and "
            f"backbones to {used + adding} bytes, over its quota of {quotas.max_stored_bytes}:"
            " delete datasets or backbones you no longer need")


def check_job(session: Session, tenant_id: str, quotas: Quotas, n_trials: int) -> None:
    if n_trials > quotas.max_trials_per_job:
        raise QuotaExceeded(f"n_trials={n_trials} is over this tenant's quota of "
                            f"{quotas.max_trials_per_job} trials per job")
    active = session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id,
        Job.status.in_([JobStatus.queued, JobStatus.running]))) or 0
    if active >= quotas.max_active_jobs:
        raise TooManyActiveJobs(
            f"this tenant has {active} jobs queued or running, its quota: wait for one to "
            "end or cancel one, then retry")
