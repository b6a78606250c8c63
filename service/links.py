"""Signed report links: a URL a browser can open without an ``Authorization`` header.

``POST /v1/jobs/{id}/report-link`` (with the API key) returns ``/v1/jobs/{id}/report?token=
<expiry>.<signature>``. The token lets its holder *read* that one job (its report, its
progress stream, its trials, scores, plots and downloads) until it expires, like a
presigned object-store URL; it grants nothing else and nothing that writes. The signature is
HMAC-SHA256 over the job id, the job's tenant and the expiry, with the service's link key:
``SSAD_LINK_SECRET``, else a random key made on first use and kept in the database (so every
API replica accepts the links of the others, and restarts keep them valid). Replacing the key
(deleting the ``report-links`` row of ``service_secrets``, or changing ``SSAD_LINK_SECRET``)
voids every link given out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.settings import ApiSettings
from ssad_common.models import Job, ServiceSecret

KEY_NAME = "report-links"
_key_lock = threading.Lock()
_keys: dict[str, bytes] = {}  # per database URL: read once per process


def link_key(session: Session, settings: ApiSettings) -> bytes:
    if settings.link_secret:
        return settings.link_secret.encode()
    with _key_lock:
        key = _keys.get(settings.database_url)
    if key is not None:
        return key
    value = session.scalar(select(ServiceSecret.value).where(ServiceSecret.name == KEY_NAME))
    if value is None:
        try:
            with session.begin_nested():
                session.add(ServiceSecret(name=KEY_NAME, value=secrets.token_urlsafe(48)))
        except IntegrityError:  # another process made it first: use theirs
            pass
        value = session.scalar(select(ServiceSecret.value)
                               .where(ServiceSecret.name == KEY_NAME))
        assert value is not None
    with _key_lock:
        _keys[settings.database_url] = value.encode()
    return value.encode()


def _signature(key: bytes, job_id: str, tenant_id: str, expires: int) -> str:
    mac = hmac.new(key, f"report|{job_id}|{tenant_id}|{expires}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


def make_token(session: Session, settings: ApiSettings, job_id: str, tenant_id: str,
               now: float | None = None) -> tuple[str, int]:
    """A token for ``job_id`` and its Unix expiry time."""
    expires = int((time.time() if now is None else now) + settings.link_ttl_seconds)
    return f"{expires}.{_signature(link_key(session, settings), job_id, tenant_id, expires)}", \
        expires


def tenant_for_token(session: Session, settings: ApiSettings, job_id: str,
                     token: str) -> str | None:
    """The job's tenant if ``token`` is a valid, unexpired link to ``job_id``; else None."""
    expiry, _, signature = token.partition(".")
    if not expiry.isdigit() or int(expiry) < time.time():
        return None
    tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
    if tenant_id is None:
        return None
    expected = _signature(link_key(session, settings), job_id, tenant_id, int(expiry))
    return tenant_id if hmac.compare_digest(expected, signature) else None
