"""Webhooks: where a job may send its notices (the SSRF rule), the tenant's signing secret,
the record of every delivery, and the dispatcher that sends them.

A job's terminal state and its delivery row are committed together (ssad_common/webhooks.py),
so a notice is never lost and a worker never waits for a receiver. The dispatcher runs in
each API process (a thread, started by the app's lifespan): it claims due deliveries (``FOR
UPDATE SKIP LOCKED`` on Postgres, so several API replicas share the work), leases each one
for longer than a request can take, POSTs it from a small pool of threads (a slow receiver
holds one thread, never the others), and records the attempt: delivered on a 2xx; otherwise
retried with exponential backoff until ``SSAD_WEBHOOK_RETRY_SECONDS`` after the job ended,
then failed. Redirects are not followed. Delivery is at least once (a process that dies
mid-request sends again after the lease): receivers drop repeats by ``SSAD-Delivery``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.deps import SessionDep, TenantDep
from service.errors import InvalidRequest, error_responses
from service.params import reject_unknown_query_params
from service.settings import ApiSettings
from ssad_common.models import Tenant, WebhookAttempt, WebhookDelivery, utcnow
from ssad_tune.webhooks import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, sign

log = logging.getLogger("ssad.webhooks")

MAX_URL_LENGTH = 2048


# --------------------------------------------------------------------------- targets


def _refused(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


def check_target(url: str, *, allow_private: bool) -> None:
    """Raise :class:`InvalidRequest` unless ``url`` is an http(s) URL whose host resolves
    only to public addresses (or ``allow_private``: the operator's ``SSAD_WEBHOOK_ALLOW_
    PRIVATE``). Loopback, private, link-local (the cloud metadata address), multicast and
    reserved targets are refused: a webhook must not let a tenant reach the service's own
    network (SSRF). Checked when the job is created and again before every attempt (the
    name may have been pointed elsewhere since)."""
    if len(url) > MAX_URL_LENGTH:
        raise InvalidRequest(f"notify_url is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InvalidRequest(f"notify_url is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("notify_url must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest("notify_url must not carry credentials: the notice is signed "
                             "(see GET /v1/webhooks/secret)")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InvalidRequest(f"notify_url's host {parts.hostname!r} does not resolve "
                             f"({exc})") from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if _refused(address):
            raise InvalidRequest(
                f"notify_url's host {parts.hostname!r} resolves to {address}, a loopback, "
                "private, link-local or reserved address: webhooks go to public addresses "
                "only (an operator may allow private ones with SSAD_WEBHOOK_ALLOW_PRIVATE=true)")


# --------------------------------------------------------------------------- secrets


def tenant_secret(session: Session, tenant_id: str, *, rotate: bool = False) -> str:
    """The tenant's webhook signing secret, made on first use (or anew with ``rotate``).
    Reading an existing one takes no lock."""
    if not rotate:
        secret = session.scalar(select(Tenant.webhook_secret).where(Tenant.id == tenant_id))
        if secret is not None:
            return secret
    tenant = session.execute(select(Tenant).where(Tenant.id == tenant_id)
                             .with_for_update()).scalar_one()
    if tenant.webhook_secret is None or rotate:
        tenant.webhook_secret = "whsec_" + secrets.token_urlsafe(32)
        session.flush()
    return tenant.webhook_secret


# --------------------------------------------------------------------------- dispatcher


@dataclass(frozen=True)
class Claimed:
    id: str
    tenant_id: str
    url: str
    event: str
    payload: str


class Dispatcher:
    """Sends due deliveries from a pool of threads; see the module's docstring. It claims
    no more than it has free senders: a claimed notice waiting behind slow receivers could
    outlive its lease and be claimed, and sent, a second time."""

    def __init__(self, factory: sessionmaker[Session], settings: ApiSettings) -> None:
        self.factory, self.settings = factory, settings
        self.busy = 0  # notices claimed and not yet recorded
        self.busy_lock = threading.Lock()
        self.stop_event = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=settings.webhook_senders,
                                       thread_name_prefix="ssad-webhook")
        self.thread = threading.Thread(target=self.run, name="ssad-webhooks", daemon=True)
        self.http = httpx.Client(timeout=settings.webhook_timeout_seconds,
                                 follow_redirects=False)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.http.close()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                with self.busy_lock:
                    free = self.settings.webhook_senders - self.busy
                for claimed in self.claim(free) if free > 0 else []:
                    with self.busy_lock:
                        self.busy += 1
                    self.pool.submit(self.send, claimed)
            except Exception:  # the database is away: try again at the next tick
                log.exception("webhook dispatcher: claiming deliveries failed")
            self.stop_event.wait(self.settings.webhook_poll_seconds)

    def claim(self, limit: int) -> list[Claimed]:
        """Due deliveries, each leased (its next attempt moved past the longest request)
        so no other dispatcher takes it while it is being sent."""
        now = utcnow()
        lease = timedelta(seconds=self.settings.webhook_timeout_seconds + 30)
        with self.factory.begin() as s:
            rows = s.scalars(
                select(WebhookDelivery)
                .where(WebhookDelivery.status == "pending",
                       WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at).limit(limit)
                .with_for_update(skip_locked=True)).all()
            for row in rows:
                row.next_attempt_at = now + lease
            return [Claimed(r.id, r.tenant_id, r.url, r.event, r.payload) for r in rows]

    def send(self, d: Claimed) -> None:
        try:
            self._send(d)
        finally:
            with self.busy_lock:
                self.busy -= 1

    def _send(self, d: Claimed) -> None:
        started = time.perf_counter()
        code: int | None = None
        error: str | None = None
        permanent = False
        try:
            check_target(d.url, allow_private=self.settings.webhook_allow_private)
            with self.factory.begin() as s:
                secret = tenant_secret(s, d.tenant_id)
            body = d.payload.encode()
            r = self.http.post(d.url, content=body, headers={
                "Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body),
                DELIVERY_HEADER: d.id, EVENT_HEADER: d.event,
                "User-Agent": "ssad-tune-webhooks/1"})
            code = r.status_code
            if not 200 <= code < 300:
                error = f"the receiver answered {code}"
        except InvalidRequest as exc:
            error, permanent = f"refused: {exc.detail}", True
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        except Exception as exc:  # recorded, never raised into the pool
            error = f"{type(exc).__name__}: {exc}"[:500]
        try:
            self.record(d.id, code, error, (time.perf_counter() - started) * 1000, permanent)
        except Exception:  # the lease runs out and the delivery is tried again
            log.exception("webhook %s: recording the attempt failed", d.id)

    def record(self, delivery_id: str, code: int | None, error: str | None,
               duration_ms: float, permanent: bool) -> None:
        now = utcnow()
        with self.factory.begin() as s:
            d = s.get(WebhookDelivery, delivery_id, with_for_update=True)
            if d is None:  # the job was deleted meanwhile
                return
            d.attempts += 1
            s.add(WebhookAttempt(delivery_id=d.id, number=d.attempts, at=now,
                                 status_code=code, error=error, duration_ms=duration_ms))
            delay = self.settings.webhook_backoff_seconds * 2 ** (d.attempts - 1)
            delay = min(delay, self.settings.webhook_max_backoff_seconds)
            if error is None:
                d.status, d.delivered_at = "delivered", now
            elif permanent or (now + timedelta(seconds=delay) - d.created_at
                               > timedelta(seconds=self.settings.webhook_retry_seconds)):
                d.status = "failed"
            else:
                d.next_attempt_at = now + timedelta(seconds=delay)
        log.info("webhook %s: attempt %s %s", delivery_id, code, error or "delivered")


# --------------------------------------------------------------------------- routes


class AttemptOut(BaseModel):
    number: int
    at: datetime
    status_code: int | None = Field(description="the receiver's answer; null when none came")
    error: str | None
    duration_ms: float


class DeliveryOut(BaseModel):
    id: str = Field(description="also the SSAD-Delivery header and the body's id")
    event: str
    url: str
    status: str = Field(description="pending (to send or retry), delivered (a 2xx), failed "
                                    "(gave up after SSAD_WEBHOOK_RETRY_SECONDS, or refused)")
    attempts: list[AttemptOut]
    next_attempt_at: datetime | None = Field(description="pending: when it is tried next")
    delivered_at: datetime | None
    created_at: datetime
    payload: dict[str, Any]


class DeliveryList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {
        "job_id": "3f1c…", "deliveries": [{
            "id": "9b2e…", "event": "job.succeeded", "url": "https://ci.example.com/hook",
            "status": "delivered", "attempts": [
                {"number": 1, "at": "2026-12-01T12:00:01Z", "status_code": 500,
                 "error": "the receiver answered 500", "duration_ms": 12.5},
                {"number": 2, "at": "2026-12-01T12:00:03Z", "status_code": 200,
                 "error": None, "duration_ms": 9.1}],
            "next_attempt_at": None, "delivered_at": "2026-12-01T12:00:03Z",
            "created_at": "2026-12-01T12:00:00Z",
            "payload": {"id": "9b2e…", "type": "job.succeeded", "job": {"id": "3f1c…"}}}]}})

    job_id: str
    deliveries: list[DeliveryOut]


class SecretOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {
        "secret": "whsec_…", "header": SIGNATURE_HEADER,
        "scheme": "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, '<t>.' + raw body)>"}})

    secret: str = Field(description="the key of the HMAC-SHA256 in SSAD-Signature")
    header: str = SIGNATURE_HEADER
    scheme: str = ("t=<unix seconds>,v1=<hex HMAC-SHA256(secret, '<t>.' + raw body)>; "
                   "ssad_tune.webhooks.verify checks it")


def list_deliveries(session: Session, job_id: str) -> DeliveryList:
    """The job's deliveries, oldest first, each with its attempts (the caller has checked
    that the job is the tenant's)."""
    rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                           .order_by(WebhookDelivery.created_at)).all()
    attempts: dict[str, list[AttemptOut]] = {r.id: [] for r in rows}
    for a in session.scalars(select(WebhookAttempt).where(
            WebhookAttempt.delivery_id.in_(list(attempts)))
            .order_by(WebhookAttempt.number)).all():
        attempts[a.delivery_id].append(AttemptOut(
            number=a.number, at=a.at, status_code=a.status_code, error=a.error,
            duration_ms=a.duration_ms))
    return DeliveryList(job_id=job_id, deliveries=[DeliveryOut(
        id=r.id, event=r.event, url=r.url, status=r.status, attempts=attempts[r.id],
        next_attempt_at=r.next_attempt_at if r.status == "pending" else None,
        delivered_at=r.delivered_at, created_at=r.created_at,
        payload=json.loads(r.payload)) for r in rows])


router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"],
                   dependencies=[Depends(reject_unknown_query_params)])


@router.get("/secret", response_model=SecretOut, responses=error_responses(401),
            summary="Your webhook signing secret (made on first use)")
def get_secret(session: SessionDep, tenant: TenantDep) -> SecretOut:
    return SecretOut(secret=tenant_secret(session, tenant))


@router.post("/secret", response_model=SecretOut, responses=error_responses(401),
             summary="Replace your webhook signing secret (notices sent after this use it)")
def rotate_secret(session: SessionDep, tenant: TenantDep) -> SecretOut:
    return SecretOut(secret=tenant_secret(session, tenant, rotate=True))


NotifyUrl = Annotated[str | None, Field(
    max_length=MAX_URL_LENGTH,
    description="http(s) URL to POST a signed JSON notice to when the job ends (succeeded, "
                "failed or cancelled); retried with backoff; see GET /v1/jobs/{id}/deliveries "
                "and GET /v1/webhooks/secret. Public addresses only unless the operator "
                "allows private ones")]
